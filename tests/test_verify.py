"""verify: passes on fresh exports, fails (naming the check) on damaged weights and on a broken
sampler; its numeric helpers against hand-computed values; the CLI's exit codes and report."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import export_dir
from typer.testing import CliRunner, Result

from gpt2_onnx.export import verify
from gpt2_onnx.runtime.cli import app
from gpt2_onnx.runtime.manifest import check_files, read_manifest

SHORT_PROMPTS = ["Paris will", "London was"]
DAMAGED_WEIGHT = "transformer.h.1.mlp.c_fc.weight"


def cli(*args: str) -> Result:
    """The `gpt2-onnx` app in-process (a wide terminal: one line per message); result.stdout and
    result.stderr apart."""
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})


# --------------------------------------------------------------------------------- numeric units


def test_mean_kl_matches_hand_computed_value() -> None:
    # p = softmax([0, ln 3]) = [1/4, 3/4]; q = uniform -> KL = 1/4 ln(1/2) + 3/4 ln(3/2).
    ref = np.array([[0.0, math.log(3.0)]], dtype=np.float32)
    got = np.zeros((1, 2), dtype=np.float32)
    want = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert verify.mean_kl(ref, got) == pytest.approx(want, rel=1e-5)
    assert verify.mean_kl(ref, ref) == pytest.approx(0.0, abs=1e-7)


def test_abs_diff_and_first_divergence_by_hand() -> None:
    a = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    b = np.array([[1.5, 2.0], [3.0, 3.0]], dtype=np.float32)
    assert verify.abs_diff(a, b) == pytest.approx((1.0, 0.375))
    assert verify.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert verify.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert verify.first_divergence([1, 2], [1, 2, 3]) == 2  # one stopped early (EOS)


# --------------------------------------------------------------------------------- passing


def test_verify_passes_on_fresh_tiny_export(tiny_dir: Path) -> None:
    report = verify.run_verify(tiny_dir, steps=4)
    assert report.passed, report.failed_checks()
    assert [c.check for c in report.checks] == list(verify.CHECKS)
    assert {c.variant for c in report.checks} == {"fp32"}
    # tiny has 256 positions: the 512-token prompt is shortened to leave room for 5 new tokens,
    # and the report says so.
    assert "long-251" in [p["name"] for p in report.prompts]
    assert any("shortened to 251 tokens" in n for n in report.notes)
    # fp32 against fp32: the logits agree far inside the threshold, at prefill and every step.
    for name in (verify.LOGITS_PREFILL, verify.LOGITS_DECODE):
        row = next(c for c in report.checks if c.check == name)
        assert 0 < row.values["max_abs"] < 1e-4


def test_verify_passes_on_odd_shape(odd_dir: Path) -> None:
    # 5 layers, width 128, 512 positions, from a local checkpoint (tiny covers the long prompt).
    report = verify.run_verify(odd_dir, prompts=[*SHORT_PROMPTS, verify.EMOJI_CJK_PROMPT],
                               steps=4)
    assert report.passed, report.failed_checks()
    assert [c.check for c in report.checks] == list(verify.CHECKS)
    assert report.reference == json.dumps(read_manifest(odd_dir).source, sort_keys=True)


def test_export_with_verify_records_summary_and_info_shows_it(tmp_path: Path) -> None:
    out = export_dir(tmp_path / "tiny-verified", random_init="tiny", verify=True)
    manifest = read_manifest(out)
    assert manifest.verify is not None and manifest.verify["passed"] is True
    rows = manifest.verify["checks"]
    assert {r["check"] for r in rows} == set(verify.CHECKS)
    assert all({"variant", "check", "figure", "passed"} <= set(r) for r in rows)
    check_files(out, manifest)  # the summary changed no listed file
    shown = cli("info", str(out))
    assert shown.exit_code == 0, shown.output
    assert "passed" in shown.stdout and "fp32 logits-prefill max" in shown.stdout


def test_prompt_too_long_for_steps_is_refused_before_loading(tiny_dir: Path,
                                                             tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Paris will\n" + "word " * 300 + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"exceed 223 tokens .*n_positions 256"):
        verify.run_verify(tiny_dir, prompts=prompts, steps=32)


def test_reference_of_another_shape_is_refused(tiny_dir: Path, odd_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=r"n_layer 5 \(model directory: 2\)"):
        verify.run_verify(tiny_dir, reference=str(odd_checkpoint), prompts=SHORT_PROMPTS,
                          steps=2)


def test_inexact_variant_and_last_row_logits_are_judged_by_kl(tiny_dir: Path,
                                                                tmp_path: Path) -> None:
    """A manifest listing the fp32 graph a second time as "int8" with io.logits_rows "last":
    verify compares the last prefill row only, gates on KL and top-1 agreement, skips sampling."""
    out = tmp_path / "tiny"
    shutil.copytree(tiny_dir, out)
    doc = json.loads((out / "gpt2-onnx.json").read_text())
    alias = json.loads(json.dumps(doc["variants"]["fp32"]))
    alias["precision"] = "int8"
    alias["io"]["logits_rows"] = "last"
    doc["variants"]["int8"] = alias
    (out / "gpt2-onnx.json").write_text(json.dumps(doc))
    report = verify.run_verify(out, prompts=SHORT_PROMPTS, steps=2, precisions=["int8"])
    assert report.passed, report.failed_checks()
    assert [c.check for c in report.checks] == [c for c in verify.CHECKS if c != verify.SAMPLING]
    prefill = report.checks[0]
    assert prefill.threshold.startswith("mean KL") and prefill.values["mean_kl"] < 1e-6
    greedy = next(c for c in report.checks if c.check == verify.GREEDY)
    assert greedy.values["top1_agreement"] == 1.0


# --------------------------------------------------------------------------------- failing


@pytest.fixture(scope="module")
def damaged_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of tiny with one weight of layer 1 changed and the manifest's hashes refreshed, so
    that nothing but the numerics can notice."""
    import onnx
    from onnx import numpy_helper

    from gpt2_onnx.export.pipeline import refresh_file_entries

    out = tmp_path_factory.mktemp("damaged") / "tiny"
    shutil.copytree(tiny_dir, out)
    graph_path = out / read_manifest(out).variants["fp32"].graph
    model = onnx.load(str(graph_path))
    init = next(i for i in model.graph.initializer if i.name == DAMAGED_WEIGHT)
    weight = numpy_helper.to_array(init).copy()  # [64, 256]
    weight[0, 0] += 1.0
    init.CopyFrom(numpy_helper.from_array(weight, init.name))
    onnx.save(model, str(graph_path))
    refresh_file_entries(out, read_manifest(out)).write(out)
    check_files(out)  # sizes and hashes agree: the damage is invisible to them
    return out


