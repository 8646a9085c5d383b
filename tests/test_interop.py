"""Interop (issue 18): onnxruntime-genai and optimum run our model directories unchanged.

onnxruntime-genai (C/C#/Java/... apps) loads the directory through the genai_config.json export
writes; optimum's ORTModelForCausalLM loads optimum's own fp32 graph. Both are test dependencies,
never runtime ones: the last tests prove the runtime imports neither and its install lists neither.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
from conftest import export_dir
from typer.testing import CliRunner

from gpt2_onnx.cli import app
from gpt2_onnx.export import genai
from gpt2_onnx.runtime import TextGenerator
from gpt2_onnx.runtime.manifest import check_files, read_manifest

og = pytest.importorskip("onnxruntime_genai")

REPO = Path(__file__).resolve().parents[1]
EOS = 50256
ALL = ("fp32", "fp32-fused", "int8", "int4")
NEW = 12
# Prompts of different lengths (ids below the vocab, none equal to the pad/eos id).
PROMPTS = [[464, 2068, 7586, 21831], [40, 588, 11, 257, 1310, 3290, 286, 262, 3797, 13],
           [50, 60], list(range(1000, 1023))]


@pytest.fixture(scope="module")
def tiny_all(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny (seed 0, the `tiny_reference` weights) with every CPU variant; inline weights."""
    return export_dir(tmp_path_factory.mktemp("interop") / "tiny-all", random_init="tiny",
                      precisions=ALL)


@pytest.fixture(scope="module")
def odd_fused(tmp_path_factory: pytest.TempPathFactory, odd_checkpoint: Path) -> Path:
    """The odd-shape checkpoint (5 layers, 4 heads, head_dim 32) with fused variants whose
    weights go to external data files, as gpt2-large's do."""
    from gpt2_onnx.export import graph_edit

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(graph_edit, "EXTERNAL_DATA_BYTES", 0)
        return export_dir(tmp_path_factory.mktemp("interop-odd") / "odd-fused",
                          source=str(odd_checkpoint), precisions=("fp32", "fp32-fused", "int4"))


def _with_genai(model_dir: Path, variant: str, dest: Path) -> Path:
    """A copy of `model_dir` whose genai_config.json names `variant`: what `--genai-variant`
    writes (same function), without exporting again."""
    from dataclasses import replace

    from gpt2_onnx.export.pipeline import refresh_file_entries

    shutil.copytree(model_dir, dest)
    manifest = read_manifest(dest)
    files = genai.write_genai_files(dest, manifest.dims, manifest.variants[variant])
    refresh_file_entries(dest, replace(manifest, genai=files.to_json())).write(dest)
    return dest


def _ours(model_dir: Path, precision: str, prompts: list[list[int]]) -> list[list[int]]:
    """Our greedy tokens with the prompts as one static batch, as onnxruntime-genai runs them.
    (On the engine, rows join and prefill in chunks: the same math in other matrix shapes, which
    MatMulNBits' int8-activation kernels may round differently at a near-tie; the engine's own
    tests check it against lone runs.)"""
    gen = TextGenerator.load(model_dir, device="cpu", precision=precision)
    gen.engine_slots = 0
    return [r.ids for r in gen.generate_ids(prompts, max_new_tokens=NEW, greedy=True)]


def _genai(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    return genai.genai_greedy(model_dir, prompts, NEW, pad_token_id=EOS, eos_token_id=EOS)


def _transformers_greedy(model, ids: list[int]) -> list[int]:
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                            dtype=torch.long),
                             max_new_tokens=NEW, do_sample=False, pad_token_id=EOS)
    return out[0, len(ids):].tolist()


# ---------------------------------------------------------------------------- what export writes


def test_export_writes_and_hashes_genai_config_for_the_fastest_variant(tiny_all: Path) -> None:
    manifest = read_manifest(tiny_all)
    assert manifest.genai == {"variant": "int4", "config": "genai_config.json",
                              "graph": "model-int4-genai.onnx"}
    assert {"genai_config.json", "model-int4-genai.onnx"} <= set(manifest.files)
    check_files(tiny_all, manifest)  # sizes and sha256 match
    doc = json.loads((tiny_all / "genai_config.json").read_text())
    model, search = doc["model"], doc["search"]
    dec = model["decoder"]
    # tiny: 2 layers, 4 heads, width 64, 256 positions (export/presets.py).
    assert (dec["num_hidden_layers"], dec["num_attention_heads"], dec["num_key_value_heads"],
            dec["head_size"], dec["hidden_size"]) == (2, 4, 4, 16, 64)
    assert model["context_length"] == search["max_length"] == 256
    assert (model["type"], model["vocab_size"]) == ("decoder", 50257)
    assert model["eos_token_id"] == model["bos_token_id"] == model["pad_token_id"] == EOS
    assert dec["filename"] == "model-int4-genai.onnx"
    assert dec["inputs"]["past_key_names"] == "past_key.%d"
    assert dec["outputs"]["present_value_names"] == "present_value.%d"
    # generation_config.json names no sampling settings: transformers' defaults (greedy).
    assert search["do_sample"] is False and search["top_k"] == 50 and search["top_p"] == 1.0
    assert search["past_present_share_buffer"] is True  # GroupQueryAttention, in place


