"""CUDA structure, checked on CPU where it can be, and on a GPU (tests marked `gpu`) where not.

- The fp16 variant (export/fp16.py): its I/O types, what stays fp32, and top-1 agreement with
  transformers' fp32 model.
- Host <-> device traffic per step of ConcatDecoder, counted by wrapping the session's IOBinding:
  per decode step only input_ids, attention_mask and position_ids go up and only the logits come
  down; the KV cache is rebound as OrtValues (zero KV copies). On CPU the "device" is the host, so
  what is counted is what the decoder *asks* for; the `gpu` test checks the same on CUDA, where the
  presents must also report device 'cuda'.
- `--device cuda` without a usable GPU fails with one line; `auto` resolves to cpu here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from conftest import export_dir

from gpt2_onnx.runtime.generator import TextGenerator
from gpt2_onnx.runtime.session import CUDA_PROVIDER, resolve_device

HAS_CUDA_PROVIDER = CUDA_PROVIDER in ort.get_available_providers()


# --------------------------------------------------------------------------- fixtures


def with_fp16(src: Path, dst: Path) -> Path:
    """A copy of the model directory `src` with the fp16 variant added."""
    from gpt2_onnx.export.pipeline import add_fp16_variant

    shutil.copytree(src, dst)
    add_fp16_variant(dst)
    return dst


@pytest.fixture(scope="module")
def tiny_fp16_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny export (seed 0) with fp32 and fp16 variants."""
    return with_fp16(tiny_dir, tmp_path_factory.mktemp("fp16") / "tiny")


@pytest.fixture(scope="module")
def tiny_half_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset exported with fp32, fp16 and fp16-fused (no verify)."""
    return export_dir(tmp_path_factory.mktemp("half") / "tiny", random_init="tiny",
                      precisions=("fp32", "fp16", "fp16-fused"))


# --------------------------------------------------------------------------- helpers


def history(prompt: list[int], steps: int, seed: int = 0) -> np.ndarray:
    """Tokens fed after `prompt` in the agreement checks: seeded random ids [steps]. Teacher
    forcing with a fixed history measures top-1 agreement at every step independently (one early
    disagreement does not derail the rest), and needs only one reference forward pass."""
    return np.random.default_rng(seed).integers(0, 50000, size=steps, dtype=np.int64)


def reference_logits(model: Any, prompt: list[int], tokens: np.ndarray) -> np.ndarray:
    """transformers' logits [steps, vocab] for each position that predicts a new token, from one
    full forward pass over prompt + tokens[:-1] without a cache."""
    import torch

    ids = torch.tensor([[*prompt, *tokens[:-1].tolist()]])
    with torch.no_grad():
        return model(ids).logits[0, len(prompt) - 1:].float().numpy()  # [steps, vocab]


def forced_logits(gen: TextGenerator, prompt: list[int], tokens: np.ndarray) -> np.ndarray:
    """The runtime's logits [steps, vocab] when fed `tokens` one by one after `prompt` (teacher
    forcing: every step sees the reference's history, so agreement is measured per step)."""
    dec = gen.decoder
    ids = np.array([prompt], dtype=np.int64)  # [1, n]
    mask = np.ones_like(ids)  # [1, n]
    cache = dec.start(1, len(prompt) + len(tokens))
    logits, cache = dec.forward(cache, ids, mask, np.cumsum(mask, axis=1) - 1)
    rows = [logits[0]]
    for j, tok in enumerate(tokens[:-1]):
        mask = np.ones((1, len(prompt) + j + 1), dtype=np.int64)
        pos = np.array([[len(prompt) + j]], dtype=np.int64)
        logits, cache = dec.forward(cache, np.array([[tok]], dtype=np.int64), mask, pos)
        rows.append(logits[0])
    return np.stack(rows)  # [steps, vocab]


