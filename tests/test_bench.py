"""runtime/bench.py (`gpt2-onnx bench`): the figures a user sizes a machine with, torch-free.

The peers (bench/peers.py, bench/run_bench.py) are not tested here: they need the bench extra
and minutes of CPU; `python bench/run_bench.py --quick` exercises them.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpt2_onnx.runtime.bench import bench_model, clamp_context, summary_rows, synthetic_prompt

SMALL = dict(contexts=(4, 300), new_tokens=4, batch=2, prompt_tokens=1000, threads=1)
TINY_POSITIONS = 256  # the tiny preset's n_positions (export/presets.py)


@pytest.fixture(scope="module")
def result(tiny_dir: Path) -> dict:
    return bench_model(tiny_dir, **SMALL)


def test_documented_keys_and_positive_figures(result: dict) -> None:
    assert {"model_dir", "name", "precision", "kv_layout", "device", "threads", "weight_bytes",
            "load_s", "decode", "ttft", "batch", "memory", "versions"} <= set(result)
    assert result["precision"] == "fp32" and result["device"] == "cpu"
    assert result["load_s"] > 0 and result["ttft"]["ms"] > 0
    assert [d["requested"] for d in result["decode"]] == [[4], [300]]
    for d in result["decode"]:
        assert d["tokens_per_s"] > 0 and d["ttft_ms"] > 0 and 2 <= d["new_tokens"] <= 4
    assert result["batch"]["batch"] == 2 and result["batch"]["tokens_per_s"] > 0
    assert json.loads(json.dumps(result)) == result  # JSON-ready as returned


def test_contexts_are_clamped_to_the_position_table(result: dict) -> None:
    # Hand-computed: 256 positions - 4 new tokens = 252; the TTFT prompt keeps room for 1.
    assert [d["context"] for d in result["decode"]] == [4, TINY_POSITIONS - 4]
    assert result["ttft"]["prompt_tokens"] == TINY_POSITIONS - 1
    assert result["batch"]["context"] == 4  # the first context by default


def test_weight_bytes_are_the_variant_files_on_disk(result: dict, tiny_dir: Path) -> None:
    on_disk = sum(p.stat().st_size for p in tiny_dir.glob("model.onnx*"))
    assert result["weight_bytes"] == on_disk


def test_peak_rss_matches_the_kernel_counter(result: dict) -> None:
    mem = result["memory"]
    assert 0 < mem["rss_before_load"] and 0 < mem["rss_after_load"] <= mem["peak_rss"]
    # getrusage's ru_maxrss (kB on Linux) is the kernel's high-water mark read another way (it is
    # updated lazily, so the two differ by a few percent).
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert mem["peak_rss"] == pytest.approx(maxrss, rel=0.1)


def test_summary_rows_name_every_figure(result: dict) -> None:
    names = [name for name, _ in summary_rows(result)]
    assert sum(n.startswith("decode, context") for n in names) == 2
    assert any("time to first token" in n for n in names) and any("batch 2" in n for n in names)


def test_synthetic_prompts_are_deterministic_and_never_eos() -> None:
    a, b = synthetic_prompt(2000, 50257), synthetic_prompt(2000, 50257)
    assert a == b and len(a) == 2000
    assert min(a) >= 0 and max(a) <= 50255  # 50256 is <|endoftext|>
    assert synthetic_prompt(5, 50257, seed=1) != synthetic_prompt(5, 50257, seed=2)


def test_bad_settings_raise_value_error(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="new_tokens"):
        bench_model(tiny_dir, new_tokens=1)
    with pytest.raises(ValueError, match="contexts"):
        bench_model(tiny_dir, contexts=())
    with pytest.raises(ValueError, match="context"):
        clamp_context(0, 4, 256)


def test_bench_runs_with_torch_blocked(tiny_dir: Path) -> None:
    code = textwrap.dedent(f"""
        import sys, json
        sys.modules.update(torch=None, transformers=None, optimum=None)
        from gpt2_onnx.runtime.bench import bench_model
        r = bench_model({str(tiny_dir)!r}, contexts=(4,), new_tokens=3, batch=2,
                        prompt_tokens=8, threads=1)
        heavy = sorted(m for m, mod in sys.modules.items() if mod is not None and (
            m.split(".")[0] in ("torch", "transformers", "optimum")
            or m.startswith("gpt2_onnx.export")))
        print(json.dumps(dict(rate=r["decode"][0]["tokens_per_s"], heavy=heavy)))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["rate"] > 0 and doc["heavy"] == []


def test_cli_bench_json(tiny_dir):
    from typer.testing import CliRunner

    from gpt2_onnx.cli import app
    r = CliRunner().invoke(app, ["bench", str(tiny_dir), "--contexts", "4", "--new-tokens", "3",
                                 "--batch", "2", "--prompt-tokens", "8", "--threads", "1",
                                 "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["decode"][0]["tokens_per_s"] > 0 and doc["batch"]["batch"] == 2