def test_genai_graph_takes_a_mask_and_the_runtime_graph_is_unchanged(tiny_all: Path) -> None:
    import onnxruntime as ort

    def inputs(name: str) -> list[str]:
        session = ort.InferenceSession(str(tiny_all / name), providers=["CPUExecutionProvider"])
        return [i.name for i in session.get_inputs()]

    fused_inputs = inputs("model-int4.onnx")
    genai_inputs = inputs("model-int4-genai.onnx")
    assert {"seqlens_k", "total_sequence_length", "logits_index"} <= set(fused_inputs)
    assert "attention_mask" not in fused_inputs
    assert genai_inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert not {"seqlens_k", "total_sequence_length", "logits_index"} & set(genai_inputs)
    assert genai_inputs[3:] == fused_inputs[5:]  # the KV pairs, same names and order


def test_search_defaults_come_from_generation_config() -> None:
    doc = genai.genai_config(_dims(), _fp32_variant(), "model.onnx",
                             {"do_sample": True, "top_k": 7, "top_p": 0.9, "temperature": 0.7,
                              "repetition_penalty": 1.3, "pad_token_id": 3}, False)
    s = doc["search"]
    assert (s["do_sample"], s["top_k"], s["top_p"], s["temperature"],
            s["repetition_penalty"]) == (True, 7, 0.9, 0.7, 1.3)
    assert doc["model"]["pad_token_id"] == 3 and s["past_present_share_buffer"] is False
    assert doc["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"


def _dims():
    from gpt2_onnx.runtime.manifest import ModelDims

    return ModelDims(n_layer=3, n_head=2, head_dim=8, n_embd=16, n_positions=32,
                     vocab_size=100, bos_token_id=99, eos_token_id=99)


def _fp32_variant():
    from gpt2_onnx.runtime.manifest import Variant, VariantIO

    return Variant("fp32", "model.onnx", (), "float32", VariantIO())


def test_choose_genai_variant_prefers_the_measured_order_and_refuses_bad_choices() -> None:
    assert genai.choose_genai_variant(["fp32"]) == "fp32"
    assert genai.choose_genai_variant(["fp32", "fp32-fused"]) == "fp32-fused"
    assert genai.choose_genai_variant(["fp32", "int8", "fp16"]) == "int8"
    assert genai.choose_genai_variant(["fp32", "int8", "int4"]) == "int4"
    assert genai.choose_genai_variant(["fp32", "int4"], "fp32") == "fp32"
    with pytest.raises(ValueError, match="'int8' is not exported; add it to --precision"):
        genai.choose_genai_variant(["fp32", "int4"], "int8")
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        genai.choose_genai_variant(["fp32", "fp16"], "fp16")


def test_cli_genai_variant_option(tmp_path: Path) -> None:
    out = tmp_path / "tiny-ff"
    res = CliRunner().invoke(app, ["export", "--random-init", "tiny", "--out", str(out),
                                   "--precision", "fp32,fp32-fused", "--genai-variant",
                                   "fp32-fused", "--no-verify"])
    assert res.exit_code == 0, res.output
    manifest = read_manifest(out)
    assert manifest.genai is not None and manifest.genai["variant"] == "fp32-fused"
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"][
        "filename"] == "model-fp32-fused-genai.onnx"
    check_files(out, manifest)
    shown = CliRunner().invoke(app, ["info", str(out)], env={"COLUMNS": "300"})
    assert "genai_config.json runs fp32-fused (model-fp32-fused-genai.onnx)" in shown.stdout
    bad = CliRunner().invoke(app, ["export", "--random-init", "tiny", "--out",
                                   str(tmp_path / "nope"), "--genai-variant", "int8",
                                   "--no-verify"])
    assert bad.exit_code != 0
    assert "genai_variant 'int8' is not exported" in bad.output
    assert not (tmp_path / "nope").exists()


# ---------------------------------------------------------------------------- genai runs them


