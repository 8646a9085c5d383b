"""Issue 11: one home per concept.

- the variant registry: a throwaway variant (one entry + its builder) is exported, verified,
  picked and generated; unknown precisions are errors everywhere;
- the Device type: parsing, providers and options, device ids reaching the error messages;
- the default export (fp32 + fp32-fused, verified, no third-party chatter) and old directories
  whose fused graph is named model-fp32.onnx;
- errors by cause: internal failures are reported as internal, load failures by their cause;
- the base install (no onnxruntime): help names the extras, info/tokenize/decode work,
  generation names the extra to add.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpt2_onnx.runtime import variants
from gpt2_onnx.runtime.device import CPU, Device, parse_device, resolve_device
from gpt2_onnx.runtime.errors import (
    DecoderInputError,
    DeviceError,
    InternalError,
    ModelDirError,
    SessionLoadError,
)
from gpt2_onnx.runtime.generator import TextGenerator

BLOCK_ORT = "import sys\nsys.modules['onnxruntime'] = None\n"


def run_cli(*args: str, prelude: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    """`gpt2-onnx ARGS` in a fresh interpreter; `prelude` runs first (to block or break code)."""
    code = (f"import sys\n{textwrap.dedent(prelude)}\nsys.argv = ['gpt2-onnx', *{list(args)!r}]\n"
            "from gpt2_onnx.cli import main\nmain()\n")
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env)


# ------------------------------------------------------------------------------ registry


def test_unknown_precision_is_an_error_everywhere(tiny_dir: Path) -> None:
    from gpt2_onnx.export import verify
    from gpt2_onnx.export.pipeline import ExportOptions, run_export
    from gpt2_onnx.runtime.manifest import Variant, VariantIO

    with pytest.raises(ValueError,
                       match="'int3'.*known: fp32, fp32-fused, int8, int4, fp16, fp16-fused"):
        variants.get("int3")
    # verify used to give an unknown precision int4's limits
    with pytest.raises(ValueError, match="int3"):
        verify.limits_for(Variant("int3", "model.onnx", (), "float32", VariantIO()))
    with pytest.raises(ValueError, match="int3"):
        run_export(ExportOptions(random_init="tiny", out=tiny_dir.parent / "never",
                                 precisions=("fp32", "int3")))
    assert not (tiny_dir.parent / "never").exists()
    with pytest.raises(ValueError, match="int3"):
        TextGenerator.load(tiny_dir, device="cpu", precision="int3")


def test_registry_entries_keep_the_previous_choices() -> None:
    # The tables this registry replaced (generator.DEFAULT_PRECISIONS, FAST_LOAD_PRECISIONS,
    # export/thresholds.py), written out by hand; fp16-fused added, and the fused graphs other
    # than fp16-fused dropped from CUDA (GroupQueryAttention's CUDA kernel is fp16/bf16 only).
    assert variants.preferred("cpu") == ("fp32-fused", "fp32", "int8", "int4", "fp16",
                                         "fp16-fused")
    assert variants.preferred("cuda") == ("fp16-fused", "fp16", "fp32")
    assert [n for n in variants.names() if variants.get(n).fast_load] == [
        "fp32", "fp32-fused", "fp16", "fp16-fused"]
    # Limits derived by bench/derive_thresholds.py (runtime/thresholds.json)
    assert variants.thresholds_for("int8") == {"logits_max_abs": 0.19, "mean_kl_max": 3.3e-4,
                                               "top1_agreement_min": 0.99, "top1_margin": 0.1}
    assert variants.thresholds_for("fp32-fused") == {"logits_max_abs": 7.6e-4,
                                                     "top1_agreement_min": 1.0}
    assert variants.get("fp32-fused").graph == "model-fp32-fused.onnx"
    with pytest.raises(ValueError, match="already registered"):
        variants.register(variants.get("fp32"))
    with pytest.raises(ValueError, match="family"):
        variants.VariantSpec("x", "tvm", "concat", "float32", 4.0, "x.onnx",
                             {"logits_max_abs": 1e-3})


@pytest.fixture
def throwaway_variant():
    """A new variant: one registry entry plus its builder (a fused fp32 graph under another
    name and file), preferred on CPU above everything else."""
    from gpt2_onnx.export import builders

    spec = variants.VariantSpec(
        name="fp32-throwaway", family="fused", kv_layout="shared", weight_dtype="float32",
        bytes_per_param=4.0, graph="model-throwaway.onnx",
        thresholds=variants.thresholds_for("fp32-fused"),
        preference={"cpu": -1}, fast_load=True)

    def build(model, out_dir: Path, entry: variants.VariantSpec):
        from gpt2_onnx.export.fused import build_fused_graph

        return build_fused_graph(model, out_dir, "fp32", graph_name=entry.graph)

    variants.register(spec)
    builders.register_builder(spec.name, build)
    try:
        yield spec
    finally:
        builders.BUILDERS.pop(spec.name, None)
        variants.unregister(spec.name)


def test_a_new_variant_is_one_entry_plus_its_builder(throwaway_variant, tmp_path: Path,
                                                     tiny_dir: Path) -> None:
    from gpt2_onnx.export.pipeline import ExportOptions, run_export
    from gpt2_onnx.runtime.manifest import read_manifest

    out = run_export(ExportOptions(random_init="tiny", out=tmp_path / "m",
                                   precisions=("fp32", "fp32-throwaway"), verify=True))
    manifest = read_manifest(out)
    assert list(manifest.variants) == ["fp32", "fp32-throwaway"]
    assert manifest.variants["fp32-throwaway"].graph == "model-throwaway.onnx"
    assert (out / "model-throwaway.onnx").is_file()
    assert manifest.verify["passed"]  # verify read the entry's thresholds
    assert {c["variant"] for c in manifest.verify["checks"]} >= {"fp32-throwaway"}
    gen = TextGenerator.load(out, device="cpu", fast_load=True)  # picked by its preference
    assert gen.precision == "fp32-throwaway"
    new = gen.generate("Paris will", greedy=True, max_new_tokens=8)
    # Same weights (tiny, seed 0) as tiny_dir's optimum graph: the same greedy tokens.
    ref = TextGenerator.load(tiny_dir, device="cpu").generate("Paris will", greedy=True,
                                                               max_new_tokens=8)
    assert new.ids == ref.ids


# ------------------------------------------------------------------------------ default export


def test_export_of_one_precision_adds_the_fp32_it_always_writes(tmp_path) -> None:
    """`export --precision int8` (as issue 17 writes `--precision int4`) exports fp32 and int8,
    not an error asking the user to spell out fp32."""
    from gpt2_onnx.runtime.manifest import read_manifest

    out = tmp_path / "m"
    proc = run_cli("export", "--random-init", "tiny", "--precision", "int8", "--no-verify",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert list(read_manifest(out).variants) == ["fp32", "int8"]


@pytest.fixture(scope="module")
def default_export(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("default") / "m"
    proc = run_cli("export", "--random-init", "tiny", "--out", str(out))
    return out, proc


def test_default_export_writes_fp32_fused_verified_quietly(default_export) -> None:
    from gpt2_onnx.runtime.manifest import read_manifest

    out, proc = default_export
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(out)
    assert list(manifest.variants) == ["fp32", "fp32-fused"]
    assert manifest.variants["fp32-fused"].graph == "model-fp32-fused.onnx"
    assert manifest.verify["passed"]
    assert {c["variant"] for c in manifest.verify["checks"]} == {"fp32", "fp32-fused"}
    # Only our progress lines reach the terminal (optimum's accelerate notice used to).
    assert "accelerate" not in proc.stderr and "arning" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    stages = [ln for ln in lines if ln.lstrip().startswith("✓")]
    assert len(stages) == 5, proc.stderr
    gen = TextGenerator.load(out, device="cpu")
    assert gen.precision == "fp32-fused"  # the runtime picks the fused variant on CPU


def test_generate_runs_the_fused_variant(default_export) -> None:
    out, _ = default_export
    proc = run_cli("score", str(out), str(Path(__file__)), "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["precision"] == "fp32-fused"
    proc = run_cli("generate", str(out), "Paris will", "--greedy", "--max-new-tokens", "4",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["ids"]) == 4


def test_old_directories_with_model_fp32_onnx_still_load(default_export, tmp_path: Path) -> None:
    """Before the registry, fp32-fused was saved as model-fp32.onnx; its manifest says so."""
    import shutil

    out, _ = default_export
    old = tmp_path / "old"
    shutil.copytree(out, old)
    os.replace(old / "model-fp32-fused.onnx", old / "model-fp32.onnx")
    doc = json.loads((old / "gpt2-onnx.json").read_text())
    doc["variants"]["fp32-fused"]["graph"] = "model-fp32.onnx"
    doc["files"]["model-fp32.onnx"] = doc["files"].pop("model-fp32-fused.onnx")
    (old / "gpt2-onnx.json").write_text(json.dumps(doc))
    new = TextGenerator.load(out, device="cpu", precision="fp32-fused")
    gen = TextGenerator.load(old, device="cpu", precision="fp32-fused")
    assert gen.precision == "fp32-fused"
    assert (gen.generate("Paris will", greedy=True, max_new_tokens=6).ids
            == new.generate("Paris will", greedy=True, max_new_tokens=6).ids)


# ------------------------------------------------------------------------------ device


def test_device_parsing_and_providers() -> None:
    assert parse_device("auto") == ("auto", None)
    assert parse_device("cuda:1") == ("cuda", 1)
    assert parse_device(" CPU ") == ("cpu", None)
    for bad in ("gpu", "cpu:1", "cuda:", "cuda:-1", "cuda1", ""):
        with pytest.raises(ValueError, match="auto, cpu, cuda, cuda:N"):
            parse_device(bad)
    assert resolve_device("cpu") is CPU and CPU.providers() == ["CPUExecutionProvider"]
    gpu1 = Device("cuda", 1)
    assert str(gpu1) == "cuda:1" and str(Device("cuda")) == "cuda"
    assert gpu1.ort_device == "cuda" and gpu1.id == 1
    # CUDA sessions keep TF32 off by default (device.DEFAULT_OPTIONS); options override it.
    assert gpu1.providers() == [("CUDAExecutionProvider", {"device_id": "1", "use_tf32": "0"}),
                                "CPUExecutionProvider"]
    assert gpu1.with_options(use_tf32="1").providers()[0] == (
        "CUDAExecutionProvider", {"device_id": "1", "use_tf32": "1"})
    assert resolve_device(gpu1) is gpu1
    with pytest.raises(ValueError):
        Device("cpu", 1)


def test_device_id_reaches_the_cli(tiny_dir: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime here has the CUDA provider")
    with pytest.raises(DeviceError, match="--device cuda:1"):
        TextGenerator.load(tiny_dir, device="cuda:1")
    proc = run_cli("generate", str(tiny_dir), "x", "--device", "cuda:1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--device cuda:1" in proc.stderr and "onnxruntime-gpu" in proc.stderr


# ------------------------------------------------------------------------------ errors by cause


BREAK_DECODER = """
import numpy as np
from gpt2_onnx.runtime import decoder
def broken(self, *args, **kwargs):
    return np.ones((1, 2)) + np.ones((3,))  # a numpy shape error inside the library
