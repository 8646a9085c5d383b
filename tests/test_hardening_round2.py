"""Hardening, round 2 (issue 19 items 2-10): each case the hostile pass broke, as a user meets it.

Expected outcomes come from the documented ranges and rules (computed here, not by the code under
test), from a solo greedy run, or from hand-built inputs. CLI cases run in-process (typer's
CliRunner) or, where stdout, signals or argv bytes matter, as real processes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import interrupt_streamed_generate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gpt2_onnx.cli import app
from gpt2_onnx.runtime import manifest as mf
from gpt2_onnx.runtime.errors import ModelDirError
from gpt2_onnx.runtime.generator import TextGenerator, load_tokenizer, vocab_fits
from gpt2_onnx.runtime.scoring import score_ids

VOCAB = 50257
N_POSITIONS = 256  # the tiny preset
ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
EXE = [sys.executable, "-c",
       "import sys; from gpt2_onnx.cli import main; sys.argv[0] = 'gpt2-onnx'; main()"]
FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def gen(tiny_dir: Path) -> TextGenerator:
    return TextGenerator.load(tiny_dir, device="cpu", threads=1)


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env=ENV)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    return Path(shutil.copytree(tiny_dir, tmp_path_factory.mktemp("pristine") / "model"))


def private_copy(pristine: Path, dest: Path) -> Path:
    """A copy whose model.onnx is a hard link (tests here edit only the manifest/tokenizer)."""
    def copy(src: str, dst: str) -> None:
        if Path(src).name == "model.onnx":
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    if dest.exists():
        shutil.rmtree(dest)
    return Path(shutil.copytree(pristine, dest, copy_function=copy))


@pytest.fixture
def model(tmp_path: Path, pristine: Path) -> Path:
    return private_copy(pristine, tmp_path / "model")


def edit_manifest(model: Path, edit) -> None:
    path = model / mf.MANIFEST_NAME
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def invoke(runner: CliRunner, *args: object):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None:  # anything but SystemExit would be a traceback
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def one_line_error(stderr: str, stdout: str = "") -> str:
    assert "Traceback" not in stderr + stdout, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:"), lines[0]
    return lines[0]


def run(*args: object, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, *[a if isinstance(a, bytes) else str(a) for a in args]],
                          capture_output=True, timeout=timeout, env={**os.environ, **ENV},
                          **kwargs)


# ------------------------------------------------------------------ 2: valid extremes never crash


@pytest.mark.parametrize("flag, value", [("--temperature", "1e-308"),
                                         ("--temperature", "5e-324"),
                                         ("--repetition-penalty", "1e-300"),
                                         ("--repetition-penalty", "1e300")])
def test_extreme_valid_settings_generate(runner: CliRunner, tiny_dir: Path, gen: TextGenerator,
                                         flag: str, value: str) -> None:
    greedy = gen.generate("Hi", max_new_tokens=6, greedy=True)
    for extra in ([], ["--json"]):
        result = invoke(runner, "generate", tiny_dir, "Hi", flag, value, "--max-new-tokens",
                        "6", "--seed", "0", "--threads", "1", *extra)
        assert result.exit_code == 0, result.stderr
        assert "Traceback" not in result.stderr
    if flag == "--temperature":
        # T -> 0 is greedy (the tiny model's top-2 gaps are far above 1e-300).
        res = gen.generate("Hi", max_new_tokens=6, temperature=float(value), top_k=None, seed=3)
        assert res.ids == greedy.ids
        assert json.loads(result.stdout)["ids"] == greedy.ids


def test_tiny_penalty_with_greedy_takes_a_seen_token(gen: TextGenerator) -> None:
    """penalty 1e-300 divides every seen positive logit by 1e-300: those saturate and tie at the
    top, so greedy takes the lowest seen id whose logit was positive."""
    prompt_ids = gen.encode("Paris will be Paris")
    logits = gen.decoder.forward(gen.decoder.start(1, len(prompt_ids)),
                                 np.array([prompt_ids]), np.ones((1, len(prompt_ids)), np.int64),
                                 np.arange(len(prompt_ids))[None])[0][0]  # [vocab]
    positive_seen = sorted(i for i in set(prompt_ids) if logits[i] > 0)
    res = gen.generate_ids([prompt_ids], max_new_tokens=1, greedy=True,
                           repetition_penalty=1e-300)[0]
    expected = positive_seen[0] if positive_seen else int(np.argmax(logits))
    assert res.ids == [expected]


def numpy_variants(values: st.SearchStrategy, types: tuple) -> st.SearchStrategy:
    """Each value as itself or converted to one of the numpy scalar types (when it converts)."""
    def convert(pair):
        value, kind = pair
        if kind is None:
            return value
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                out = kind(value)
        except (OverflowError, ValueError, TypeError):
            return value
        return out if np.isfinite(out) or not np.isfinite(value) else value

    return st.tuples(values, st.sampled_from((None, *types))).map(convert)


ANY_FLOAT = numpy_variants(
    st.one_of(st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
              st.sampled_from([0.0, -0.0, 5e-324, 1e-308, 2.2e-308, 1e-45, 1e308,
                               1.7976931348623157e308, 1.0, 1e-300, 1e300]),
              st.integers(-3, 3)),
    (np.float32, np.float64, np.float16))
ANY_INT = numpy_variants(
    st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([-1, 0, 1, 2, VOCAB, VOCAB + 1])),
    (np.int64, np.int32, np.uint16, np.int8))
BOOLS = st.sampled_from([True, False, np.bool_(True), np.bool_(False)])


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_finite_real(v) -> bool:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


@FUZZ
@given(top_k=st.one_of(st.none(), ANY_INT, BOOLS), top_p=st.one_of(ANY_FLOAT, BOOLS),
       temperature=st.one_of(ANY_FLOAT, BOOLS), repetition_penalty=st.one_of(ANY_FLOAT, BOOLS),
       max_new_tokens=st.one_of(ANY_INT, BOOLS, st.sampled_from([np.int64(3), 3.0])),
       seed=st.one_of(st.none(), ANY_INT, BOOLS),
       show_top=st.one_of(st.sampled_from([0, 2, np.int64(2), True, np.bool_(True), -1]),
                          ANY_INT),
       greedy=st.one_of(BOOLS, st.sampled_from([0, 1, "yes", None])))
def test_settings_full_numeric_ranges(gen: TextGenerator, top_k, top_p, temperature,
                                      repetition_penalty, max_new_tokens, seed, show_top,
                                      greedy) -> None:
    """Any value of any numeric type: generation, or a ValueError naming a setting. The
    documented ranges decide which (never an overflow inside sampling)."""
    valid = {
        "greedy": isinstance(greedy, (bool, np.bool_)),
        "top_k": top_k is None or (is_int(top_k) and 1 <= top_k <= VOCAB),
        "top_p": is_finite_real(top_p) and 0 < top_p <= 1,
        "temperature": is_finite_real(temperature) and temperature >= 0,
        "repetition_penalty": is_finite_real(repetition_penalty) and repetition_penalty > 0,
        "max_new_tokens": is_int(max_new_tokens) and 0 <= max_new_tokens <= N_POSITIONS - 1,
        "seed": seed is None or (is_int(seed) and seed >= 0),
        "show_top": is_int(show_top) and 0 <= show_top <= VOCAB,
    }
    kwargs = dict(top_k=top_k, top_p=top_p, temperature=temperature, greedy=greedy,
                  repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                  seed=seed, show_top=show_top)
    if all(valid.values()):
        kwargs["max_new_tokens"] = min(int(max_new_tokens), 3)
        kwargs["show_top"] = min(int(show_top), 3)
        res = gen.generate("Hello", **kwargs)
        assert len(res.ids) <= kwargs["max_new_tokens"]
        assert all(0 <= i < VOCAB for i in res.ids)
        assert len(res.steps) == (len(res.ids) if kwargs["show_top"] else 0)
        return
    with pytest.raises(ValueError) as exc:
        gen.validate("Hello", **kwargs)
    assert any(name in str(exc.value) for name, ok in valid.items() if not ok), str(exc.value)
    with pytest.raises(ValueError):
        gen.generate("Hello", **kwargs)


# ------------------------------------------------------------------ 3: invalid UTF-8 in argv


def test_tokenize_invalid_utf8_argument_is_one_line(tiny_dir: Path) -> None:
    for command in ("tokenize", "generate"):
        proc = run(command, tiny_dir, b"ab\xffcd", text=False)
        assert proc.returncode == 1
        line = one_line_error(proc.stderr.decode(), proc.stdout.decode())
        assert "0xFF" in line and "UTF-8" in line, line


# ------------------------------------------------------------------ 4: manifest vs graph at load


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d["dims"].update(n_layer=3), "past_key_values.2.key"),
    (lambda d: d["dims"].update(n_layer=1), "past_key_values.1.key"),
    (lambda d: d["dims"].update(n_head=8, head_dim=8), "n_head 8, head_dim 8"),
    (lambda d: d["dims"].update(n_head=2, head_dim=32), "n_head 2, head_dim 32"),
    (lambda d: d["dims"].update(vocab_size=50304), "vocab_size 50304"),
    (lambda d: d["variants"]["fp32"]["io"].update(input_ids="ids"), "ids"),
    (lambda d: d["variants"]["fp32"]["io"].update(logits="scores"), "scores"),
    (lambda d: d["variants"]["fp32"]["io"].update(past_key="past.{i}.key"), "past.0.key"),
    (lambda d: d["variants"]["fp32"]["io"].update(attention_mask="mask"), "mask"),
    (lambda d: d["variants"]["fp32"].update(dtype="float16"), "float16"),
])
def test_manifest_that_disagrees_with_its_graph(runner: CliRunner, model: Path, edit,
                                                expected: str) -> None:
    edit_manifest(model, edit)
    mf.read_manifest(model)  # the manifest alone is consistent: only the graph disproves it
    with pytest.raises(ModelDirError, match="graph and manifest disagree") as exc:
        TextGenerator.load(model, device="cpu", threads=1)
    assert expected in str(exc.value)
    result = invoke(runner, "generate", model, "Hi", "--max-new-tokens", "2")
    assert result.exit_code == 1
    assert expected in one_line_error(result.stderr, result.stdout)


@pytest.mark.parametrize("n_positions, n_embd, n_head", [(512, 64, 4), (128, 64, 4),
                                                      (256, 128, 8)])
def test_position_table_disagreeing_with_the_manifest(runner: CliRunner, model: Path,
                                                      n_positions: int, n_embd: int,
                                                      n_head: int) -> None:
    """n_positions 512 over a 256-row table used to load and fail only past position 255."""
    edit_manifest(model, lambda d: d["dims"].update(n_positions=n_positions, n_embd=n_embd,
                                                    n_head=n_head))
    with pytest.raises(ModelDirError, match="position table is 256 x 64"):
        mf.read_manifest(model)
    result = invoke(runner, "info", model)
    assert result.exit_code == 1 and "position table" in one_line_error(result.stderr)


_DIM_FIELDS = ("n_layer", "n_head", "head_dim", "n_embd", "n_positions", "vocab_size")


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(_DIM_FIELDS),
                               st.one_of(st.integers(-2, 600), st.integers(50000, 50400),
                                         st.sampled_from([2**24, 2**24 + 1, 2**63, -(2**63)])),
                               min_size=1, max_size=3),
       io_field=st.one_of(st.none(), st.sampled_from(["input_ids", "attention_mask",
                                                      "position_ids", "logits", "past_key",
                                                      "present_value"])),
       io_name=st.text(min_size=1, max_size=12))
def test_model_directory_mutations(tmp_path_factory: pytest.TempPathFactory, pristine: Path,
                                   gen: TextGenerator, changes: dict, io_field: str | None,
                                   io_name: str) -> None:
    """Random edits of the manifest's dims and tensor names: the directory is refused with a
    ModelDirError at load, or the edit changed nothing and it generates the same greedy tokens.
    Never another exception, never a failure at the first forward pass."""
    model = private_copy(pristine, tmp_path_factory.mktemp("mut") / "model")
    original = json.loads((model / mf.MANIFEST_NAME).read_text())
    dims = original["dims"]
    io = original["variants"]["fp32"]["io"]

    def edit(doc):
        doc["dims"].update(changes)
        if io_field is not None:
            value = io_name + ("{i}" if io_field in ("past_key", "present_value") else "")
            doc["variants"]["fp32"]["io"][io_field] = value

    edit_manifest(model, edit)
    structural = any(changes[f] != dims[f] for f in changes)
    renamed = io_field is not None and (
        io_name + ("{i}" if io_field in ("past_key", "present_value") else "")) != io[io_field]
    try:
        loaded = TextGenerator.load(model, device="cpu", threads=1)
    except ModelDirError:
        return
    assert not structural and not renamed, "a manifest that differs from its graph was loaded"
    reference = gen.generate("Paris will", max_new_tokens=2, greedy=True).ids
    assert loaded.generate("Paris will", max_new_tokens=2, greedy=True).ids == reference


# ------------------------------------------------------------------ 5: paths, threads, stdout


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


@pytest.mark.parametrize("threads", ["99999999999", "0", "-3", "100000"])
def test_threads_bounded_with_the_machine_named(runner: CliRunner, tiny_dir: Path,
                                                threads: str) -> None:
    result = invoke(runner, "generate", tiny_dir, "Hi", "--threads", threads)
    line = one_line_error(result.stderr, result.stdout)
    assert result.exit_code == 1
    assert "threads" in line and f"{os.cpu_count()} logical CPUs" in line, line


def test_threads_accepts_numpy_integers(tiny_dir: Path) -> None:
    loaded = TextGenerator.load(tiny_dir, device="cpu", threads=np.int64(1))
    assert len(loaded.generate("Hi", max_new_tokens=2, greedy=True).ids) == 2
    with pytest.raises(ValueError, match="threads"):
        TextGenerator.load(tiny_dir, device="cpu", threads=True)


@pytest.mark.parametrize("args", [["tokenize", "{dir}", "Hi"],
                                  ["generate", "{dir}", "Hi", "--max-new-tokens", "3"],
                                  ["generate", "{dir}", "Hi", "--max-new-tokens", "3", "--json"],
                                  ["info", "{dir}"]])
@pytest.mark.parametrize("where", ["closed", "/dev/full"])
def test_unwritable_stdout_is_one_line(tiny_dir: Path, args: list[str], where: str) -> None:
    argv = [a.replace("{dir}", str(tiny_dir)) for a in args]
    if where == "closed":
        proc = subprocess.run([*EXE, *argv], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=120, env={**os.environ, **ENV},
                              preexec_fn=lambda: os.close(1))
    else:
        with open("/dev/full", "w") as full:
            proc = subprocess.run([*EXE, *argv], stdout=full, stderr=subprocess.PIPE,
                                  text=True, timeout=120, env={**os.environ, **ENV})
    assert proc.returncode == 1, proc.stderr
    assert "cannot write to stdout" in one_line_error(proc.stderr)


# ------------------------------------------------------------------ 6: messages that mislead


def test_streamed_prompts_all_checked_before_any_output(runner: CliRunner, tiny_dir: Path) -> None:
    long_prompt = " the" * (N_POSITIONS + 10)
    result = invoke(runner, "generate", tiny_dir, "Hi", long_prompt, "--max-new-tokens", "2")
    assert result.exit_code == 1
    assert result.stdout == ""  # not even the first prompt
    line = one_line_error(result.stderr)
    assert "prompt 1 has 266 tokens" in line, line


def test_verify_steps_bounded_by_the_context(tiny_dir: Path, runner: CliRunner) -> None:
    from gpt2_onnx.export.verify import run_verify

    for steps in (100000, N_POSITIONS - 1):
        with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 254\]"):
            run_verify(tiny_dir, steps=steps)
    result = invoke(runner, "verify", tiny_dir, "--steps", "100000")
    line = one_line_error(result.stderr)
    assert "[1, 254]" in line and not re.search(r"-\d", line), line  # no negative counts


def test_score_json_on_an_empty_file_is_strict_json(runner: CliRunner, tiny_dir: Path,
                                                    tmp_path: Path) -> None:
    empty, text = tmp_path / "empty.txt", tmp_path / "text.txt"
    empty.write_text("")
    text.write_text("Paris will be")

    def strict(line: str) -> dict:
        return json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))

    for files, total_null in (([empty], True), ([empty, text], False)):
        result = invoke(runner, "score", tiny_dir, *files, "--json", "--threads", "1")
        assert result.exit_code == 0, result.stderr
        lines = [strict(ln) for ln in result.stdout.splitlines()]
        assert lines[0]["perplexity"] is None and "empty" in lines[0]["note"]
        assert (lines[-1]["perplexity"] is None) == total_null


def test_unreadable_tokenizer_is_named_as_such(model: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    tok = model / "tokenizer.json"
    if os.geteuid() == 0:  # root reads anything: make the read itself fail as it would
        real = Path.read_bytes

        def denied(self: Path) -> bytes:
            if self == tok:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "read_bytes", denied)
    else:
        tok.chmod(0)
    with pytest.raises(ModelDirError, match="cannot be read \\(Permission denied\\)"):
        load_tokenizer(tok, VOCAB)


def test_missing_directory_and_file_are_named_apart(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="no such directory"):
        mf.read_manifest(tmp_path / "nonexistent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelDirError, match="not a directory"):
        mf.read_manifest(tmp_path / "file")


@pytest.mark.parametrize("show_top", [True, np.bool_(True), 1.0, -1, VOCAB + 1])
def test_show_top_refused_at_validation(gen: TextGenerator, show_top) -> None:
    with pytest.raises(ValueError, match="show_top"):
        gen.validate("Hi", max_new_tokens=2, show_top=show_top)
    with pytest.raises(ValueError, match="show_top"):
        gen.generate("Hi", max_new_tokens=2, show_top=show_top)


# ------------------------------------------------------------------ 7: tokenizer vs vocabulary


def replace_tokenizer(model: Path, size: int) -> None:
    """A word-level tokenizer of `size` tokens in place of GPT-2's; the manifest's file table
    updated so only the vocabulary rule can object."""
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(size - 1)} | {"[UNK]": size - 1}
    Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(model / "tokenizer.json"))
    entry = mf.file_entries(model, ["tokenizer.json"])["tokenizer.json"]
    edit_manifest(model, lambda d: d["files"].update(
        {"tokenizer.json": {"size": entry.size, "sha256": entry.sha256}}))


@pytest.mark.parametrize("size", [3, 1000, VOCAB - 200, VOCAB + 1])
def test_tokenizer_of_another_vocabulary_is_refused(runner: CliRunner, model: Path,
                                                    size: int) -> None:
    replace_tokenizer(model, size)
    with pytest.raises(ModelDirError, match=f"{size} tokens but the model has {VOCAB} logits"):
        TextGenerator.load(model, device="cpu", threads=1)
    result = invoke(runner, "generate", model, "w1", "--max-new-tokens", "2", "--json")
    assert result.exit_code == 1 and result.stdout == ""
    assert "belongs to another model" in one_line_error(result.stderr)


def test_vocabulary_padding_rule_hand_values() -> None:
    assert vocab_fits(50257, 50257)
    assert vocab_fits(50257, 50304)  # padded to a multiple of 128 (nanoGPT's 50304)
    assert not vocab_fits(50257, 50305)
    assert not vocab_fits(50257, 50256)
    assert not vocab_fits(1000, 50257)
    assert vocab_fits(128, 128) and not vocab_fits(128, 129)


# ------------------------------------------------------------------ 8: one rule per setting


def test_api_types_handled_uniformly(gen: TextGenerator) -> None:
    for bad in (None, 5, [b"x"], ["ok", None]):
        with pytest.raises(ValueError, match="texts"):
            gen.score(bad)
    res = gen.generate("Hi", max_new_tokens=np.int64(3), greedy=True)
    assert len(res.ids) == 3
    assert res.ids == gen.generate("Hi", max_new_tokens=3, greedy=True).ids
    same = gen.generate("Hi", max_new_tokens=np.int32(3), top_k=np.int64(5), seed=np.uint8(7),
                        temperature=np.float32(0.8), top_p=np.float16(0.9))
    plain = gen.generate("Hi", max_new_tokens=3, top_k=5, seed=7, temperature=float(
        np.float32(0.8)), top_p=float(np.float16(0.9)))
    assert same.ids == plain.ids
    # Bools are refused everywhere, not accepted in one place and refused in another.
    for call in (lambda: gen.generate_ids([[True, 5]], max_new_tokens=1),
                 lambda: gen.decode([True]),
                 lambda: score_ids(gen.decoder, [[True, 5]]),
                 lambda: gen.generate("Hi", max_new_tokens=True),
                 lambda: gen.generate("Hi", max_new_tokens=2, seed=np.bool_(True)),
                 lambda: gen.score(["x"], batch_size=True),
                 lambda: gen.score(["x"], stride=np.bool_(True))):
        with pytest.raises(ValueError):
            call()


# ------------------------------------------------------------------ 9: a variant below the bar


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
    proc = run("export", "--random-init", "tiny", "--out", out, "--precision",
               f"fp32,{precision}", text=True, timeout=900)
    if proc.returncode == 0:
        assert precision in mf.read_manifest(out).variants
        return
    line = one_line_error(proc.stderr.splitlines()[-1])
    assert "below the bar" in line and "--no-verify" in line, line
    assert not out.exists()


# ------------------------------------------------------------------ 10: signals


def test_sigint_while_importing_exits_130(tiny_dir: Path) -> None:
    """Ctrl-C while the CLI's modules import (typer, rich, then numpy and tokenizers for the
    command). A watcher thread in the child says when the CLI's first lines have run (its
    handler replaced Python's): what came before is Python's own startup, outside our reach."""
    code = textwrap.dedent(f"""
        import os, signal, sys, threading, time
        def watch():
            while signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                time.sleep(0.0005)
            os.write(1, b"R")
        threading.Thread(target=watch, daemon=True).start()
        sys.argv = ["gpt2-onnx", "tokenize", {str(tiny_dir)!r}, "hi"]
        from gpt2_onnx.cli import main
        main()
        """)
    for delay in (0.0, 0.02, 0.05, 0.1, 0.2):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            assert os.read(proc.stdout.fileno(), 1) == b"R"
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode == 0:  # finished before the signal: nothing to check at this delay
            continue
        assert proc.returncode == 130, (delay, err.decode())
        assert b"Traceback" not in err, (delay, err.decode())


def test_sigterm_during_generate_exits_143_with_the_partial_output(gen: TextGenerator,
                                                                   tiny_dir: Path) -> None:
    text = gen.generate("Paris will", max_new_tokens=200, greedy=True).text
    interrupt_streamed_generate(EXE, tiny_dir, text, signal.SIGTERM, 143)