class CountingOrtValue:
    """An output OrtValue whose .numpy() (a device -> host copy on CUDA) is counted."""

    def __init__(self, inner: ort.OrtValue, name: str, counts: Counter) -> None:
        self._inner, self._name, self._counts = inner, name, counts

    def numpy(self) -> np.ndarray:
        arr = self._inner.numpy()
        self._counts[f"down:{self._name}"] += 1
        self._counts["down_bytes"] += arr.nbytes
        return arr

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)


class CountingBinding:
    """Wraps an IOBinding: counts host -> device inputs, outputs bound to the host, and notes
    which OrtValues are rebound (the KV cache must be the previous step's outputs, unchanged)."""

    def __init__(self, inner: ort.IOBinding, counts: Counter, produced: dict[int, str]) -> None:
        self._inner, self._counts, self._produced = inner, counts, produced
        self._output_names: list[str] = []

    def bind_cpu_input(self, name: str, arr: np.ndarray) -> None:
        self._counts[f"up:{name}"] += 1
        self._counts["up_bytes"] += arr.nbytes
        self._inner.bind_cpu_input(name, arr)

    def bind_ortvalue_input(self, name: str, value: Any) -> None:
        inner = getattr(value, "_inner", value)
        if id(inner) in self._produced:
            self._counts["kv_rebound"] += 1  # last step's output, bound as is: no copy
        else:
            self._counts[f"fresh_input:{name}"] += 1  # made on the host (start()'s empty past)
            self._counts["fresh_input_bytes"] += inner.numpy().nbytes
        self._inner.bind_ortvalue_input(name, inner)

    def bind_output(self, name: str, device_type: str = "cpu", device_id: int = 0,
                    *args: Any, **kwargs: Any) -> None:
        self._counts[f"out:{name}@{device_type}"] += 1
        self._output_names.append(name)
        self._inner.bind_output(name, device_type, device_id, *args, **kwargs)

    def get_outputs(self) -> list[CountingOrtValue]:
        outs = self._inner.get_outputs()
        for ov in outs:
            self._produced[id(ov)] = "output"
        return [CountingOrtValue(ov, n, self._counts)
                for ov, n in zip(outs, self._output_names, strict=True)]

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)


class CountingSession:
    """A session proxy whose io_binding() counts transfers; everything else passes through."""

    def __init__(self, inner: ort.InferenceSession) -> None:
        self._inner = inner
        self.counts: Counter = Counter()
        self._produced: dict[int, str] = {}  # id() of every OrtValue a run returned

    def io_binding(self) -> CountingBinding:
        return CountingBinding(self._inner.io_binding(), self.counts, self._produced)

    def run_with_iobinding(self, binding: CountingBinding, *args: Any) -> None:
        self._inner.run_with_iobinding(binding._inner, *args)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)


def count_steps(gen: TextGenerator, batch: int, prompt_len: int, steps: int
                ) -> tuple[Counter, list[Counter], list[Any]]:
    """Run prefill + `steps` decode steps through a CountingSession; returns the prefill's
    counts, each decode step's counts, and the last step's present OrtValues."""
    dec = gen.decoder
    proxy = CountingSession(dec.session)
    dec.session = proxy
    try:
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 50000, size=(batch, prompt_len), dtype=np.int64)  # [b, n]
        mask = np.ones_like(ids)  # [b, n]
        cache = dec.start(batch, prompt_len + steps)
        logits, cache = dec.forward(cache, ids, mask, np.cumsum(mask, axis=1) - 1)
        prefill = proxy.counts.copy()
        per_step = []
        for s in range(steps):
            proxy.counts.clear()
            nxt = logits.argmax(-1)[:, None].astype(np.int64)  # [b, 1]
            mask = np.ones((batch, prompt_len + s + 1), dtype=np.int64)
            pos = np.full((batch, 1), prompt_len + s, dtype=np.int64)
            logits, cache = dec.forward(cache, nxt, mask, pos)
            per_step.append(proxy.counts.copy())
        presents = list(cache.values.values())
    finally:
        dec.session = proxy._inner
    return prefill, per_step, presents