decoder.ConcatDecoder.forward = broken
"""


def test_internal_errors_say_they_are_internal(tiny_dir: Path) -> None:
    args = ("generate", str(tiny_dir), "Paris will", "--precision", "fp32", "--json")
    proc = run_cli(*args, prelude=BREAK_DECODER)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: internal error: ValueError: operands could not be")
    assert "please report" in lines[0] and "--debug" in lines[0]
    debug = run_cli("--debug", *args, prelude=BREAK_DECODER)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    # A user mistake stays a plain one-line error.
    user = run_cli("generate", str(tiny_dir), "x", "--top-p", "7")
    assert user.returncode == 1 and "internal" not in user.stderr
    assert "top_p" in user.stderr and len(user.stderr.strip().splitlines()) == 1


def test_decoder_invariants_are_internal_errors(tiny_dir: Path) -> None:
    assert issubclass(DecoderInputError, InternalError)
    assert issubclass(DecoderInputError, ValueError)  # callers of a decoder may catch it so
    from gpt2_onnx.cli.common import is_user_error

    assert not is_user_error(DecoderInputError("x"))
    assert is_user_error(ModelDirError("x"))
    try:
        np.ones((1, 2)) + np.ones((3,))
    except ValueError as exc:
        assert not is_user_error(exc)  # raised by numpy, not by our validation


def test_load_failures_name_their_cause(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from gpt2_onnx.runtime.session import create_session, load_failure

    def graph(op: str, domain: str, opset: int) -> Path:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        g = helper.make_graph([helper.make_node(op, ["x"], ["y"], domain=domain)], "g", [x], [y])
        imports = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
        path = tmp_path / f"{op}-{opset}.onnx"
        onnx.save(helper.make_model(g, opset_imports=imports), path)
        return path

    with pytest.raises(SessionLoadError, match="lacks"):  # an operator this onnxruntime lacks
        create_session(graph("NoSuchOp", "com.microsoft", 17), CPU)
    with pytest.raises(SessionLoadError, match="lacks"):  # a newer opset
        create_session(graph("Relu", "", 99), CPU)
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ModelDirError, match="damaged"):
        create_session(damaged, CPU)
    oom = load_failure(damaged, CPU, RuntimeError("std::bad_alloc"))
    assert isinstance(oom, SessionLoadError) and "out of memory" in str(oom)
    assert "out of memory" in str(load_failure(damaged, CPU, MemoryError()))


# ------------------------------------------------------------------------------ base install


def test_without_onnxruntime_help_info_and_tokens_work(tiny_dir: Path) -> None:
    help_ = run_cli("--help", prelude=BLOCK_ORT)
    assert help_.returncode == 0, help_.stderr
    assert "gpt2-onnx[cpu]" in help_.stdout and "gpt2-onnx[export]" in help_.stdout
    for cmd in ("generate", "score", "export", "verify", "info", "tokenize", "decode"):
        assert cmd in help_.stdout
    info = run_cli("info", str(tiny_dir), prelude=BLOCK_ORT)
    assert info.returncode == 0 and "variant fp32" in info.stdout, info.stderr
    tok = run_cli("tokenize", str(tiny_dir), "Paris will", prelude=BLOCK_ORT)
    assert tok.returncode == 0 and json.loads(tok.stdout) == [40313, 481], tok.stderr
    dec = run_cli("decode", str(tiny_dir), "40313", "481", prelude=BLOCK_ORT)
    assert dec.returncode == 0 and dec.stdout == "Paris will\n", dec.stderr
    for cmd in (("generate", str(tiny_dir), "x", "--device", "cpu"),
                ("score", str(tiny_dir), str(Path(__file__))), ("bench", str(tiny_dir))):
        proc = run_cli(*cmd, prelude=BLOCK_ORT)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "gpt2-onnx[cpu]" in lines[0], proc.stderr


def test_without_the_export_extra_its_commands_say_what_to_install(tmp_path: Path) -> None:
    prelude = "sys.modules.update(torch=None)"
    help_ = run_cli("--help", prelude=prelude)
    assert help_.returncode == 0 and "export" in help_.stdout and "verify" in help_.stdout
    assert "gpt2-onnx[export]" in help_.stdout
    for args in (("export", "--random-init", "tiny", "--out", str(tmp_path / "m")),
                 ("verify", str(tmp_path), "--steps", "2"), ("export", "--help")):
        proc = run_cli(*args, prelude=prelude)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "pip install" in proc.stderr and "gpt2-onnx[export]" in proc.stderr
    assert list(tmp_path.iterdir()) == []
