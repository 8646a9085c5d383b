"""Serving benchmark: the continuous-batching engine against thread-per-request generation.

    python bench/engine_bench.py --model-dir models/random-gpt2-large-seed0 \
        [--precisions fp32-fused,int4] [--threads 2] [--slots 8] [--prefill-chunk 16]
    python bench/engine_bench.py --quick        # tiny model, < 1 minute: checks the machinery

The same load runs through two modes of one loaded `TextGenerator` (`stream_events`):
- engine: its continuous-batching Engine (`engine_slots` slots), every request in one batch;
- threads: `engine_slots = 0`, the behaviour before the engine: each request runs its own
  batch-1 loop in its own thread, all threads sharing the cores.

Loads (random token ids, greedy, fixed seeds):
- open loop: requests arrive as a Poisson process at rising rates (req/s), prompt lengths uniform
  over 8..512 and 32..128 new tokens (clamped to n_positions);
- closed loop: 1/2/4/8/16 clients, each sending its next request when the previous ends (short
  prompts, so decoding dominates: the figure for "N concurrent requests");
- join: `slots - 1` requests decoding, then a 512-token prompt joins; inter-token gaps of the
  running requests while it loads, against their gaps before it came.

Figures: aggregate tokens/s (new tokens / wall time of the phase), time to first token p50/p99,
inter-token latency p50/p99, peak RSS of the worker process (each precision x mode runs in a fresh
subprocess) against weights + KV buffers. Results: OUT/engine_bench.json, .md and .png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
MODES = ("engine", "threads")
GOALS = {  # issue 12's goals, as ratios measured in one run
    "concurrency8_over_1": {"fp32-fused": 4.0, "int4": 3.0},
    "join_itl_p99_over_step": 2.0,
    "peak_rss_over_weights_kv": 1.15,
}


@dataclass
class Config:
    """One benchmark run's settings (see --help for each)."""

    model_dir: Path | None = None
    precisions: tuple[str, ...] = ("fp32-fused", "int4")
    threads: int = 2
    slots: int = 8
    prefill_chunk: int = 64
    prefill_budget: float | None = 0.8
    rates: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
    requests_per_rate: int = 16
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    closed_prompt: int = 16  # prompt tokens of the closed-loop requests
    closed_new: int = 64  # new tokens of the closed-loop requests
    closed_rounds: int = 1  # requests each closed-loop client sends
    prompt_range: tuple[int, int] = (8, 512)
    new_range: tuple[int, int] = (32, 128)
    join_prompt: int = 512
    modes: tuple[str, ...] = MODES
    seed: int = 0
    out: Path = HERE / "results" / "engine"
    quick: bool = False


# ---------------------------------------------------------------------------- one request


@dataclass
class Trace:
    """What one request saw: times relative to the phase start, in seconds."""

    prompt_tokens: int
    submitted: float
    tokens: list[float] = field(default_factory=list)  # arrival time of each new token
    finish_reason: str = ""

    @property
    def ttft(self) -> float | None:
        return self.tokens[0] - self.submitted if self.tokens else None

    def gaps(self) -> list[float]:
        return list(np.diff(self.tokens)) if len(self.tokens) > 1 else []


def run_request(gen: Any, ids: list[int], new: int, t0: float,
                stop: threading.Event | None = None) -> Trace:
    """One request through `gen.stream_events`; leaves early (cancelling it) once `stop` is
    set."""
    from gpt2_onnx.runtime import DoneEvent, GenerationParams, SamplingSettings

    params = GenerationParams(max_new_tokens=new, sampling=SamplingSettings(greedy=True))
    trace = Trace(len(ids), time.perf_counter() - t0)
    events = gen.stream_events(ids, params, prompt="")
    for ev in events:
        if isinstance(ev, DoneEvent):
            trace.finish_reason = ev.finish_reason
        else:
            trace.tokens.append(time.perf_counter() - t0)
        if stop is not None and stop.is_set():
            trace.finish_reason = "cancelled"
            break
    events.close()
    return trace


