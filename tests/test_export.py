"""Export (issue 2): the model directory against independent references.

References: hashlib for the manifest's hashes, the `onnx` package for the graph's names,
transformers for the logits, GPT-2's published token ids for the tokenizer. Error tests check the
message names the problem and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2_onnx.export.pipeline import ExportError, ExportOptions, run_export
from gpt2_onnx.runtime.generator import TextGenerator
from gpt2_onnx.runtime.manifest import MANIFEST_NAME, read_manifest

TMP_PREFIX = ".gpt2-onnx-tmp-"
HUB_FAIL_WITHIN_S = 10
PROMPT_IDS = [40313, 481, 307, 257, 1295, 286, 262, 995, 13, 383, 3139, 318]  # in-vocab ids


@pytest.fixture(scope="module", autouse=True)
def _torch_one_thread(torch_one_thread):
    """transformers is only the reference here (see conftest.torch_one_thread)."""


def manifest_doc(model_dir: Path) -> dict:
    return json.loads((model_dir / MANIFEST_NAME).read_text())


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def litter(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(TMP_PREFIX))


# ------------------------------------------------------------------------------ the directory


def test_manifest_matches_files(tiny_dir: Path) -> None:
    doc = manifest_doc(tiny_dir)
    on_disk = {p.name for p in tiny_dir.iterdir() if p.is_file() and p.name != MANIFEST_NAME}
    assert set(doc["files"]) == on_disk
    for name, entry in doc["files"].items():
        path = tiny_dir / name
        assert entry["size"] == path.stat().st_size, name
        assert entry["sha256"] == sha256_of(path), name
    for expected in ("model.onnx", "tokenizer.json", "config.json", "generation_config.json"):
        assert expected in on_disk
    assert doc["format_version"] == 1
    assert doc["source"] == {"kind": "random-init", "preset": "tiny", "seed": 0}
    assert doc["dims"] == {"n_layer": 2, "n_head": 4, "head_dim": 16, "n_embd": 64,
                           "n_positions": 256, "vocab_size": 50257, "bos_token_id": 50256,
                           "eos_token_id": 50256}
    for pkg in ("torch", "transformers", "optimum", "onnx"):
        assert doc["versions"].get(pkg), pkg


def test_manifest_dims_come_from_the_checkpoint(odd_dir: Path, odd_reference) -> None:
    dims = read_manifest(odd_dir).dims
    cfg = odd_reference.config
    assert (dims.n_layer, dims.n_head, dims.n_embd, dims.n_positions, dims.head_dim) == (
        cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions, cfg.n_embd // cfg.n_head)
    assert manifest_doc(odd_dir)["source"]["kind"] == "local"


@pytest.mark.parametrize("which", ["tiny_dir", "odd_dir"])
def test_graph_io_names_match_manifest(which: str, request: pytest.FixtureRequest) -> None:
    import onnx

    model_dir: Path = request.getfixturevalue(which)
    manifest = read_manifest(model_dir)
    variant = manifest.variants["fp32"]
    io = variant.io
    n_layer = manifest.dims.n_layer
    proto = onnx.load(str(model_dir / variant.graph), load_external_data=False)
    graph_inputs = {i.name for i in proto.graph.input}
    graph_outputs = {o.name for o in proto.graph.output}
    past = io.kv_inputs(n_layer)
    present = io.kv_outputs(n_layer)
    assert len(past) == len(present) == 2 * n_layer
    # Hand-written expectation of optimum's names (docs/facts.md), layer by layer.
    for i in range(n_layer):
        assert f"past_key_values.{i}.key" in past and f"past_key_values.{i}.value" in past
        assert f"present.{i}.key" in present and f"present.{i}.value" in present
    assert graph_inputs == {io.input_ids, io.attention_mask, io.position_ids, *past}
    # logits_last: the last row only ([batch, vocab]), added after optimum's export.
    assert io.logits_last == "logits_last"
    assert graph_outputs == {io.logits, io.logits_last, *present}
    assert (variant.data == ()) or all((model_dir / d).is_file() for d in variant.data)


def runtime_prefill_logits(model_dir: Path, ids: list[list[int]]) -> np.ndarray:
    """Full logits [b, n, vocab] from the runtime's decoder (no padding)."""
    gen = TextGenerator.load(model_dir, device="cpu", threads=1)
    batch, n = len(ids), len(ids[0])
    input_ids = np.array(ids, dtype=np.int64)  # [b, n]
    mask = np.ones((batch, n), dtype=np.int64)  # [b, n]
    positions = np.tile(np.arange(n, dtype=np.int64), (batch, 1))  # [b, n]
    cache = gen.decoder.start(batch, n)
    logits, _ = gen.decoder.forward(cache, input_ids, mask, positions, all_logits=True)
    return logits


