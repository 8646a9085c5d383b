"""`gpt2-onnx` command line (issue 3): output streams, formats and one-line errors.

Most commands run in-process with typer's CliRunner (stdout and stderr captured apart); the error
cases also run as real processes to prove no traceback reaches the terminal. Expected values come
from GPT-2's published ids and from the Python API (the CLI only adapts arguments to it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import (
    CLI_LAUNCH,
    ENV,
    interrupt_streamed_generate,
    invoke,
    one_line_error,
    run_cli,
)
from typer.testing import CliRunner

from gpt2_onnx.runtime.generator import TextGenerator

JSON_KEYS = {"prompt", "prompt_ids", "ids", "text", "finish_reason", "timings"}


def run_process(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    code = ("import sys\nsys.argv = ['gpt2-onnx', *sys.argv[1:]]\n"
            "from gpt2_onnx.cli import main\nmain()\n")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **ENV})


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
    line = one_line_error(result.stderr)
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
    line = one_line_error(bad.stderr)
    assert "model.onnx" in line
    proc = run_process("info", model_dir, "--check-files")
    assert proc.returncode != 0 and "model.onnx" in one_line_error(proc.stderr)


# ------------------------------------------------------------------------------ errors


def test_missing_model_dir(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    for args in (("generate", missing, "hi"), ("tokenize", missing, "hi"), ("info", missing)):
        result = invoke(runner, *args)
        assert result.exit_code != 0
        assert str(missing) in one_line_error(result.stderr)
    proc = run_process("generate", missing, "hi")
    assert proc.returncode != 0
    assert str(missing) in one_line_error(proc.stderr, proc.stdout)


def test_directory_without_manifest(runner: CliRunner, tmp_path: Path) -> None:
    result = invoke(runner, "generate", tmp_path, "hi")
    assert result.exit_code != 0
    line = one_line_error(result.stderr)
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
        assert expected in one_line_error(result.stderr)
        assert result.stdout == ""  # nothing printed before the error


def test_bad_top_k_in_a_real_process(tiny_dir: Path) -> None:
    proc = run_process("generate", tiny_dir, "Paris will", "--top-k", "0")
    assert proc.returncode != 0
    assert "top_k" in one_line_error(proc.stderr, proc.stdout)
    assert proc.stdout == ""


def test_cuda_on_a_cpu_only_machine_says_what_to_install(tiny_dir: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    proc = run_process("generate", tiny_dir, "Paris will", "--device", "cuda")
    assert proc.returncode != 0
    line = one_line_error(proc.stderr, proc.stdout)
    assert "onnxruntime-gpu" in line and "gpt2-onnx[gpu]" in line and "--device cpu" in line


def test_unknown_device(runner: CliRunner, tiny_dir: Path) -> None:
    result = invoke(runner, "generate", tiny_dir, "Paris will", "--device", "tpu")
    assert result.exit_code != 0
    line = one_line_error(result.stderr)
    assert "tpu" in line and "cpu" in line


def test_unknown_precision(runner: CliRunner, tiny_dir: Path) -> None:
    result = invoke(runner, "generate", tiny_dir, "Paris will", "--precision", "int3")
    assert result.exit_code != 0
    line = one_line_error(result.stderr)
    assert "int3" in line and "fp32" in line


# ------------------------------------------------ from the hostile pass of issue 19


N_POSITIONS = 256  # the tiny preset


def test_tokenize_invalid_utf8_argument_is_one_line(tiny_dir: Path) -> None:
    for command in ("tokenize", "generate"):
        proc = run_cli(command, tiny_dir, b"ab\xffcd", text=False)
        assert proc.returncode == 1
        line = one_line_error(proc.stderr.decode(), proc.stdout.decode())
        assert "0xFF" in line and "UTF-8" in line, line


@pytest.mark.parametrize("args", [["tokenize", "{dir}", "Hi"],
                                  ["generate", "{dir}", "Hi", "--max-new-tokens", "3"],
                                  ["generate", "{dir}", "Hi", "--max-new-tokens", "3", "--json"],
                                  ["info", "{dir}"]])
@pytest.mark.parametrize("where", ["closed", "/dev/full"])
def test_unwritable_stdout_is_one_line(tiny_dir: Path, args: list[str], where: str) -> None:
    argv = [a.replace("{dir}", str(tiny_dir)) for a in args]
    if where == "closed":
        proc = subprocess.run([*CLI_LAUNCH, *argv], stdin=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, timeout=120,
                              env={**os.environ, **ENV},
                              preexec_fn=lambda: os.close(1))
    else:
        with open("/dev/full", "w") as full:
            proc = subprocess.run([*CLI_LAUNCH, *argv], stdout=full, stderr=subprocess.PIPE,
                                  text=True, timeout=120, env={**os.environ, **ENV})
    assert proc.returncode == 1, proc.stderr
    assert "cannot write to stdout" in one_line_error(proc.stderr)


def test_streamed_prompts_all_checked_before_any_output(runner: CliRunner, tiny_dir: Path) -> None:
    long_prompt = " the" * (N_POSITIONS + 10)
    result = invoke(runner, "generate", tiny_dir, "Hi", long_prompt, "--max-new-tokens", "2")
    assert result.exit_code == 1
    assert result.stdout == ""  # not even the first prompt
    line = one_line_error(result.stderr)
    assert "prompt 1 has 266 tokens" in line, line


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


def test_sigterm_during_generate_exits_143_with_the_partial_output(tiny_gen: TextGenerator,
                                                                   tiny_dir: Path) -> None:
    text = tiny_gen.generate("Paris will", max_new_tokens=200, greedy=True).text
    interrupt_streamed_generate(CLI_LAUNCH, tiny_dir, text, signal.SIGTERM, 143)