def summarize(traces: list[Trace], wall: float) -> dict[str, Any]:
    ttft = [t.ttft for t in traces if t.ttft is not None]
    gaps = [g for t in traces for g in t.gaps()]
    tokens = sum(len(t.tokens) for t in traces)

    def pct(xs: list[float], q: float) -> float | None:
        return float(np.percentile(xs, q) * 1e3) if xs else None

    return {"requests": len(traces), "new_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(gaps, 50), "itl_p99_ms": pct(gaps, 99)}


# ---------------------------------------------------------------------------- loads


def random_ids(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return [int(t) for t in rng.integers(0, vocab - 1, n)]  # never EOS: lengths stay as asked


def poisson_phase(gen: Any, cfg: Config, rate: float) -> dict[str, Any]:
    dims = gen.manifest.dims
    rng = np.random.default_rng(cfg.seed + int(rate * 1000))
    jobs = []
    t = 0.0
    for _ in range(cfg.requests_per_rate):
        t += float(rng.exponential(1.0 / rate))
        new = int(rng.integers(cfg.new_range[0], cfg.new_range[1] + 1))
        hi = min(cfg.prompt_range[1], dims.n_positions - new)
        length = int(rng.integers(min(cfg.prompt_range[0], hi), hi + 1))
        jobs.append((t, random_ids(rng, length, dims.vocab_size), new))
    t0 = time.perf_counter()

    def client(job: tuple[float, list[int], int]) -> Trace:
        at, ids, new = job
        delay = at - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        return run_request(gen, ids, new, t0)

    with ThreadPoolExecutor(len(jobs)) as pool:
        traces = list(pool.map(client, jobs))
    out = summarize(traces, time.perf_counter() - t0)
    out["rate"] = rate
    return out


def closed_phase(gen: Any, cfg: Config, clients: int) -> dict[str, Any]:
    dims = gen.manifest.dims
    rng = np.random.default_rng(cfg.seed + clients)
    prompts = [[random_ids(rng, cfg.closed_prompt, dims.vocab_size)
                for _ in range(cfg.closed_rounds)] for _ in range(clients)]
    t0 = time.perf_counter()

    def client(mine: list[list[int]]) -> list[Trace]:
        return [run_request(gen, ids, cfg.closed_new, t0) for ids in mine]

    with ThreadPoolExecutor(clients) as pool:
        traces = [t for ts in pool.map(client, prompts) for t in ts]
    out = summarize(traces, time.perf_counter() - t0)
    out["clients"] = clients
    return out


def join_phase(gen: Any, cfg: Config) -> dict[str, Any]:
    """slots - 1 requests decode; a long prompt joins; their gaps before vs while it loads."""
    dims = gen.manifest.dims
    rng = np.random.default_rng(cfg.seed + 7)
    running = max(cfg.slots - 1, 1)
    join_len = min(cfg.join_prompt, dims.n_positions - 8)
    prompts = [random_ids(rng, 8, dims.vocab_size) for _ in range(running)]
    stop = threading.Event()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(running) as pool:
        futures = [pool.submit(run_request, gen, p, dims.n_positions - 8, t0, stop)
                   for p in prompts]
        time.sleep(1.0 if cfg.quick else 20.0)  # the running requests' baseline
        joined_at = time.perf_counter() - t0
        joiner = run_request(gen, random_ids(rng, join_len, dims.vocab_size), 1, t0)
        loaded_at = joiner.tokens[0] if joiner.tokens else time.perf_counter() - t0
        time.sleep(0.2 if cfg.quick else 2.0)
        stop.set()
        traces = [f.result() for f in futures]
    before, during = [], []
    for tr in traces:
        for a, b in zip(tr.tokens, tr.tokens[1:], strict=False):
            if b <= joined_at:
                before.append(b - a)
            elif a < loaded_at and b > joined_at:
                during.append(b - a)
    step = float(np.median(before[len(before) // 4:])) if before else float("nan")
    p99 = float(np.percentile(during, 99)) if during else float("nan")
    return {"running": running, "join_prompt": join_len, "step_ms": step * 1e3,
            "join_itl_p99_ms": p99 * 1e3, "join_ttft_ms": (loaded_at - joined_at) * 1e3,
            "ratio": p99 / step if before and during else None,
            "gaps_before": len(before), "gaps_during": len(during)}


# ---------------------------------------------------------------------------- a worker


def model_bytes(gen: Any) -> int:
    from gpt2_onnx.runtime.bench import variant_bytes

    return int(variant_bytes(gen.manifest, gen.decoder.variant))


def kv_bytes(gen: Any, slots: int) -> int:
    d = gen.manifest.dims
    return slots * 2 * d.n_layer * d.n_head * d.n_positions * d.head_dim * 4


def worker(cfg: Config, precision: str, mode: str) -> dict[str, Any]:
    """One precision x mode in this (fresh) process."""
    from gpt2_onnx.runtime import TextGenerator
    from gpt2_onnx.runtime.bench import rss_bytes

    t = time.perf_counter()
    gen = TextGenerator.load(cfg.model_dir, device="cpu", precision=precision,
                             threads=cfg.threads)
    load_s = time.perf_counter() - t
    gen.engine_slots = cfg.slots if mode == "engine" else 0
    gen.engine_prefill_chunk = cfg.prefill_chunk
    gen.engine_prefill_budget = cfg.prefill_budget
    run_request(gen, [1, 2, 3, 4], 4, time.perf_counter())  # warm-up
    out: dict[str, Any] = {"precision": precision, "mode": mode, "load_s": load_s,
                           "weights_bytes": model_bytes(gen),
                           "kv_bytes": kv_bytes(gen, cfg.slots if mode == "engine" else 0)}
    out["poisson"] = [poisson_phase(gen, cfg, r) for r in cfg.rates]
    out["closed"] = [closed_phase(gen, cfg, c) for c in cfg.concurrency]
    out["join"] = join_phase(gen, cfg)
    out["peak_rss"] = rss_bytes()["peak"]  # VmHWM (ru_maxrss survives exec: the parent's)
    gen.close()
    return out


def run_worker(cfg: Config, precision: str, mode: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg_file, out_file = Path(tmp) / "cfg.json", Path(tmp) / "out.json"
        cfg_file.write_text(json.dumps(_cfg_json(cfg)))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(cfg_file),
               precision, mode, str(out_file)]
        subprocess.run(cmd, check=True)
        return json.loads(out_file.read_text())


def _cfg_json(cfg: Config) -> dict[str, Any]:
    d = asdict(cfg)
    d["model_dir"] = str(cfg.model_dir)
    d["out"] = str(cfg.out)
    return d


def _cfg_from_json(d: dict[str, Any]) -> Config:
    d = dict(d)
    d["model_dir"] = Path(d["model_dir"])
    d["out"] = Path(d["out"])
    for k in ("precisions", "rates", "concurrency", "prompt_range", "new_range", "modes"):
        d[k] = tuple(d[k])
    return Config(**d)


# ---------------------------------------------------------------------------- report


def ratios(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals as measured ratios (engine mode)."""
    out: dict[str, Any] = {}
    for r in runs:
        if r["mode"] != "engine":
            continue
        closed = {c["clients"]: c["tokens_per_s"] for c in r["closed"]}
        p = r["precision"]
        entry: dict[str, Any] = {}
        if 1 in closed and 8 in closed and closed[1] > 0:
            goal = GOALS["concurrency8_over_1"].get(p)
            entry["concurrency8_over_1"] = {"value": closed[8] / closed[1], "goal": goal}
        entry["join_itl_p99_over_step"] = {"value": r["join"]["ratio"],
                                           "goal": GOALS["join_itl_p99_over_step"]}
        entry["peak_rss_over_weights_kv"] = {
            "value": r["peak_rss"] / (r["weights_bytes"] + r["kv_bytes"]),
            "goal": GOALS["peak_rss_over_weights_kv"]}
        for v in entry.values():
            v["met"] = None if v["value"] is None or v["goal"] is None \
                else bool(v["value"] >= v["goal"]) if v is entry.get("concurrency8_over_1") \
                else bool(v["value"] <= v["goal"])
        out[p] = entry
    return out


def _f(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# Engine benchmark ({doc['model']}, {doc['config']['threads']} threads, "
             f"{doc['config']['slots']} slots, prefill chunk <= "
             f"{doc['config']['prefill_chunk']}, budget {doc['config']['prefill_budget']})",
             "", f"{doc['when']} on {doc['machine']}. Modes: engine = continuous batching; "
             "threads = one batch-1 loop per request (before the engine).", "",
             "## Goals (engine, ratios within this run)", "",
             "| precision | goal | measured | target | met |", "| --- | --- | --- | --- | --- |"]
    for p, entry in doc["ratios"].items():
        for name, v in entry.items():
            lines.append(f"| {p} | {name} | {_f(v['value'], 2)} | {_f(v['goal'], 2)} | "
                         f"{'–' if v['met'] is None else ('yes' if v['met'] else 'no')} |")
    lines += ["", "## Open loop (Poisson arrivals)", "",
              "| precision | mode | rate req/s | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
              "| ITL p99 ms |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["runs"]:
        for ph in r["poisson"]:
            lines.append(f"| {r['precision']} | {r['mode']} | {ph['rate']} | "
                         f"{_f(ph['tokens_per_s'])} | {_f(ph['ttft_p50_ms'], 0)} | "
                         f"{_f(ph['ttft_p99_ms'], 0)} | {_f(ph['itl_p50_ms'], 0)} | "
                         f"{_f(ph['itl_p99_ms'], 0)} |")
    lines += ["", "## Closed loop (concurrent clients)", "",
              "| precision | mode | clients | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
              "ITL p99 ms |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["runs"]:
        for ph in r["closed"]:
            lines.append(f"| {r['precision']} | {r['mode']} | {ph['clients']} | "
                         f"{_f(ph['tokens_per_s'])} | {_f(ph['ttft_p50_ms'], 0)} | "
                         f"{_f(ph['ttft_p99_ms'], 0)} | {_f(ph['itl_p50_ms'], 0)} | "
                         f"{_f(ph['itl_p99_ms'], 0)} |")
    lines += ["", "## A long prompt joins running requests", "",
              "| precision | mode | running | prompt | step ms before | ITL p99 ms while loading "
              "| ratio | its TTFT ms |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["runs"]:
        j = r["join"]
        lines.append(f"| {r['precision']} | {r['mode']} | {j['running']} | {j['join_prompt']} | "
                     f"{_f(j['step_ms'], 0)} | {_f(j['join_itl_p99_ms'], 0)} | "
                     f"{_f(j['ratio'], 2)} | {_f(j['join_ttft_ms'], 0)} |")
    lines += ["", "## Memory and load", "",
              "| precision | mode | load s | weights MB | KV buffers MB | peak RSS MB |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in doc["runs"]:
        lines.append(f"| {r['precision']} | {r['mode']} | {_f(r['load_s'], 2)} | "
                     f"{r['weights_bytes'] / 1e6:.0f} | {r['kv_bytes'] / 1e6:.0f} | "
                     f"{r['peak_rss'] / 1e6:.0f} |")
    lines += ["", "Chart: engine_bench.png. Command: `" + doc["command"] + "`", ""]
    return "\n".join(lines)


def chart(doc: dict[str, Any], path: Path) -> bool:
    """engine_bench.png; False, drawing nothing, where matplotlib is absent."""
    from chart import pyplot_or_none

    plt = pyplot_or_none()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for r in doc["runs"]:
        label = f"{r['precision']} {r['mode']}"
        style = "-" if r["mode"] == "engine" else "--"
        rates = [p["rate"] for p in r["poisson"]]
        axes[0].plot(rates, [p["tokens_per_s"] for p in r["poisson"]], style, marker="o",
                     label=label)
        axes[1].plot(rates, [p["ttft_p99_ms"] or np.nan for p in r["poisson"]], style,
                     marker="o", label=label)
        clients = [c["clients"] for c in r["closed"]]
        axes[2].plot(clients, [c["tokens_per_s"] for c in r["closed"]], style, marker="o",
                     label=label)
    axes[0].set(title="Open loop: aggregate tokens/s", xlabel="arrival rate (req/s)",
                ylabel="new tokens / s")
    axes[1].set(title="Open loop: time to first token p99", xlabel="arrival rate (req/s)",
                ylabel="ms", yscale="log")
    axes[2].set(title="Closed loop: aggregate tokens/s", xlabel="concurrent clients",
                ylabel="new tokens / s", xscale="log")
    axes[2].set_xticks(doc["config"]["concurrency"], [str(c) for c in
                                                      doc["config"]["concurrency"]])
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Continuous batching vs thread per request — {doc['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- main


def quick_model(tmp: Path) -> Path:
    from gpt2_onnx.export.pipeline import ExportOptions, run_export

    return run_export(ExportOptions(source=None, out=tmp / "random-tiny-seed0",
                                    random_init="tiny", seed=0,
                                    precisions=("fp32", "fp32-fused", "int4"), verify=False,
                                    force=True))


def parse(argv: list[str] | None) -> Config:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="an export with the precisions below")
    ap.add_argument("--precisions", default="fp32-fused,int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--prefill-chunk", type=int, default=64,
                    help="at most this many prompt tokens loaded per step while others decode")
    ap.add_argument("--prefill-budget", type=float, default=0.8,
                    help="a chunk's share of a decode run's time (0: fixed --prefill-chunk)")
    ap.add_argument("--rates", default="0.05,0.1,0.2,0.4", help="Poisson arrival rates, req/s")
    ap.add_argument("--requests-per-rate", type=int, default=16)
    ap.add_argument("--concurrency", default="1,2,4,8,16")
    ap.add_argument("--closed-rounds", type=int, default=1,
                    help="requests each closed-loop client sends")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true",
                    help="tiny model exported to a temp dir, small loads: < 1 minute")
    a = ap.parse_args(argv)
    cfg = Config(model_dir=a.model_dir, precisions=tuple(a.precisions.split(",")),
                 threads=a.threads, slots=a.slots, prefill_chunk=a.prefill_chunk,
                 prefill_budget=a.prefill_budget or None,
                 rates=tuple(float(x) for x in a.rates.split(",")),
                 requests_per_rate=a.requests_per_rate,
                 concurrency=tuple(int(x) for x in a.concurrency.split(",")),
                 closed_rounds=a.closed_rounds, modes=tuple(a.modes.split(",")),
                 quick=a.quick)
    if a.quick:
        cfg.rates, cfg.requests_per_rate = (20.0, 80.0), 8
        cfg.prompt_range, cfg.new_range = (8, 160), (16, 32)
        cfg.closed_new = 32
        cfg.join_prompt = 200
        cfg.out = a.out or HERE / "results" / "engine" / "quick"
    else:
        if cfg.model_dir is None:
            ap.error("--model-dir is required (or --quick)")
        cfg.out = a.out or HERE / "results" / "engine"
    bad = [m for m in cfg.modes if m not in MODES]
    if bad:
        ap.error(f"--modes: {bad} not in {MODES}")
    return cfg


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        cfg_file, precision, mode, out_file = argv[1:5]
        cfg = _cfg_from_json(json.loads(Path(cfg_file).read_text()))
        Path(out_file).write_text(json.dumps(worker(cfg, precision, mode)))
        return
    cfg = parse(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.quick:
            cfg.model_dir = quick_model(Path(tmp))
        runs = []
        for precision in cfg.precisions:
            for mode in cfg.modes:
                print(f"[engine_bench] {precision} / {mode} ...", file=sys.stderr, flush=True)
                runs.append(run_worker(cfg, precision, mode))
        from gpt2_onnx.runtime import read_manifest

        model = read_manifest(cfg.model_dir).name
    doc = {"when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
           "model": model, "config": _cfg_json(cfg), "runs": runs, "ratios": ratios(runs),
           "command": "python bench/engine_bench.py " + " ".join(argv),
           "elapsed_s": time.perf_counter() - started}
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "engine_bench.json").write_text(json.dumps(doc, indent=1))
    (cfg.out / "engine_bench.md").write_text(markdown(doc))
    if not chart(doc, cfg.out / "engine_bench.png"):
        from chart import NO_MATPLOTLIB

        print(f"[engine_bench] {NO_MATPLOTLIB}", file=sys.stderr)
    print(markdown(doc))
    print(f"[engine_bench] {time.perf_counter() - started:.0f} s; results in {cfg.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
