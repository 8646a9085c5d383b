"""verify: passes on fresh exports, fails (naming the check) on damaged weights and on a broken
sampler; its numeric helpers against hand-computed values; the CLI's exit codes and report."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    export_dir,
    invoke,
    one_line_error,
    run_cli,
)
from typer.testing import CliRunner, Result

from gpt2_onnx.cli import app
from gpt2_onnx.export import verify
from gpt2_onnx.runtime import manifest as mf
from gpt2_onnx.runtime.generator import TextGenerator
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
    verify compares the last prefill row only, gates on KL, max abs and top-1 agreement, and
    shows sampling as not run."""
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
    # The genai config names fp32, which is not checked here: no genai row.
    assert [c.check for c in report.checks] == [c for c in verify.CHECKS if c != verify.GENAI]
    sampling = next(c for c in report.checks if c.check == verify.SAMPLING)
    assert sampling.status == "not run" and not sampling.essential  # does not decide
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


def _damage(src: Path, dst: Path, precision: str, initializer: str, factor: float) -> Path:
    """A copy of `src` with one initializer of `precision`'s graph multiplied by `factor` and the
    manifest's hashes refreshed (only the numerics can notice)."""
    import onnx
    from onnx import numpy_helper

    from gpt2_onnx.export.pipeline import refresh_file_entries

    shutil.copytree(src, dst)
    graph_path = dst / read_manifest(dst).variants[precision].graph
    model = onnx.load(str(graph_path))
    init = next(i for i in model.graph.initializer if i.name == initializer)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor),
                                          init.name))
    onnx.save(model, str(graph_path))
    refresh_file_entries(dst, read_manifest(dst)).write(dst)
    check_files(dst)
    return dst


def _set_manifest(model_dir: Path, edit) -> None:
    path = model_dir / "gpt2-onnx.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_verify_fails_on_damaged_weights(damaged_dir: Path) -> None:
    report = verify.run_verify(damaged_dir, prompts=SHORT_PROMPTS, steps=3)
    assert not report.passed
    failed = report.failed_checks()
    assert "fp32/logits-prefill" in failed and "fp32/logits-decode" in failed
    row = next(c for c in report.checks if c.check == verify.LOGITS_PREFILL)
    assert row.values["max_abs"] > 1e-2  # far beyond fp32 noise


def test_fp32_layer_off_by_a_small_amount_fails_at_the_real_limit(tiny_dir: Path,
                                                                   tmp_path: Path) -> None:
    """One layer's MLP weight 0.1 % too large: logits move by ~5e-3, far less than the +1.0
    damage above, and verify's fp32 limit (the package's) catches it."""
    out = _damage(tiny_dir, tmp_path / "tiny", "fp32", DAMAGED_WEIGHT, 1.001)
    report = verify.run_verify(out, prompts=SHORT_PROMPTS, steps=3)
    limit = verify.THRESHOLDS["fp32"]["logits_max_abs"]
    row = next(c for c in report.checks if c.check == verify.LOGITS_PREFILL)
    assert not row.passed and limit < row.values["max_abs"] < 10 * limit
    assert "fp32/logits-prefill" in report.failed_checks() and not report.passed


def test_manifest_cannot_loosen_the_limits(damaged_dir: Path, tmp_path: Path) -> None:
    """A directory whose manifest says logits_max_abs 1e9 still fails a damaged model: the
    package's limit applies, and the looser manifest value is reported."""
    out = tmp_path / "tiny"
    shutil.copytree(damaged_dir, out)

    def loosen(doc):
        doc["variants"]["fp32"]["thresholds"] = {"logits_max_abs": 1e9,
                                                 "top1_agreement_min": 0.0}
    _set_manifest(out, loosen)
    report = verify.run_verify(out, prompts=SHORT_PROMPTS, steps=3)
    assert not report.passed and "fp32/logits-prefill" in report.failed_checks()
    row = next(c for c in report.checks if c.check == verify.LOGITS_PREFILL)
    assert row.threshold == f"max abs <= {verify.THRESHOLDS['fp32']['logits_max_abs']!r}"
    notes = [n for n in report.notes if "looser than the package's" in n]
    assert len(notes) == 2 and any("logits_max_abs 1000000000.0" in n for n in notes)


