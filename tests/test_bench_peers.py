"""bench/run_bench.py's derived figures (no timing): medians and spreads, the sound ceiling, issue
16's goals, the table; bench/llama_setup.py's conversion staging; and, where llama.cpp has been
built (`python bench/llama_setup.py build`, minutes), its worker against transformers' greedy
tokens (slow: the default suite never builds llama.cpp)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import llama_setup  # noqa: E402
import run_bench  # noqa: E402

DIMS = SimpleNamespace(n_layer=2, n_head=4, head_dim=16)  # 2 * 2 * 4 * 16 = 256 KV elements/pos
BIG = 1 << 30  # weights far above CACHE_SIZED_BYTES, so achieved bandwidth counts


def decode(context: int, tok_s: float, new: int = 32) -> dict:
    return {"kind": "decode", "context": context, "new_tokens": new, "tokens_per_s": tok_s,
            "batch": 1}


def worker(system: str, repeat: int, phases: list[dict], load: float = 1.0,
           rss: int = 100 << 20) -> dict:
    return {"system": system, "repeat": repeat, "load_s": load, "peak_rss": rss,
            "phases": phases}


def test_stat_is_the_median_and_the_spread() -> None:
    assert run_bench.stat([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert run_bench.stat([4.0, 1.0]) == {"median": 2.5, "min": 1.0, "max": 4.0, "n": 2}
    assert run_bench.stat([]) is None
    assert run_bench.med(None) is None


def test_ceiling_is_the_best_probe_unless_a_system_beat_it() -> None:
    probes = [{"system": "gemv", "when": "before", "bytes_per_s": 10e9},
              {"system": "ort-gemv", "when": "after", "bytes_per_s": 30e9},
              {"system": "stream", "when": "before", "error": "exit 1"}]
    quiet = run_bench.sound_bandwidth(probes, [{"system": "x", "context": 8, "repeat": 0,
                                                "bytes_per_s": 25e9}])
    assert quiet["bytes_per_s"] == 30e9 and quiet["set_by"] == "probe ort-gemv (after)"
    beaten = run_bench.sound_bandwidth(probes, [{"system": "ours:int4", "context": 8,
                                                 "repeat": 1, "bytes_per_s": 41e9}])
    assert beaten["bytes_per_s"] == 41e9 and beaten["set_by"].startswith("ours:int4")
    assert run_bench.sound_bandwidth([], [])["bytes_per_s"] == 0.0


def test_summary_medians_spreads_and_a_ceiling_no_system_exceeds() -> None:
    doc = {"bandwidth": {"probes": [{"system": "gemv", "when": "before", "bytes_per_s": 1e9}]},
           "workers": [
               worker("a", 0, [decode(8, 10.0)], load=2.0, rss=300),
               worker("a", 0, [{"kind": "ttft", "context": 512, "ttft_ms": 90.0}], 2.5, 500),
               worker("a", 1, [decode(8, 14.0)], load=4.0, rss=400),
               worker("a", 1, [{"kind": "ttft", "context": 512, "ttft_ms": 70.0}], 3.5, 200),
               worker("a", 2, [decode(8, 12.0)], load=3.0, rss=350),
               {"system": "b", "repeat": 0, "error": "exit 1: boom", "phases": []},
           ]}
    summary = run_bench.summarize(DIMS, ["a", "b"], doc, {"a": BIG, "b": BIG}, {})
    a = summary["a"]
    assert a["decode"][8] == {"median": 12.0, "min": 10.0, "max": 14.0, "n": 3}
    assert a["ttft_ms"] == {"median": 80.0, "min": 70.0, "max": 90.0, "n": 2}
    assert a["load_s"]["median"] == 3.0 and a["load_s"]["n"] == 5
    # peak RSS: per repetition the max over its subprocesses (500, 400, 350), then the median
    assert a["peak_rss"] == {"median": 400, "min": 350, "max": 500, "n": 3}
    # 14 tok/s x (2^30 + KV of 256 elements x 4 bytes x (8 + 16) positions) beats the 1 GB/s probe
    step = BIG + 256 * 4 * 24
    assert doc["bandwidth"]["bytes_per_s"] == pytest.approx(14.0 * step)
    assert a["ceiling"][8] == pytest.approx(14.0)  # the fastest run sits at 100 %, not above
    assert summary["b"]["errors"] == ["exit 1: boom"] and summary["b"]["decode"] == {}


def test_cache_sized_systems_do_not_set_the_ceiling() -> None:
    doc = {"bandwidth": {"probes": [{"system": "gemv", "when": "after", "bytes_per_s": 5e9}]},
           "workers": [worker("tiny", 0, [decode(8, 1e6)])]}
    run_bench.summarize(DIMS, ["tiny"], doc, {"tiny": 4 << 20}, {})
    assert doc["bandwidth"]["bytes_per_s"] == 5e9


def test_llama_kv_cache_is_counted_in_f16() -> None:
    assert run_bench.kv_itemsize("llama-q4_0") == 2 and run_bench.kv_itemsize("ours:int4") == 4
    assert run_bench.kv_bytes_read(DIMS, 10, 2) == 2 * 2 * 4 * 16 * 10 * 2


def _summary_entry(decode8: float, ttft: float, batch: float, load: float, rss: float,
                   ceiling8: float = 100.0) -> dict:
    one = run_bench.stat
    return {"decode": {"8": one([decode8])}, "ceiling": {"8": ceiling8}, "ttft_ms": one([ttft]),
            "batch_tokens_per_s": one([batch]), "load_s": one([load]), "peak_rss": one([rss])}


def test_issue16_goals_compare_with_the_best_rival_of_each_column() -> None:
    summary = {
        "ours:int4": _summary_entry(60, 1000, 300, 1.0, 900, ceiling8=65),
        "llama-q4_0": _summary_entry(70, 1500, 250, 0.5, 800),
        "llama-q4_k_m": _summary_entry(50, 1200, 280, 0.8, 1000),
        "ct2-int8": _summary_entry(500, 1, 1, 0.1, 1),  # not a rival of int4: coarser only
    }
    verify = {"checks": [{"variant": "int4", "passed": False}]}
    rows = {g["goal"].split(":", 2)[1].split(":")[0].strip(): g
            for g in run_bench.goals_issue16(summary, verify)}
    d8 = rows["int4 decode @8"]
    assert d8["versus"] == "llama-q4_0" and d8["measured"] == pytest.approx(60 / 70)
    assert d8["met"] is False and "verify FAILED" in d8["note"]
    ttft = rows["int4 time to first token"]
    assert ttft["versus"] == "llama-q4_k_m" and ttft["measured"] == pytest.approx(1000 / 1200)
    assert ttft["met"] is True and ttft["compare"] == "<="
    assert rows["int4 batch throughput"]["measured"] == pytest.approx(300 / 280)
    assert rows["int4 load"]["versus"] == "llama-q4_0" and rows["int4 load"]["met"] is False
    assert rows["int4 peak RSS"]["measured"] == pytest.approx(900 / 800)
    ceiling = rows["int4 decode @8 / sound ceiling"]
    assert ceiling["measured"] == pytest.approx(60 / 65) and ceiling["met"] is True


def test_table_cells_show_the_median_and_the_spread() -> None:
    assert run_bench.cell(run_bench.stat([10.0, 14.0, 12.0])) == "12.00 (10.00–14.00)"
    assert run_bench.cell(run_bench.stat([3.0])) == "3.00"
    assert run_bench.cell(run_bench.stat([2 << 20, 4 << 20]), "{:.0f}", 1 << 20) == "3 (2–4)"
    assert run_bench.cell(None) == "—"


def test_the_chart_is_skipped_without_matplotlib(tmp_path: Path, monkeypatch) -> None:
    """A machine with the README's runtime extras but no matplotlib (issue 31): the benchmark
    still writes its tables and skips the chart, never a ModuleNotFoundError after the run."""
    import chart

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` -> ImportError
    assert chart.pyplot_or_none() is None
    assert chart.plot({"summary": {}}, tmp_path / "bench.png") is None
    assert not (tmp_path / "bench.png").exists()
    assert "matplotlib" in chart.NO_MATPLOTLIB and ".[bench]" in chart.NO_MATPLOTLIB


def test_markdown_and_chart_from_a_summarized_run(tmp_path: Path) -> None:
    from chart import plot

    doc = {"bandwidth": {"probes": [{"system": "stream", "when": "before", "bytes_per_s": 2e9}]},
           "workers": [worker("ours:int4", r, [decode(8, 10.0 + r)]) for r in range(3)]
           + [worker("llama-q4_0", r, [decode(8, 13.0)]) for r in range(3)]}
    systems = ["ours:int4", "llama-q4_0"]
    doc["summary"] = run_bench.summarize(DIMS, systems, doc, dict.fromkeys(systems, BIG), {})
    doc["goals"] = run_bench.goals_issue16(doc["summary"])
    doc.update(
        machine={"cpu": "cpu", "isa": [], "physical_cores": 2, "logical_cpus": 2,
                 "memory_bytes": 1e10, "loadavg_start": [0.04, 0.2, 1.0],
                 "loadavg_end": [2.0, 1.9, 1.5]},
        config={"threads": 2, "new_tokens": 32, "repeats": 3, "gemv_mib": 1024,
                "prompt_tokens": 512, "batch": 8, "alternate": True},
        model={"source": {"preset": "p", "seed": 0},
               "dims": {"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 256}},
        versions={}, date="today", llama_cpp={"llama_cpp_commit": "abc", "cmake_flags": []})
    doc = json.loads(json.dumps(doc))  # as bench.json holds it: context keys are strings
    md = run_bench.markdown(doc)
    assert "| ours:int4 | 1024 | 11.00 (10.00–12.00) |" in md
    assert "before the run 0.0/0.2/1.0, after 2.0/1.9/1.5." in md
    assert "| ours:int4 decode @8: first against llama-q4_0 | 0.846 x | llama-q4_0 |" in md
    assert "set by ours:int4 decode at context 8" not in md  # llama-q4_0 13 tok/s set it
    assert "set by llama-q4_0 decode at context 8" in md
    assert plot(doc, tmp_path / "bench.png").stat().st_size > 0
    # a variant that failed verify (here from a `gpt2-onnx verify --report` file) is marked in
    # the table, and the note says where the verdict came from
    report = tmp_path / "verify.json"
    report.write_text(json.dumps({"passed": False, "checks": [
        {"variant": "int4", "check": "logits-decode", "figure": "KL 0.02", "passed": False}]}))
    doc["model"]["verify"] = run_bench.verify_of(
        SimpleNamespace(verify_report=report), None)
    md = run_bench.markdown(doc)
    assert "| ours:int4 (fails verify) | 1024 |" in md
    assert f"Verify (from {report}): FAILED; int4 logits-decode KL 0.02" in md
    # a check that does not apply to an inexact variant ("not run") is no failure
    assert run_bench.failed_variants({"checks": [
        {"variant": "int4", "check": "top-k-sampling", "status": "not run", "passed": False},
        {"variant": "int8", "check": "logits-decode", "status": "fail", "passed": False}]}) \
        == {"int8"}
    report.write_text("{}")
    with pytest.raises(ValueError, match="not a gpt2-onnx verify report"):
        run_bench.verify_of(SimpleNamespace(verify_report=report), None)


def test_llama_group_expands_and_schedules_rotate_between_repetitions() -> None:
    systems = run_bench.expand_systems(["llama", "llama-q4_0", "torch"], ["fp32"])
    assert systems == ["llama-f32", "llama-q8_0", "llama-q4_0", "llama-q4_k_m", "torch"]
    assert set(run_bench.LLAMA_SYSTEMS) == set(llama_setup.SYSTEMS)
    cfg = run_bench.Config(alternate=True)
    phases = [{"kind": k} for k in ("a", "b")]
    first = run_bench.schedule(cfg, ["x", "y", "z"], phases, 0)
    second = run_bench.schedule(cfg, ["x", "y", "z"], phases, 1)
    assert [s for s, _ in first] == ["x", "y", "z", "y", "z", "x"]
    assert [s for s, _ in second] == ["z", "x", "y", "x", "y", "z"]
    for jobs in (first, second):  # every system measures every phase once per repetition
        assert sorted((s, p[0]["kind"]) for s, p in jobs) == sorted(
            (s, k) for s in "xyz" for k in "ab")


def test_the_converter_gets_n_ctx_without_touching_the_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"n_positions": 256, "n_embd": 64}))
    (ckpt / "model.safetensors").write_bytes(b"weights")
    staged = llama_setup._staged_checkpoint(ckpt, tmp_path / "stage")
    assert json.loads((staged / "config.json").read_text())["n_ctx"] == 256
    assert (staged / "model.safetensors").read_bytes() == b"weights"
    assert "n_ctx" not in json.loads((ckpt / "config.json").read_text())
    assert llama_setup._staged_checkpoint(staged, tmp_path / "again") == staged  # has n_ctx
    with pytest.raises(ValueError, match="llama-q3"):
        llama_setup.convert(llama_setup.default(), ckpt, tmp_path / "out", ["llama-q3"])


@pytest.mark.slow
@pytest.mark.skipif(not llama_setup.default().is_built(),
                    reason="llama.cpp not built (python bench/llama_setup.py build)")
def test_llama_worker_greedy_tokens_match_transformers(tmp_path: Path) -> None:
    """The llama.cpp worker decodes what transformers decodes: the tiny random GPT-2 in F32,
    batch 1 and a batch of 2 prompts, greedy."""
    import peers
    import torch

    from gpt2_onnx.export.presets import build_random_model
    from gpt2_onnx.export.tokenizer import save_tokenizer_files

    model = build_random_model("tiny", 0)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    save_tokenizer_files(ckpt, model.config.n_positions)  # the converter reads the vocabulary
    lc = llama_setup.default()
    gguf = llama_setup.convert(lc, ckpt, tmp_path / "gguf", ["llama-f32"])["llama-f32"]
    prompts = [[464, 3290, 318, 257, 1332], [1, 2, 3, 4, 5]]
    with torch.inference_mode():
        ids = torch.tensor(prompts)
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                              min_new_tokens=6, do_sample=False, pad_token_id=50256)[:, 5:]
    runner = peers.LlamaRunner(str(gguf), 1, lc.worker_paths(), max_rows=2)
    run = runner.run(prompts, 6)
    assert run.decoded == 2 * 5
    assert [list(t) for t in zip(*runner.last_tokens, strict=True)] == want.tolist()
    runner.run(prompts[:1], 6)
    assert [t[0] for t in runner.last_tokens] == want[0].tolist()