def assert_decode_traffic(gen: TextGenerator, step: Counter, batch: int, past: int) -> None:
    """One decode step moved only the three id tensors up and the logits down; KV stayed."""
    dec, io = gen.decoder, gen.decoder.variant.io
    n_kv = 2 * gen.manifest.dims.n_layer
    vocab = gen.manifest.dims.vocab_size
    up = {k for k in step if k.startswith("up:")}
    assert up == {f"up:{io.input_ids}", f"up:{io.attention_mask}", f"up:{io.position_ids}"}
    assert all(step[k] == 1 for k in up)
    # input_ids [b,1] + attention_mask [b, past+1] + position_ids [b,1], int64
    assert step["up_bytes"] == 8 * batch * (1 + past + 1 + 1)
    assert step["kv_rebound"] == n_kv  # every past is last step's present, no copy
    assert not [k for k in step if k.startswith("fresh_input")]
    # The logits come from `logits`, or from a last-row output where the manifest names one.
    logits_names = {io.logits, getattr(io, "logits_last", "") or io.logits}
    host_outputs = [k for k in step if k.startswith("out:") and k.endswith("@cpu")]
    device_outputs = [k for k in step if k.startswith("out:") and not k.endswith("@cpu")]
    if dec.device.name == "cpu":
        # On CPU the presents are bound to the session's device, which is the host.
        assert len(host_outputs) == 1 + n_kv
    else:
        assert len(host_outputs) == 1 and host_outputs[0][4:-4] in logits_names
        assert len(device_outputs) == n_kv and all(k.endswith(f"@{dec.device.name}")
                                                   for k in device_outputs)
    downs = {k: v for k, v in step.items() if k.startswith("down:")}
    assert len(downs) == 1 and next(iter(downs))[5:] in logits_names  # only logits come down
    assert next(iter(downs.values())) == 1  # once
    assert step["down_bytes"] == batch * vocab * 4  # [b, 1, vocab] float32 at decode


# --------------------------------------------------------------------------- fp16 variant