def test_unknown_precision_is_an_error_not_another_precisions_limits(tiny_dir: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    shutil.copytree(tiny_dir, out)

    def add_alias(doc):
        alias = json.loads(json.dumps(doc["variants"]["fp32"]))
        alias["precision"] = "fp8"
        doc["variants"]["fp8"] = alias
    _set_manifest(out, add_alias)
    with pytest.raises(ValueError, match=r"'fp8'.*known: fp32"):
        verify.run_verify(out, prompts=SHORT_PROMPTS, steps=2, precisions=["fp8"])


# --------------------------------------------------------------------------------- gates (units)


def _result(top1: list[bool], gaps: list[float], decode: int = 2, max_abs: float = 0.0,
            kl: float = 0.0) -> verify._PromptResult:
    """A prompt's figures as teacher_forced would report them."""
    return verify._PromptResult("p", (max_abs, 0.0), kl, [(max_abs, 0.0)] * decode,
                                [kl] * decode, top1, gaps, (0.0, 0.0), 0.0, [1, 2, 3])


def test_inexact_logits_gated_on_max_abs_as_well_as_kl() -> None:
    limits = verify.THRESHOLDS["int8"]
    gate = verify._Gate(limits)
    tiny_kl = limits["mean_kl_max"] / 10
    assert gate.logits_ok(limits["logits_max_abs"], tiny_kl)
    assert not gate.logits_ok(limits["logits_max_abs"] * 1.01, tiny_kl)  # KL alone would pass
    assert not gate.logits_ok(0.0, limits["mean_kl_max"] * 1.01)
    assert not gate.logits_ok(float("nan"), tiny_kl) and not gate.logits_ok(0.0, float("nan"))
    rows = verify.logits_checks("int8", gate, [_result([True] * 3, [5.0] * 3,
                                                      max_abs=limits["logits_max_abs"] * 2,
                                                      kl=tiny_kl)])
    assert [r.passed for r in rows] == [False, False]
    assert rows[0].threshold == (f"mean KL <= {limits['mean_kl_max']!r} and max abs <= "
                                 f"{limits['logits_max_abs']!r}")


def test_inexact_greedy_gated_on_decisive_top1() -> None:
    gate = verify._Gate(verify.THRESHOLDS["int8"])
    margin = verify.THRESHOLDS["int8"]["top1_margin"]
    refs = [verify.RefRun(np.zeros((1, 4), np.float32), [1, 2, 3], np.zeros((3, 4), np.float32))]
    # A flip at a near-tie does not count; a flip at a decisive step does.
    near_tie = verify.greedy_check("int8", gate, [_result([True, False, True],
                                                          [1.0, margin / 2, 1.0])], refs)
    assert near_tie.passed and near_tie.values["decisive_steps"] == 2
    decisive = verify.greedy_check("int8", gate, [_result([True, False, True],
                                                          [1.0, margin * 2, 1.0])], refs)
    assert not decisive.passed and decisive.values["decisive_agreement"] == pytest.approx(2 / 3)


def test_a_check_that_did_not_run_is_never_a_pass() -> None:
    gate = verify._Gate(verify.THRESHOLDS["int8"])
    margin = verify.THRESHOLDS["int8"]["top1_margin"]
    refs = [verify.RefRun(np.zeros((1, 4), np.float32), [1], np.zeros((1, 4), np.float32))]
    # EOS right after the prefill: no decode step, and no step with a decisive top-2 gap.
    results = [_result([True], [margin / 2], decode=0)]
    decode = verify.logits_checks("int8", gate, results)[1]
    greedy = verify.greedy_check("int8", gate, results, refs)
    for row in (decode, greedy):
        assert (row.ran, row.passed, row.status, row.figure) == (False, False, "not run",
                                                                 "not run")
    report = verify.VerifyReport("d", "r", 1, "cpu", [], checks=[decode])
    assert not report.passed and report.failed_checks() == ["int8/logits-decode (not run)"]
    # A check that does not apply to a variant (sampling equality of an inexact one) is shown as
    # not run and does not decide; the variant still needs a check that ran and passed.
    skipped = verify.not_run("int8", verify.SAMPLING, "-", "inexact", essential=False)
    assert not verify.VerifyReport("d", "r", 1, "cpu", [], checks=[skipped]).passed
    ok = verify.Check("int8", verify.CACHE, "max 0", "-", True)
    assert verify.VerifyReport("d", "r", 1, "cpu", [], checks=[ok, skipped]).passed
    assert verify.VerifyReport("d", "r", 1, "cpu", [], checks=[]).passed is False


def test_limits_are_printed_unrounded() -> None:
    gate = verify._Gate({**verify.THRESHOLDS["int4"], "mean_kl_max": 1.5e-3})
    assert "mean KL <= 0.0015" in gate.logits_threshold()  # was shown as "2e-03"


def test_every_limit_is_used_and_none_is_dead() -> None:
    """Each key of the package's limits is read by verify (ppl_change_max is gone)."""
    used = set(verify.LOOSER_WHEN_LARGER)
    for precision, limits in verify.THRESHOLDS.items():
        assert set(limits) <= used, precision
        assert "ppl_change_max" not in limits


def test_thresholds_are_reproducible_from_bench_results() -> None:
    """runtime/thresholds.json is exactly what bench/derive_thresholds.py computes from the
    measurements in bench/results."""
    import importlib.util

    from gpt2_onnx.runtime import variants

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("derive_thresholds",
                                                  root / "bench" / "derive_thresholds.py")
    derive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(derive)
    data = variants.THRESHOLDS_FILE
    assert json.loads(data.read_text()) == derive.derive(root / "bench" / "results")
    assert data.read_text() == derive.render(derive.derive())
    # every registered variant reads its limits from that file
    assert set(variants.THRESHOLDS) == set(variants.names())
    assert all(variants.thresholds_for(n) == variants.THRESHOLDS[n] for n in variants.names())


# --------------------------------------------------------------------------------- quantized


# A small GPT-2 whose int8 variant passes verify at the package's limits (the tiny preset's wide
# weights, std 0.3, give int8 a mean KL of 1.5e-3, beyond the trained yardstick's limit).
QUANTIZABLE = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, initializer_range=0.1)
DAMAGED_SCALES = "h.1.mlp.c_fc.weight_scales"