def reference_logits(model, ids: list[list[int]]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("which", ["tiny", "odd"])
def test_prefill_logits_match_transformers(which: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(f"{which}_dir")
    reference = request.getfixturevalue(f"{which}_reference")
    rng = np.random.default_rng(3)
    ids = [PROMPT_IDS, rng.integers(0, 50257, len(PROMPT_IDS)).tolist()]
    ours = runtime_prefill_logits(model_dir, ids)
    ref = reference_logits(reference, ids)
    assert ours.shape == ref.shape == (2, len(PROMPT_IDS), 50257)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # The logits must actually vary (a broken graph returning zeros would pass trivially).
    assert ref.std() > 0.1


@pytest.mark.parametrize("which", ["tiny_dir", "odd_dir"])
def test_directory_tokenizer_gives_gpt2_ids(which: str, request: pytest.FixtureRequest) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(request.getfixturevalue(which) / "tokenizer.json"))
    # Published GPT-2 ids (the project's own spec, independent of this code).
    assert tok.encode("Paris will", add_special_tokens=False).ids == [40313, 481]
    assert tok.encode("paris", add_special_tokens=False).ids == [1845, 271]
    assert tok.encode("London was", add_special_tokens=False).ids == [23421, 373]
    assert tok.decode([40313]) == "Paris"
    assert tok.token_to_id("<|endoftext|>") == 50256


# ------------------------------------------------------------------------------ overwrite, atomic


def test_existing_output_is_refused_without_force(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--force"):
        run_export(ExportOptions(random_init="tiny", out=out, verify=False))
    assert (out / "keep.txt").read_text() == "mine"
    assert litter(tmp_path) == []


def old_model_dir(tiny_dir: Path, out: Path) -> Path:
    """An existing model directory (a copy of the tiny export, seed 0)."""
    shutil.copytree(tiny_dir, out)
    return out


def test_force_replaces_existing_output(tmp_path: Path, tiny_dir: Path) -> None:
    out = old_model_dir(tiny_dir, tmp_path / "model")
    result = run_export(ExportOptions(random_init="tiny", seed=1, out=out, verify=False,
                                      force=True))
    assert result == out
    assert read_manifest(out).source == {"kind": "random-init", "preset": "tiny", "seed": 1}
    assert litter(tmp_path) == []


def test_force_refuses_a_directory_that_is_not_a_model(tmp_path: Path) -> None:
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a gpt2-onnx model directory"):
        run_export(ExportOptions(random_init="tiny", out=out, verify=False, force=True))
    assert (out / "notes.txt").read_text() == "mine"


STAGES = ["load", "export", "write", "rename"]


@pytest.mark.parametrize("stage", STAGES)
def test_interrupted_export_leaves_nothing(tmp_path: Path, stage: str) -> None:
    out = tmp_path / "model"

    def interrupt(name: str) -> None:
        if name == stage:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_export(ExportOptions(random_init="tiny", out=out, verify=False, on_stage=interrupt))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_forced_export_keeps_old_directory(tmp_path: Path, tiny_dir: Path) -> None:
    out = old_model_dir(tiny_dir, tmp_path / "model")
    before = sorted(p.name for p in out.iterdir())
    manifest_before = (out / MANIFEST_NAME).read_bytes()

    def interrupt(name: str) -> None:
        if name == "rename":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_export(ExportOptions(random_init="tiny", out=out, verify=False, force=True,
                                 on_stage=interrupt))
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / MANIFEST_NAME).read_bytes() == manifest_before
    assert litter(tmp_path) == []


# ------------------------------------------------------------------------------ errors


def test_unknown_preset_lists_presets(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        run_export(ExportOptions(random_init="gpt5", out=tmp_path / "m", verify=False))
    msg = str(info.value)
    assert "gpt5" in msg
    for preset in ("tiny", "distilgpt2", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        assert preset in msg
    assert list(tmp_path.iterdir()) == []


def test_local_dir_that_is_not_gpt2_names_model_type(tmp_path: Path) -> None:
    src = tmp_path / "bert-ckpt"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(Exception) as info:
        run_export(ExportOptions(source=str(src), out=tmp_path / "m", verify=False))
    assert "bert" in str(info.value) and "gpt2" in str(info.value)
    assert not (tmp_path / "m").exists() and litter(tmp_path) == []


def test_not_enough_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpt2_onnx.export import pipeline

    real = pipeline.shutil.disk_usage

    def tiny_disk(path):  # noqa: ANN001, ANN202 - mirrors shutil.disk_usage
        usage = real(path)
        return type(usage)(usage.total, usage.total - 1000, 1000)

    monkeypatch.setattr(pipeline.shutil, "disk_usage", tiny_disk)
    with pytest.raises(ExportError) as info:
        run_export(ExportOptions(random_init="tiny", out=tmp_path / "m", verify=False))
    msg = str(info.value)
    assert "disk" in msg and "GB" in msg and "--out" in msg
    assert list(tmp_path.iterdir()) == []


def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def run_cli(*args: str, prelude: str = "", timeout: float = 120, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    """`gpt2-onnx ARGS` in a fresh interpreter; `prelude` runs first (e.g. to block modules)."""
    code = (f"import sys\n{prelude}\nsys.argv = ['gpt2-onnx', *{list(args)!r}]\n"
            "from gpt2_onnx.cli import main\nmain()\n")
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


@pytest.mark.skipif(_hub_reachable(), reason="the hub is reachable here; this tests offline")
def test_hub_unreachable_fails_fast_with_offline_alternatives(tmp_path: Path) -> None:
    env_prelude = "import os; os.environ.pop('HF_HUB_OFFLINE', None)"
    start = time.monotonic()
    proc = run_cli("export", "gpt2-large", "--out", str(tmp_path / "m"), prelude=env_prelude,
                   timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    # The network check itself takes milliseconds; the bound is interpreter start + imports on a
    # shared 2-core machine (transformers alone takes 3-8 s to import here).
    assert elapsed < HUB_FAIL_WITHIN_S, f"took {elapsed:.1f} s to notice the hub is unreachable"
    err = proc.stderr
    assert "Traceback" not in err + proc.stdout
    assert "--random-init" in err and "local" in err
    assert list(tmp_path.iterdir()) == []


def test_export_extra_missing_says_what_to_install(tmp_path: Path) -> None:
    proc = run_cli("export", "--random-init", "tiny", "--out", str(tmp_path / "m"),
                   "--no-verify", prelude="sys.modules['torch'] = None")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in out
    assert "pip install" in out and "gpt2-onnx[export]" in out
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    existing = tmp_path / "m"
    existing.mkdir()
    proc = run_cli("export", "--random-init", "tiny", "--out", str(existing), "--no-verify")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "error" in ln]
    assert len(lines) == 1 and "--force" in lines[0]
    proc = run_cli("export", "--random-init", "nope", "--out", str(tmp_path / "x"),
                   "--no-verify")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "nope" in proc.stderr and "gpt2-large" in proc.stderr