def test_fp16_graph_io_and_fp32_islands(tiny_fp16_dir: Path) -> None:
    import onnx
    from onnx import TensorProto

    from gpt2_onnx.export.graph_edit import LAST_LOGITS
    from gpt2_onnx.runtime.manifest import read_manifest
    from gpt2_onnx.runtime.variants import THRESHOLDS

    manifest = read_manifest(tiny_fp16_dir)
    v = manifest.variants["fp16"]
    assert (v.graph, v.dtype, v.data) == ("model-fp16.onnx", "float16", ())
    # add_fp16_variant records fp16's limits, not a copy of fp32's
    assert v.thresholds == THRESHOLDS["fp16"] != manifest.variants["fp32"].thresholds
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(tiny_fp16_dir / v.graph)))
    g = proto.graph
    types = {x.name: x.type.tensor_type.elem_type for x in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    n_layer = manifest.dims.n_layer
    for name in [*v.io.kv_inputs(n_layer), *v.io.kv_outputs(n_layer)]:
        assert types[name] == TensorProto.FLOAT16, name
    assert types[v.io.logits] == TensorProto.FLOAT
    assert types[LAST_LOGITS] == TensorProto.FLOAT
    nodes = list(g.node)
    by_output = {o: n for n in nodes for o in n.output}
    # LayerNorm and Softmax compute in fp32; LayerNorm reads the fp32 residual stream directly.
    for n in nodes:
        if n.op_type in ("LayerNormalization", "Softmax"):
            assert types[n.input[0]] == TensorProto.FLOAT, n.name
            assert all(types[o] == TensorProto.FLOAT for o in n.output), n.name
        if n.op_type == "LayerNormalization":
            assert by_output[n.input[0]].op_type == "Add", n.name  # not a Cast round trip
    # Residual Adds (feeding a LayerNorm): fp32 in and out. 1 embedding Add + 2 per block.
    residual = {by_output[n.input[0]].name for n in nodes if n.op_type == "LayerNormalization"}
    assert len(residual) == 1 + 2 * n_layer
    for name in residual:
        add = next(n for n in nodes if n.name == name)
        assert all(types[x] == TensorProto.FLOAT for x in [*add.input, *add.output]), name
    # The weights of the big matmuls are fp16 (the point of the variant).
    gemm_weights = [n.input[1] for n in nodes if n.op_type == "Gemm"]
    assert gemm_weights and all(types[w] == TensorProto.FLOAT16 for w in gemm_weights)


def test_fp16_last_logits_output_is_last_row(tiny_fp16_dir: Path) -> None:
    from gpt2_onnx.export.graph_edit import LAST_LOGITS

    sess = ort.InferenceSession(str(tiny_fp16_dir / "model-fp16.onnx"),
                                providers=["CPUExecutionProvider"])
    ids = np.array([[464, 3139, 318], [50256, 40, 588]], dtype=np.int64)  # [2, 3]
    mask = np.array([[1, 1, 1], [0, 1, 1]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask,
             "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None)}
    for i in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((2, 4, 0, 16), dtype=np.float16)
    logits, last = sess.run(["logits", LAST_LOGITS], feeds)
    assert last.shape == (2, 50257) and last.dtype == np.float32
    assert np.isfinite(logits).all()  # assert_array_equal alone would call NaN == NaN equal
    np.testing.assert_array_equal(last, logits[:, -1, :])


def test_fp16_added_to_a_directory_exported_before_last_row_logits(tiny_dir: Path,
                                                                     tmp_path: Path) -> None:
    """An older export's fp32 graph has no logits_last output: the fp16 conversion adds one."""
    import json

    import onnx

    from gpt2_onnx.export.graph_edit import LAST_LOGITS
    from gpt2_onnx.export.pipeline import add_fp16_variant
    from gpt2_onnx.runtime.manifest import file_entries, read_manifest

    old = tmp_path / "old"
    shutil.copytree(tiny_dir, old)
    proto = onnx.load(str(old / "model.onnx"))
    keep = [o for o in proto.graph.output if o.name != LAST_LOGITS]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    onnx.save(proto, str(old / "model.onnx"))
    doc = json.loads((old / "gpt2-onnx.json").read_text())
    doc["variants"]["fp32"]["io"]["logits_last"] = ""
    entry = file_entries(old, ["model.onnx"])["model.onnx"]
    doc["files"]["model.onnx"] = {"size": entry.size, "sha256": entry.sha256}
    (old / "gpt2-onnx.json").write_text(json.dumps(doc))
    add_fp16_variant(old)
    v = read_manifest(old).variants["fp16"]
    assert v.io.logits_last == LAST_LOGITS
    outputs = [o.name for o in onnx.load(str(old / v.graph)).graph.output]
    assert outputs.count(LAST_LOGITS) == 1


def test_every_variant_offers_last_row_logits(tiny_half_dir: Path) -> None:
    """fp32 and fp16 graphs have a last-row output (prefill brings [batch, vocab] to the host);
    the fused graphs compute only the rows asked for. Each equals the last row of all logits."""
    from gpt2_onnx.runtime.manifest import read_manifest

    manifest = read_manifest(tiny_half_dir)
    for precision, variant in manifest.variants.items():
        io = variant.io
        assert io.logits_last or io.logits_rows == "last", precision
        gen = TextGenerator.load(tiny_half_dir, device="cpu", precision=precision, threads=1)
        ids = np.array([[464, 3139, 318, 257]], dtype=np.int64)  # [1, 4]
        mask, pos = np.ones_like(ids), np.arange(4)[None]
        last, _ = gen.decoder.forward(gen.decoder.start(1, 8), ids, mask, pos)
        full, _ = gen.decoder.forward(gen.decoder.start(1, 8), ids, mask, pos, all_logits=True)
        assert last.shape == (1, 50257) and np.isfinite(full).all(), precision
        np.testing.assert_array_equal(last, full[:, -1, :])


# Largest |logit| difference between a row in a left-padded batch and the same prompt alone
# (tiny's logits span +-30): fp32 arithmetic in another order, or fp16 rounding.
PAD_TOLERANCE = {"fp32": 1e-4, "fp16": 0.1, "fp16-fused": 0.1}


def _teacher_forced_rows(gen: TextGenerator, prompts: list[list[int]], tokens: np.ndarray
                         ) -> np.ndarray:
    """Logits [rows, steps, vocab] of left-padded `prompts` decoded together, fed `tokens`."""
    dec = gen.decoder
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), dtype=np.int64)  # [b, width], left-padded
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # [b, width]
    cache = dec.start(len(prompts), width + len(tokens))
    logits, cache = dec.forward(cache, ids, mask, pos)
    out = [logits]
    for tok in tokens[:-1]:
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        logits, cache = dec.forward(cache, np.full((len(prompts), 1), tok, np.int64), mask,
                                    pos)
        out.append(logits)
    return np.stack(out, axis=1)  # [b, steps, vocab]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "fp16-fused"])
def test_left_padded_rows_equal_unpadded_and_never_nan(tiny_half_dir: Path,
                                                       precision: str) -> None:
    """A 1-token prompt padded by 9 beside a 10-token one, then 6 decode steps: each row's
    logits equal the prompt decoded alone, and NaN anywhere is a failure (the fp16 mask
    constant must not overflow into NaN on fully masked padding rows)."""
    gen = TextGenerator.load(tiny_half_dir, device="cpu", precision=precision, threads=1)
    prompts = [[464, 3139, 318, 257, 1332, 286, 262, 995, 13, 383], [40]]
    tokens = np.array([11, 290, 262, 4252, 373, 13], dtype=np.int64)
    together = _teacher_forced_rows(gen, prompts, tokens)  # [2, 6, vocab]
    assert np.isfinite(together).all()
    for row, p in enumerate(prompts):
        alone = _teacher_forced_rows(gen, [p], tokens)[0]  # [6, vocab]
        assert np.isfinite(alone).all()
        np.testing.assert_allclose(together[row], alone, rtol=0,
                                   atol=PAD_TOLERANCE[precision], equal_nan=False)
        np.testing.assert_array_equal(together[row].argmax(-1), alone.argmax(-1))


def test_fp16_top1_agreement_with_transformers_fp32_on_cpu(tiny_fp16_dir: Path,
                                                           tiny_reference: Any) -> None:
    """onnxruntime's CPU provider runs the fp16 graph (it casts ops it has no fp16 kernel for),
    so the numeric check runs here: >= 99 % top-1 agreement over 64 teacher-forced steps."""
    gen = TextGenerator.load(tiny_fp16_dir, device="cpu", precision="fp16", threads=1)
    prompt = gen.encode("Paris will")
    tokens = history(prompt, 64)
    ref = reference_logits(tiny_reference, prompt, tokens)
    ours = forced_logits(gen, prompt, tokens)  # [64, vocab]
    assert np.isfinite(ours).all()
    agreement = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    assert agreement >= 0.99, agreement
    # fp16 weights and activations: close to fp32, not equal (scale of these logits ~10).
    assert np.abs(ours - ref).max() < 0.5


# --------------------------------------------------------------------------- copies per step


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_decode_step_moves_only_ids_up_and_logits_down(tiny_fp16_dir: Path,
                                                       precision: str) -> None:
    gen = TextGenerator.load(tiny_fp16_dir, device="cpu", precision=precision, threads=1)
    batch, n, steps = 2, 5, 4
    prefill, per_step, presents = count_steps(gen, batch, n, steps)
    n_kv = 2 * gen.manifest.dims.n_layer
    # Prefill: the empty past comes from the host once (zero bytes), ids up, logits down.
    assert sum(v for k, v in prefill.items() if k.startswith("fresh_input:")) == n_kv
    assert prefill["fresh_input_bytes"] == 0
    assert sum(v for k, v in prefill.items() if k.startswith("down:")) == 1  # the logits
    for s, step in enumerate(per_step):
        assert_decode_traffic(gen, step, batch, past=n + s)
    want = np.float16 if precision == "fp16" else np.float32
    shape = (batch, gen.manifest.dims.n_head, n + steps, gen.manifest.dims.head_dim)
    assert all(p.shape() == list(shape) for p in presents)
    assert all(p.numpy().dtype == want for p in presents)


# --------------------------------------------------------------------------- device choice


@pytest.mark.skipif(HAS_CUDA_PROVIDER, reason="onnxruntime here has the CUDA provider")
def test_auto_resolves_to_cpu_without_cuda_provider() -> None:
    assert resolve_device("auto").name == "cpu"


@pytest.mark.skipif(HAS_CUDA_PROVIDER, reason="onnxruntime here has the CUDA provider")
def test_device_cuda_without_gpu_fails_with_one_line(tiny_dir: Path) -> None:
    cli = [sys.executable, "-c", "from gpt2_onnx.cli import main; main()"]
    env = {**os.environ, "COLUMNS": "80"}  # a narrow terminal must not wrap the message
    proc = subprocess.run([*cli, "generate", str(tiny_dir), "Paris will", "--device", "cuda",
                           "--max-new-tokens", "2"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    line = lines[0]
    assert "onnxruntime-gpu" in line  # what is missing
    assert "pip install" in line and "--device cpu" in line  # how to fix it


# --------------------------------------------------------------------------- CUDA settings


def test_cuda_provider_keeps_tf32_off_unless_asked() -> None:
    """onnxruntime's CUDA provider enables TF32 by default; CUDA sessions turn it off (PyTorch's
    fp32 arithmetic) and `with_options(use_tf32="1")` (TextGenerator.load(tf32=True)) opts in.
    Checked on the providers argument handed to onnxruntime."""
    from gpt2_onnx.runtime.device import CPU, Device

    assert Device("cuda", 1).providers() == [
        (CUDA_PROVIDER, {"device_id": "1", "use_tf32": "0"}), "CPUExecutionProvider"]
    opted = Device("cuda").with_options(use_tf32="1").providers()[0]
    assert opted == (CUDA_PROVIDER, {"device_id": "0", "use_tf32": "1"})
    assert CPU.providers() == ["CPUExecutionProvider"]


def test_fused_graphs_other_than_fp16_fused_are_refused_on_cuda(tiny_half_dir: Path) -> None:
    """GroupQueryAttention's CUDA kernel is fp16/bf16 only: fp32-fused, int8 and int4 are
    refused on CUDA with one line naming fp16-fused; the others pass the check."""
    from dataclasses import replace

    from gpt2_onnx.runtime import variants as registry
    from gpt2_onnx.runtime.device import CPU, Device, check_variant_on_device
    from gpt2_onnx.runtime.manifest import read_manifest

    variants = read_manifest(tiny_half_dir).variants
    fused32 = replace(variants["fp16-fused"], dtype="float32")
    cuda = Device("cuda")
    for precision in ("fp32-fused", "int8", "int4"):
        with pytest.raises(ValueError, match=r"cannot run on CUDA .*use precision 'fp16-fused'"):
            check_variant_on_device(replace(fused32, precision=precision), cuda)
        check_variant_on_device(replace(fused32, precision=precision), CPU)  # fine on CPU
    for precision in ("fp32", "fp16", "fp16-fused"):
        check_variant_on_device(variants[precision], cuda)
    assert registry.preferred("cuda")[0] == "fp16-fused"
    assert not {"fp32-fused", "int8", "int4"} & set(registry.preferred("cuda"))


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_cuda_greedy_parity_fp32(tiny_dir: Path, tiny_reference: Any) -> None:
    import torch

    gen = TextGenerator.load(tiny_dir, device="cuda", precision="fp32")
    assert gen.device.name == "cuda"
    prompt = gen.encode("Paris will")
    with torch.no_grad():
        ids = torch.tensor([prompt])
        ref = tiny_reference.generate(ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=48, do_sample=False,
                                      pad_token_id=gen.manifest.dims.eos_token_id)
    result = gen.generate_ids([prompt], max_new_tokens=48, greedy=True)[0]
    assert result.ids == ref[0, len(prompt):].tolist()


@pytest.mark.gpu
def test_cuda_fp16_top1_agreement_256_steps(odd_dir: Path, odd_reference: Any,
                                            tmp_path: Path) -> None:
    """fp16 on CUDA against transformers fp32: >= 99 % top-1 over 256 teacher-forced steps
    (the odd shape has 512 positions; tiny's 256 would not hold prompt + 256)."""
    model_dir = with_fp16(odd_dir, tmp_path / "odd")
    gen = TextGenerator.load(model_dir, device="cuda", precision="fp16")
    prompt = gen.encode("Paris will")
    tokens = history(prompt, 256)
    ref = reference_logits(odd_reference, prompt, tokens)
    ours = forced_logits(gen, prompt, tokens)
    assert np.isfinite(ours).all()
    agreement = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    assert agreement >= 0.99, agreement


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_kv_cache_stays_on_device(tiny_fp16_dir: Path, precision: str) -> None:
    gen = TextGenerator.load(tiny_fp16_dir, device="cuda", precision=precision)
    batch, n, steps = 2, 5, 4
    _, per_step, presents = count_steps(gen, batch, n, steps)
    for s, step in enumerate(per_step):
        assert_decode_traffic(gen, step, batch, past=n + s)
    assert all(p.device_name().lower() == "cuda" for p in presents)


@pytest.mark.gpu
def test_cuda_fp32_logits_within_fp32_limit(tiny_dir: Path, tiny_reference: Any) -> None:
    """TF32 off: fp32 on CUDA stays within verify's fp32 limit of PyTorch fp32 (TF32 would not)."""
    from gpt2_onnx.runtime.variants import THRESHOLDS

    gen = TextGenerator.load(tiny_dir, device="cuda", precision="fp32")
    prompt = gen.encode("Paris will")
    tokens = history(prompt, 32)
    ours = forced_logits(gen, prompt, tokens)
    ref = reference_logits(tiny_reference, prompt, tokens)
    assert np.isfinite(ours).all()
    assert np.abs(ours - ref).max() <= THRESHOLDS["fp32"]["logits_max_abs"]


@pytest.mark.gpu
def test_cuda_fp16_fused_agreement_and_buffers_on_device(odd_checkpoint: Path,
                                                         odd_reference: Any,
                                                         tmp_path: Path) -> None:
    """fp16-fused on CUDA: >= 99 % top-1 over 256 teacher-forced steps against transformers
    fp32, finite logits, the shared KV buffers on the GPU, padded batch rows equal alone."""
    model_dir = export_dir(tmp_path / "odd", source=str(odd_checkpoint),
                           precisions=("fp32", "fp16-fused"))
    gen = TextGenerator.load(model_dir, device="cuda", precision="fp16-fused")
    prompt = gen.encode("Paris will")
    tokens = history(prompt, 256)
    ours = forced_logits(gen, prompt, tokens)
    ref = reference_logits(odd_reference, prompt, tokens)
    assert np.isfinite(ours).all()
    assert float((ours.argmax(-1) == ref.argmax(-1)).mean()) >= 0.99
    cache = gen.decoder.start(1, 8)
    assert all(b.device_name().lower() == "cuda" for b in cache.buffers.values())
    prompts = [[464, 3139, 318, 257, 1332, 286, 262, 995, 13, 383], [40]]
    steps = np.array([11, 290, 262, 4252, 373, 13], dtype=np.int64)
    together = _teacher_forced_rows(gen, prompts, steps)
    assert np.isfinite(together).all()
    for row, p in enumerate(prompts):
        alone = _teacher_forced_rows(gen, [p], steps)[0]
        np.testing.assert_allclose(together[row], alone, rtol=0, atol=0.1, equal_nan=False)