def test_verify_fails_on_damaged_weights(damaged_dir: Path) -> None:
    report = verify.run_verify(damaged_dir, prompts=SHORT_PROMPTS, steps=3)
    assert not report.passed
    failed = report.failed_checks()
    assert "fp32/logits-prefill" in failed and "fp32/logits-decode" in failed
    row = next(c for c in report.checks if c.check == verify.LOGITS_PREFILL)
    assert row.values["max_abs"] > 1e-2  # far beyond fp32 noise


def _broken_sample_token(original):
    """A sampler that picks the (k+1)-th most likely token whenever it samples top-k."""

    def broken(logits, settings, rng, seen=None):
        if settings.is_greedy or settings.top_k is None:
            return original(logits, settings, rng, seen)
        rng.random()  # consume the draw like the real one
        return int(np.argsort(-logits, kind="stable")[settings.top_k])

    return broken


@pytest.mark.parametrize("where", ["runtime-and-verify", "runtime-loop-only"])
def test_verify_fails_on_broken_sampler(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                        where: str) -> None:
    from gpt2_onnx.runtime import engine, sampling

    broken = _broken_sample_token(sampling.sample_token)
    # The name the loop calls: the per-row step (engine.Sequence) every front end shares.
    monkeypatch.setattr(engine, "sample_token", broken)
    if where == "runtime-and-verify":  # consistently broken everywhere: only top-k notices
        monkeypatch.setattr(sampling, "sample_token", broken)
    report = verify.run_verify(tiny_dir, prompts=SHORT_PROMPTS, steps=3)
    assert report.failed_checks() == ["fp32/top-k-sampling"]
    row = next(c for c in report.checks if c.check == verify.SAMPLING)
    assert row.values["outside_top_k"] > 0  # tokens PyTorch's top-k does not allow


# --------------------------------------------------------------------------------- CLI


def test_cli_verify_writes_report_and_exits_zero(tiny_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(SHORT_PROMPTS) + "\n", encoding="utf-8")
    out = tmp_path / "out.json"
    res = cli("verify", str(tiny_dir), "--prompts", str(prompts), "--steps", "3",
              "--report", str(out))
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["passed"] is True and doc["failed"] == []
    assert [c["check"] for c in doc["checks"]] == list(verify.CHECKS)
    assert "logits-prefill" in res.stderr  # the table


def test_cli_verify_on_damaged_dir_exits_nonzero_naming_check(damaged_dir: Path,
                                                              tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(SHORT_PROMPTS) + "\n", encoding="utf-8")
    res = cli("verify", str(damaged_dir), "--prompts", str(prompts), "--steps", "3")
    assert res.exit_code != 0
    lines = [ln for ln in res.stderr.splitlines() if "verify failed" in ln]
    assert len(lines) == 1 and "fp32/logits-prefill" in lines[0]


# --------------------------------------------------------------------------------- real weights


@pytest.mark.network
@pytest.mark.slow
def test_real_gpt2_large_greedy_matches_walkthrough(tmp_path: Path) -> None:
    from gpt2_onnx.runtime.generator import TextGenerator

    out = export_dir(tmp_path / "gpt2-large", source="gpt2-large")
    gen = TextGenerator.load(out, device="cpu", precision="fp32")
    res = gen.generate("Paris will", greedy=True, max_new_tokens=16)
    assert (res.prompt + res.text).startswith(
        "Paris will be the first city in the world to have a fully automated train system")
