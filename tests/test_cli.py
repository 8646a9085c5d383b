"""`gpt2-onnx` command line (issue 3): output streams, formats and one-line errors.

Most commands run in-process with typer's CliRunner (stdout and stderr captured apart); the error
cases also run as real processes to prove no traceback reaches the terminal. Expected values come
from GPT-2's published ids and from the Python API (the CLI only adapts arguments to it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpt2_onnx.cli import app
from gpt2_onnx.runtime.generator import TextGenerator

ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
JSON_KEYS = {"prompt", "prompt_ids", "ids", "text", "finish_reason", "timings"}


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner(env=ENV)


@pytest.fixture(scope="module")
def tiny_gen(tiny_dir: Path) -> TextGenerator:
    return TextGenerator.load(tiny_dir, device="cpu")


def invoke(runner: CliRunner, *args: str):
    result = runner.invoke(app, [str(a) for a in args])
    # Anything but a clean exit (SystemExit) would have been a traceback for the user.
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def run_process(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    code = ("import sys\nsys.argv = ['gpt2-onnx', *sys.argv[1:]]\n"
            "from gpt2_onnx.cli import main\nmain()\n")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **ENV})


def assert_one_line_error(stderr: str, stdout: str = "") -> str:
    assert "Traceback" not in stderr + stdout
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:")
    return lines[0]


# ------------------------------------------------------------------------------ tokens


def test_tokenize(runner: CliRunner, tiny_dir: Path) -> None:
    result = invoke(runner, "tokenize", tiny_dir, "Paris will")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == [40313, 481]
    assert result.stdout.strip() == "[40313, 481]"


def test_decode(runner: CliRunner, tiny_dir: Path) -> None:
    result = invoke(runner, "decode", tiny_dir, "40313")
    assert result.exit_code == 0 and result.stdout == "Paris\n"
    result = invoke(runner, "decode", tiny_dir, "40313", "481")
    assert result.stdout == "Paris will\n"


def test_decode_out_of_range_id(runner: CliRunner, tiny_dir: Path) -> None:
    result = invoke(runner, "decode", tiny_dir, "50257")
    assert result.exit_code != 0
    line = assert_one_line_error(result.stderr)
    assert "50257" in line and "[0, 50256]" in line


# ------------------------------------------------------------------------------ generate


def test_generate_json_one_object_per_prompt_in_order(runner: CliRunner, tiny_dir: Path,
                                                      tiny_gen: TextGenerator) -> None:
    prompts = ["Paris will", "London was", "東京 😀"]
    result = invoke(runner, "generate", tiny_dir, *prompts, "--greedy", "--json",
                    "--max-new-tokens", "12")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(prompts)
    for prompt, line in zip(prompts, lines, strict=True):
        doc = json.loads(line)
        assert JSON_KEYS <= set(doc)
        expected = tiny_gen.generate(prompt, greedy=True, max_new_tokens=12)
        assert doc["prompt"] == prompt
        assert doc["prompt_ids"] == tiny_gen.encode(prompt)
        assert doc["ids"] == expected.ids and len(doc["ids"]) <= 12
        assert doc["text"] == expected.text
        assert doc["finish_reason"] in ("length", "eos", "stop")
        assert {"prefill_ms", "decode_tokens_per_s"} <= set(doc["timings"])
    assert json.loads(invoke(runner, "tokenize", tiny_dir, "Paris will").stdout) \
        == json.loads(lines[0])["prompt_ids"]
    assert "tok/s" in result.stderr  # timings go to stderr, never into the JSON stream


def test_generate_streams_prompt_and_text(runner: CliRunner, tiny_dir: Path,
                                          tiny_gen: TextGenerator) -> None:
    result = invoke(runner, "generate", tiny_dir, "Paris will", "--greedy",
                    "--max-new-tokens", "16")
    assert result.exit_code == 0, result.stderr
    expected = tiny_gen.generate("Paris will", greedy=True, max_new_tokens=16).text
    assert result.stdout == "Paris will" + expected + "\n"
    seeded = invoke(runner, "generate", tiny_dir, "Paris will", "--seed", "5",
                    "--top-k", "20", "--temperature", "0.8", "--max-new-tokens", "16")
    expected = tiny_gen.generate("Paris will", seed=5, top_k=20, temperature=0.8,
                                 max_new_tokens=16).text
    assert seeded.stdout == "Paris will" + expected + "\n"


def test_generate_several_prompts_streamed_in_order(runner: CliRunner, tiny_dir: Path,
                                                    tiny_gen: TextGenerator) -> None:
    result = invoke(runner, "generate", tiny_dir, "Paris will", "London was", "--greedy",
                    "--max-new-tokens", "6")
    expected = [p + tiny_gen.generate(p, greedy=True, max_new_tokens=6).text
                for p in ("Paris will", "London was")]
    assert result.stdout == "\n".join(expected) + "\n"


def test_generate_stop(runner: CliRunner, tiny_dir: Path, tiny_gen: TextGenerator) -> None:
    free = tiny_gen.generate("Paris will", greedy=True, max_new_tokens=20).text
    stop = free[5:8]
    result = invoke(runner, "generate", tiny_dir, "Paris will", "--greedy",
                    "--max-new-tokens", "20", "--stop", stop, "--json")
    doc = json.loads(result.stdout)
    assert doc["finish_reason"] == "stop" and doc["text"] == free[:free.find(stop)]


def test_show_top_prints_table_to_stderr(runner: CliRunner, tiny_dir: Path,
                                         tiny_gen: TextGenerator) -> None:
    result = invoke(runner, "generate", tiny_dir, "Paris will", "--greedy", "--show-top", "3",
                    "--max-new-tokens", "4")
    assert result.exit_code == 0, result.stderr
    res = tiny_gen.generate("Paris will", greedy=True, max_new_tokens=4, show_top=3)
    assert result.stdout == "Paris will" + res.text + "\n"  # no table on stdout
    assert "top candidates" in result.stderr
    for step in res.steps:
        for cand in step.candidates:
            assert f"{cand.prob:.3f}" in result.stderr
    assert "top candidates" not in result.stdout


def test_show_top_with_json_keeps_stdout_json(runner: CliRunner, tiny_dir: Path) -> None:
    result = invoke(runner, "generate", tiny_dir, "Paris will", "--greedy", "--show-top", "2",
                    "--max-new-tokens", "3", "--json")
    doc = json.loads(result.stdout)
    assert len(doc["steps"]) == 3 and len(doc["steps"][0]["candidates"]) == 2
    assert "top candidates" in result.stderr


def test_show_top_token_text_with_brackets(runner: CliRunner, tiny_dir: Path,
                                           tiny_gen: TextGenerator) -> None:
    """Token texts like "[/" are shown literally (rich markup must not eat or choke on them)."""
    prompt = "[/b] [bold] [/"
    result = invoke(runner, "generate", tiny_dir, prompt, "--greedy", "--show-top", "3",
                    "--max-new-tokens", "2")
    assert result.exit_code == 0, result.stderr
    assert repr(prompt) in result.stderr


# ------------------------------------------------------------------------------ info


def test_info_shows_the_manifest(runner: CliRunner, tiny_dir: Path) -> None:
    result = invoke(runner, "info", tiny_dir)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for text in ("random-init", "tiny", "2 layers", "4 heads", "256 positions", "vocab 50257",
                 "model.onnx", "fp32", "onnxruntime", "transformers"):
        assert text in out, text


def test_info_check_files_detects_a_flipped_byte(runner: CliRunner, tiny_dir: Path,
                                                 tmp_path: Path) -> None:
    model_dir = tmp_path / "copy"
    shutil.copytree(tiny_dir, model_dir)
    ok = invoke(runner, "info", model_dir, "--check-files")
    assert ok.exit_code == 0, ok.stderr
    assert "match" in ok.stderr
    graph = model_dir / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the hash can tell
    graph.write_bytes(bytes(data))
    bad = invoke(runner, "info", model_dir, "--check-files")
    assert bad.exit_code != 0
    line = assert_one_line_error(bad.stderr)
    assert "model.onnx" in line
    proc = run_process("info", model_dir, "--check-files")
    assert proc.returncode != 0 and "model.onnx" in assert_one_line_error(proc.stderr)


# ------------------------------------------------------------------------------ errors


def test_missing_model_dir(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    for args in (("generate", missing, "hi"), ("tokenize", missing, "hi"), ("info", missing)):
        result = invoke(runner, *args)
        assert result.exit_code != 0
        assert str(missing) in assert_one_line_error(result.stderr)
    proc = run_process("generate", missing, "hi")
    assert proc.returncode != 0
    assert str(missing) in assert_one_line_error(proc.stderr, proc.stdout)


def test_directory_without_manifest(runner: CliRunner, tmp_path: Path) -> None:
    result = invoke(runner, "generate", tmp_path, "hi")
    assert result.exit_code != 0
    line = assert_one_line_error(result.stderr)
    assert "gpt2-onnx.json" in line and "gpt2-onnx export" in line


@pytest.mark.parametrize("args,expected", [
    (["--top-k", "0"], "top_k"),
    (["--top-p", "1.5"], "top_p"),
    (["--temperature", "-1"], "temperature"),
    (["--max-new-tokens", "1000"], "n_positions"),
    (["--threads", "0"], "threads"),
])
def test_bad_settings_one_line(runner: CliRunner, tiny_dir: Path, args: list[str],
                               expected: str) -> None:
    for extra in ([], ["--json"]):
        result = invoke(runner, "generate", tiny_dir, "Paris will", *args, *extra)
        assert result.exit_code != 0
        assert expected in assert_one_line_error(result.stderr)
        assert result.stdout == ""  # nothing printed before the error


def test_bad_top_k_in_a_real_process(tiny_dir: Path) -> None:
    proc = run_process("generate", tiny_dir, "Paris will", "--top-k", "0")
    assert proc.returncode != 0
    assert "top_k" in assert_one_line_error(proc.stderr, proc.stdout)
    assert proc.stdout == ""


def test_cuda_on_a_cpu_only_machine_says_what_to_install(tiny_dir: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    proc = run_process("generate", tiny_dir, "Paris will", "--device", "cuda")
    assert proc.returncode != 0
    line = assert_one_line_error(proc.stderr, proc.stdout)
    assert "onnxruntime-gpu" in line and "gpt2-onnx[gpu]" in line and "--device cpu" in line


def test_unknown_device(runner: CliRunner, tiny_dir: Path) -> None:
    result = invoke(runner, "generate", tiny_dir, "Paris will", "--device", "tpu")
    assert result.exit_code != 0
    line = assert_one_line_error(result.stderr)
    assert "tpu" in line and "cpu" in line


def test_unknown_precision(runner: CliRunner, tiny_dir: Path) -> None:
    result = invoke(runner, "generate", tiny_dir, "Paris will", "--precision", "int3")
    assert result.exit_code != 0
    line = assert_one_line_error(result.stderr)
    assert "int3" in line and "fp32" in line