@pytest.mark.parametrize("variant", ALL)
def test_genai_matches_the_runtime_on_every_variant_tiny(tiny_all: Path, tmp_path: Path,
                                                         variant: str, tiny_reference,
                                                         torch_one_thread) -> None:
    model_dir = _with_genai(tiny_all, variant, tmp_path / variant)
    ours_alone = [_ours(tiny_all, variant, [p])[0] for p in PROMPTS]
    ours_batch = _ours(tiny_all, variant, PROMPTS)
    genai_alone = [_genai(model_dir, [p])[0] for p in PROMPTS]
    genai_batch = _genai(model_dir, PROMPTS)  # one batch, four lengths
    assert genai_alone == ours_alone
    assert genai_batch == ours_batch
    assert all(len(ids) == NEW for ids in genai_batch)
    if variant in ("fp32", "fp32-fused"):  # exact variants: transformers' tokens too
        assert genai_alone == [_transformers_greedy(tiny_reference, p) for p in PROMPTS]


@pytest.mark.parametrize("variant", ["fp32", "fp32-fused", "int4"])
def test_genai_matches_the_runtime_on_odd_shape_with_external_data(odd_fused: Path,
                                                                  tmp_path: Path,
                                                                  variant: str) -> None:
    model_dir = _with_genai(odd_fused, variant, tmp_path / variant)
    graph = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"][
        "filename"]
    if variant != "fp32":
        # The genai graph references its variant's data file: no second copy of the weights.
        data = read_manifest(odd_fused).variants[variant].data
        assert data and (model_dir / graph).stat().st_size < 200_000
        from gpt2_onnx.runtime.manifest import graph_external_data

        assert graph_external_data(model_dir / graph) == list(data)
    assert _genai(model_dir, PROMPTS) == _ours(odd_fused, variant, PROMPTS)
    assert [_genai(model_dir, [p])[0] for p in PROMPTS[:2]] == [
        _ours(odd_fused, variant, [p])[0] for p in PROMPTS[:2]]


def test_verify_checks_genai_and_catches_a_wrong_graph(tiny_all: Path, tmp_path: Path) -> None:
    from gpt2_onnx.export import verify

    good = _with_genai(tiny_all, "fp32-fused", tmp_path / "good")
    report = verify.run_verify(good, prompts=["Paris will", "London was"], steps=4,
                               precisions=["fp32-fused"])
    row = next(c for c in report.checks if c.check == verify.GENAI)
    assert row.passed and row.figure == "identical", row
    assert "transformers" in row.threshold  # exact variant: checked against PyTorch too
    # A config naming another graph (int8's) than the variant the manifest says: caught.
    bad = _with_genai(tiny_all, "fp32-fused", tmp_path / "bad")
    manifest = read_manifest(bad)
    genai.write_genai_graph(bad, manifest.variants["int8"])
    doc = json.loads((bad / "genai_config.json").read_text())
    doc["model"]["decoder"]["filename"] = "model-int8-genai.onnx"
    (bad / "genai_config.json").write_text(json.dumps(doc))
    from gpt2_onnx.export.pipeline import refresh_file_entries

    refresh_file_entries(bad, manifest).write(bad)  # consistent, but wrong
    report = verify.run_verify(bad, prompts=["Paris will", "London was"], steps=8,
                               precisions=["fp32-fused"])
    row = next(c for c in report.checks if c.check == verify.GENAI)
    assert not row.passed and "diverges" in row.figure
    assert report.failed_checks() == ["fp32-fused/onnxruntime-genai"]


# ---------------------------------------------------------------------------- optimum


def test_optimum_loads_the_directory_and_gives_our_fp32_tokens(tiny_all: Path) -> None:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(tiny_all)  # picks model.onnx among the graphs
    width = max(len(p) for p in PROMPTS)
    ids = torch.full((len(PROMPTS), width), EOS)
    mask = torch.zeros((len(PROMPTS), width), dtype=torch.long)
    for row, p in enumerate(PROMPTS):  # left padding, as transformers batches
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                         do_sample=False, pad_token_id=EOS)
    assert out[:, width:].tolist() == _ours(tiny_all, "fp32", PROMPTS)


# ---------------------------------------------------------------------------- the boundary


def test_runtime_install_lists_neither_genai_nor_optimum() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = [*project["dependencies"], *project["optional-dependencies"]["cpu"],
               *project["optional-dependencies"]["gpu"]]
    assert not [d for d in runtime if "genai" in d or "optimum" in d]
    test_extra = " ".join(project["optional-dependencies"]["test"])
    assert "onnxruntime-genai" in test_extra and "optimum" in test_extra


def test_runtime_runs_with_genai_and_optimum_blocked(tiny_all: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        sys.modules.update(onnxruntime_genai=None, optimum=None)
        from gpt2_onnx.runtime import TextGenerator
        import gpt2_onnx.cli
        for precision in {list(ALL)!r}:
            gen = TextGenerator.load({str(tiny_all)!r}, device="cpu", precision=precision)
            gen.generate(["Paris will", "a"], max_new_tokens=3, greedy=True)
        print(sorted(m for m, mod in sys.modules.items() if mod is not None  # None: blocked
                     and m.split(".")[0] in ("onnxruntime_genai", "optimum")))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"