@pytest.fixture(scope="module")
def int8_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2_onnx.export.tokenizer import save_tokenizer_files

    path = tmp_path_factory.mktemp("int8-ckpt") / "small-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, **QUANTIZABLE)).eval().save_pretrained(path)
    save_tokenizer_files(path, QUANTIZABLE["n_positions"])
    return path


@pytest.fixture(scope="module")
def int8_dir(int8_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_dir(tmp_path_factory.mktemp("int8") / "small", source=str(int8_checkpoint),
                      precisions=("fp32", "int8"))


def test_int8_passes_and_damaged_scales_fail(int8_dir: Path, tmp_path: Path) -> None:
    fresh = verify.run_verify(int8_dir, prompts=SHORT_PROMPTS, steps=3, precisions=["int8"])
    assert fresh.passed, fresh.failed_checks()
    sampling = next(c for c in fresh.checks if c.check == verify.SAMPLING)
    assert sampling.status == "not run" and not sampling.essential
    # One layer's quantization scales 5 % off: every weight of that matmul 5 % too large.
    out = _damage(int8_dir, tmp_path / "small", "int8", DAMAGED_SCALES, 1.05)
    report = verify.run_verify(out, prompts=SHORT_PROMPTS, steps=3, precisions=["int8"])
    assert not report.passed
    assert {"int8/logits-prefill", "int8/logits-decode"} <= set(report.failed_checks())


def test_export_refuses_a_variant_that_fails_the_real_verify(int8_checkpoint: Path,
                                                            tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """The int8 builder writes damaged scales; export runs the real verify and writes nothing."""
    import onnx
    from onnx import numpy_helper

    from gpt2_onnx.export import fused
    from gpt2_onnx.export.pipeline import ExportError

    build = fused.build_fused_graph

    def damaged_build(model, out_dir, precision, **kwargs):
        variant = build(model, out_dir, precision, **kwargs)
        graph = Path(out_dir) / variant.graph
        proto = onnx.load(str(graph))
        init = next(i for i in proto.graph.initializer if i.name == DAMAGED_SCALES)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.05),
                                              init.name))
        onnx.save(proto, str(graph))
        return variant

    monkeypatch.setattr(fused, "build_fused_graph", damaged_build)
    out = tmp_path / "small"
    with pytest.raises(ExportError, match=r"verify failed\. int8: .*int8 fails logits-prefill"):
        export_dir(out, source=str(int8_checkpoint), precisions=("fp32", "int8"), verify=True)
    assert not out.exists() and list(tmp_path.iterdir()) == []


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
    from gpt2_onnx.runtime import output, sampling

    broken = _broken_sample_token(sampling.sample_token)
    # The name the loop calls: the per-row step (output.Sequence) every front end shares.
    monkeypatch.setattr(output, "sample_token", broken)
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

    out = export_dir(tmp_path / "gpt2-large", source="gpt2-large")
    gen = TextGenerator.load(out, device="cpu", precision="fp32")
    res = gen.generate("Paris will", greedy=True, max_new_tokens=16)
    assert (res.prompt + res.text).startswith(
        "Paris will be the first city in the world to have a fully automated train system")


def test_int4_kl_limit_is_the_stated_quality_bar_and_the_yardstick_must_meet_it(tmp_path
                                                                                ) -> None:
    """int4's mean-KL limit is the stated bar (1 % perplexity: 0.01 nats), not a multiple of a
    measurement; a yardstick whose int4 breaks the bar makes the derivation fail, not loosen."""
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("derive_thresholds",
                                                  root / "bench" / "derive_thresholds.py")
    derive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(derive)
    bar, why = derive.QUALITY_BARS["int4"]
    assert bar == 0.01 and math.exp(bar) - 1 == pytest.approx(0.01005, abs=1e-5)
    doc = derive.derive(root / "bench" / "results")
    assert doc["variants"]["int4"]["limits"]["mean_kl_max"] == bar
    assert doc["variants"]["int4"]["from"]["mean_kl_max"]["rule"] == why
    # int8 keeps its measured rule: 10 x the yardstick's figure
    int8 = doc["variants"]["int8"]["from"]["mean_kl_max"]
    assert doc["variants"]["int8"]["limits"]["mean_kl_max"] == derive.ceil_sig(
        10 * int8["measured"])
    # a results folder whose yardstick int4 is worse than the bar cannot produce limits
    results = tmp_path / "results"
    shutil.copytree(root / "bench" / "results", results)
    quality = json.loads((results / "quality.json").read_text())
    for v in quality["variants"]:
        if v["name"] == "int4":
            v["mean_kl"] = 0.02
    (results / "quality.json").write_text(json.dumps(quality))
    with pytest.raises(ValueError, match="above its quality bar"):
        derive.derive(results)


# ------------------------------------------------ from the hostile pass of issue 19


N_POSITIONS = 256  # the tiny preset


def test_verify_report_directory_refused_before_any_work(tiny_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         runner: CliRunner) -> None:
    from gpt2_onnx.export import verify

    def no_work(*args, **kwargs):
        raise AssertionError("verify ran before the report path was checked")

    monkeypatch.setattr(verify, "run_verify", no_work)
    for bad, why in ((tmp_path, "is a directory"), (tmp_path / "no" / "r.json", "does not exist")):
        with pytest.raises(ValueError, match=why):
            verify.verify_command(tiny_dir, report_path=bad)
        result = invoke(runner, "verify", tiny_dir, "--report", bad)
        assert result.exit_code == 1 and why in one_line_error(result.stderr)


def test_verify_steps_bounded_by_the_context(tiny_dir: Path, runner: CliRunner) -> None:
    from gpt2_onnx.export.verify import run_verify

    for steps in (100000, N_POSITIONS - 1):
        with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 254\]"):
            run_verify(tiny_dir, steps=steps)
    result = invoke(runner, "verify", tiny_dir, "--steps", "100000")
    line = one_line_error(result.stderr)
    assert "[1, 254]" in line and not re.search(r"-\d", line), line  # no negative counts


def test_quantized_variant_below_the_bar_says_what_to_do() -> None:
    from gpt2_onnx.export.pipeline import verify_failure_message
    from gpt2_onnx.export.verify import Check, VerifyReport

    report = VerifyReport(model_dir="m", reference="r", steps=16, device="cpu", prompts=[])
    report.checks = [Check("fp32", "logits-prefill", "3e-6", "1e-3", True),
                     Check("int8", "logits-decode", "mean KL 3.1e-03", "mean KL 3.0e-04", False),
                     Check("int8", "greedy", "top-1 100 %", ">= 99 %", True)]
    msg = verify_failure_message(report, ("fp32", "int8"))
    assert "int8: this variant's quality on this model is below the bar" in msg
    assert "int8 fails logits-decode; logits-decode: mean KL 3.1e-03 (limit mean KL 3.0e-04)" \
        in msg
    assert "--precision fp32)" in msg and "--no-verify" in msg and "\n" not in msg
    report.checks.append(Check("fp32", "greedy", "tokens differ at 3", "identical", False))
    msg = verify_failure_message(report, ("fp32", "int8"))
    assert "fp32/greedy" in msg and "defect" in msg and "below the bar" in msg


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_tiny_preset_quantized_under_verify(tmp_path: Path, precision: str) -> None:
    """The documented presets with the documented precisions: a pass or the quality message."""
    out = tmp_path / "m"
    proc = run_cli("export", "--random-init", "tiny", "--out", out, "--precision",
               f"fp32,{precision}", text=True, timeout=900)
    if proc.returncode == 0:
        assert precision in mf.read_manifest(out).variants
        return
    line = one_line_error(proc.stderr.splitlines()[-1])
    assert "below the bar" in line and "--no-verify" in line, line
    assert not out.exists()
