"""Load benchmark of `gpt2-onnx serve`: closed-loop clients, an open-loop overload, memory.

    python bench/serve_load.py --model-dir models/random-gpt2-large-seed0 \
        --precisions fp32-fused,int4 --threads 2       # the full run (results/serve/serve_load.*)
    python bench/serve_load.py --quick                 # tiny model, ~1 min (results/serve/quick/)
    python bench/serve_load.py --target http://127.0.0.1:8080 --target-name llama-server \
        --target-pid PID                                    # the same load on another server

Everything goes to the loopback address only, and every loop is bounded in requests and time.
Per variant:
1. The server as a subprocess (`gpt2-onnx serve --port 0`).
2. HTTP overhead at concurrency 1: the same greedy request on the engine in this process (no
   HTTP) and through the server, alternating for --inprocess-requests rounds; then the
   in-process engine is freed. RSS read from /proc after a warm-up that fills every slot once
   (steady-state memory: onnxruntime's full-batch buffers).
3. Closed loop at each concurrency: that many clients, each sending its next streamed greedy
   completion (short prompt, --max-tokens new tokens) as soon as the last one ends. Reported:
   tokens/s and requests/s over the level's wall time, time to first token and inter-token gap
   p50/p99 (as the client sees the SSE chunks), errors by status code.
4. Open-loop overload: requests arrive at --overload-factor x the best closed-loop requests/s
   (Poisson arrivals) for --overload-seconds; every request must end in a completion or a 429
   (a timeout counts as hung, a connection error as lost).
5. RSS after the run (idle again), then SIGTERM: the server must exit 0.
Writes OUT/serve_load.json (rewritten after each step) and OUT/serve_load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

HERE = Path(__file__).resolve().parent
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PROMPTS = ("Paris will", "The history of the city", "Once upon a time", "In 1999, the",
           "The best way to learn", "A short note on", "Scientists have found", "My favourite")
# The peer, measured by hand (issue 13): llama.cpp's llama-server, 8 slots, 2 threads, random
# gpt2-large Q4_0, streamed greedy 64-token completions of short prompts, closed loop.
LLAMA_SERVER_Q4_0 = {1: 68.8, 2: 81.8, 4: 154.8, 8: 182.0}
LAUNCH = "import sys; from gpt2_onnx.cli import main; sys.argv[0] = 'gpt2-onnx'; main()"


@dataclass
class Config:
    model_dir: Path | None = None
    precisions: tuple[str, ...] = ("fp32-fused", "int4")
    threads: int = 2
    slots: int = 8
    max_queue: int = 64
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    max_tokens: int = 64
    level_seconds: float = 60.0  # wall-time bound of one closed-loop level
    level_requests: int = 64  # request bound of one level (at least 2 per client)
    inprocess_requests: int = 6  # rounds of the in-process vs HTTP comparison
    overload_factor: float = 10.0
    overload_seconds: float = 20.0
    overload_max_requests: int = 2000
    request_timeout: float = 300.0  # a request without an answer by then is "hung"
    target: str | None = None  # an existing server instead of ours (loopback only)
    target_name: str = "target"
    target_pid: int | None = None
    target_model: str | None = None
    out: Path = HERE / "results" / "serve"
    quick: bool = False


@dataclass
class Level:
    concurrency: int
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    requests_per_s: float = 0.0
    ttft_ms_p50: float | None = None
    ttft_ms_p99: float | None = None
    itl_ms_p50: float | None = None
    itl_ms_p99: float | None = None
    errors: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------ one request


@dataclass
class Outcome:
    status: str  # "200", "429", ..., "hung", "lost"
    tokens: int = 0
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    seconds: float = 0.0


async def one_request(client: Any, url: str, model: str | None, prompt: str, max_tokens: int,
                      timeout: float) -> Outcome:
    """One streamed greedy completion; tokens = SSE chunks carrying a choice before [DONE]."""
    import httpx

    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                            "stream": True}
    if model:
        body["model"] = model
    start = time.perf_counter()
    out = Outcome("lost")

    async def read() -> None:
        last: float | None = None
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                out.status = str(resp.status_code)
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    out.status = "200"
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    out.status = "stream-error"
                    return
                choices = chunk.get("choices") or []
                if not choices or choices[0].get("finish_reason") is not None \
                        and not choices[0].get("text"):
                    continue
                now = time.perf_counter()
                if last is None:
                    out.ttft_s = now - start
                else:
                    out.gaps_s.append(now - last)
                last = now
                out.tokens += 1

    try:
        await asyncio.wait_for(read(), timeout)  # asyncio.timeout is Python 3.11+
    except asyncio.TimeoutError:
        out.status = "hung"
    except httpx.HTTPError:
        out.status = "lost"
    finally:
        out.seconds = time.perf_counter() - start
    return out


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q) * 1e3) if values else None


def _summarize(level: Level, outcomes: list[Outcome], seconds: float) -> Level:
    ok = [o for o in outcomes if o.status == "200"]
    level.requests = len(ok)
    level.tokens = sum(o.tokens for o in ok)
    level.seconds = seconds
    level.tokens_per_s = level.tokens / seconds if seconds else 0.0
    level.requests_per_s = level.requests / seconds if seconds else 0.0
    ttft = [o.ttft_s for o in ok if o.ttft_s is not None]
    gaps = [g for o in ok for g in o.gaps_s]
    level.ttft_ms_p50, level.ttft_ms_p99 = _pct(ttft, 50), _pct(ttft, 99)
    level.itl_ms_p50, level.itl_ms_p99 = _pct(gaps, 50), _pct(gaps, 99)
    for o in outcomes:
        if o.status != "200":
            level.errors[o.status] = level.errors.get(o.status, 0) + 1
    return level


# ------------------------------------------------------------------------------ the loads


async def closed_loop(url: str, model: str | None, cfg: Config, concurrency: int) -> Level:
    """`concurrency` clients, each sending its next request when the last ends; bounded by
    cfg.level_requests (at least 2 per client) and cfg.level_seconds."""
    import httpx

    budget = max(cfg.level_requests, 2 * concurrency)
    outcomes: list[Outcome] = []
    started = 0
    deadline = time.monotonic() + cfg.level_seconds
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)

    async def client_loop(c: httpx.AsyncClient, worker: int) -> None:
        nonlocal started
        rng = random.Random(worker)
        while started < budget and time.monotonic() < deadline:
            started += 1
            outcomes.append(await one_request(c, url, model, rng.choice(PROMPTS),
                                              cfg.max_tokens, cfg.request_timeout))

    async with httpx.AsyncClient(timeout=None, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(c, w) for w in range(concurrency)))
        seconds = time.perf_counter() - t0
    return _summarize(Level(concurrency), outcomes, seconds)


async def open_loop(url: str, model: str | None, cfg: Config, rate: float) -> dict[str, Any]:
    """Poisson arrivals at `rate` requests/s for cfg.overload_seconds (at most
    cfg.overload_max_requests); waits for every request to end (or time out as hung)."""
    import httpx

    rng = random.Random(0)
    tasks: list[asyncio.Task[Outcome]] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=None, limits=limits) as c:
        t0 = time.perf_counter()
        next_at = 0.0
        while next_at < cfg.overload_seconds and len(tasks) < cfg.overload_max_requests:
            delay = t0 + next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(
                c, url, model, rng.choice(PROMPTS), cfg.max_tokens, cfg.request_timeout)))
            next_at += rng.expovariate(rate)
        sent_s = time.perf_counter() - t0
        outcomes = await asyncio.gather(*tasks)
        total_s = time.perf_counter() - t0
    by_status: dict[str, int] = {}
    for o in outcomes:
        by_status[o.status] = by_status.get(o.status, 0) + 1
    ok = [o for o in outcomes if o.status == "200"]
    return {"rate_per_s": rate, "sent": len(outcomes), "sent_seconds": sent_s,
            "seconds": total_s, "by_status": by_status,
            "completed": by_status.get("200", 0), "rejected_429": by_status.get("429", 0),
            "hung": by_status.get("hung", 0), "lost": by_status.get("lost", 0),
            "other": sum(v for k, v in by_status.items() if k not in ("200", "429")),
            "tokens_per_s": sum(o.tokens for o in ok) / total_s if total_s else 0.0,
            "ttft_ms_p50": _pct([o.ttft_s for o in ok if o.ttft_s is not None], 50),
            "ttft_ms_p99": _pct([o.ttft_s for o in ok if o.ttft_s is not None], 99),
            "every_request_answered": all(o.status in ("200", "429") for o in outcomes)}


# ------------------------------------------------------------------------------ in-process


async def overhead_rounds(model_dir: Path, precision: str, cfg: Config, url: str
                          ) -> tuple[list[float], list[float]]:
    """tokens/s of the same sequential greedy request on the engine in this process (no HTTP)
    and through the server, alternating round by round (a slow spell of a shared machine hits
    both). The in-process engine is freed before the load starts."""
    import httpx

    from gpt2_onnx.runtime.engine import Engine, GenerationParams, TokenEvent
    from gpt2_onnx.runtime.generator import TextGenerator
    from gpt2_onnx.runtime.sampling import SamplingSettings

    gen = TextGenerator.load(model_dir, device="cpu", precision=precision, threads=cfg.threads)
    params = GenerationParams(max_new_tokens=cfg.max_tokens,
                              sampling=SamplingSettings(greedy=True))
    inproc: list[float] = []
    http: list[float] = []

    def local(engine: Engine, prompt: str) -> float:
        t0 = time.perf_counter()
        n = sum(isinstance(ev, TokenEvent) for ev in engine.submit(gen.encode(prompt),
                                                                   params).events())
        return n / (time.perf_counter() - t0)

    with Engine(gen, slots=cfg.slots, max_queue=cfg.max_queue) as engine:
        async with httpx.AsyncClient(timeout=None) as c:
            for i in range(cfg.inprocess_requests + 1):  # round 0 warms both up
                prompt = PROMPTS[i % len(PROMPTS)]
                a = await asyncio.to_thread(local, engine, prompt)
                o = await one_request(c, url, None, prompt, cfg.max_tokens, cfg.request_timeout)
                if i:
                    inproc.append(a)
                    http.append(o.tokens / o.seconds if o.seconds else 0.0)
    return inproc, http  # the engine is closed; its model goes with this frame


# ------------------------------------------------------------------------------ the server


class ServerProcess:
    def __init__(self, model_dir: Path, precision: str, cfg: Config, log: Path) -> None:
        self.log = log
        self._err = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, "serve", str(model_dir), "--host", "127.0.0.1",
             "--port", "0", "--precision", precision, "--threads", str(cfg.threads),
             "--slots", str(cfg.slots), "--max-queue", str(cfg.max_queue), "--grace", "60"],
            stdout=subprocess.DEVNULL, stderr=self._err,
            env={**os.environ, "COLUMNS": "300", "NO_COLOR": "1"})
        self.url = self._wait()

    def _wait(self, timeout: float = 600) -> str:
        import httpx

        end = time.monotonic() + timeout
        url = None
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log.read_text()[-2000:]}")
            found = re.search(r"http://127\.0\.0\.1:\d+", self.log.read_text())
            if found:
                url = found.group(0)
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        return url
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        raise TimeoutError(f"the server was not ready in {timeout} s")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._err.close()


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def wait_idle(url: str, seconds: float = 60) -> None:
    """Until /health reports no busy slot and no queue (our server), or a short pause."""
    import httpx

    end = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=10) as c:
        while time.monotonic() < end:
            try:
                doc = (await c.get(f"{url}/health")).json()
            except (httpx.HTTPError, ValueError):
                return
            if doc.get("busy_slots", 0) == 0 and doc.get("queue_length", 0) == 0:
                return
            await asyncio.sleep(0.2)


async def run_load(url: str, model: str | None, pid: int | None, cfg: Config,
                   record: dict[str, Any], save: Any) -> None:
    """Warm-up, closed loop at each concurrency, open-loop overload, RSS before and after."""
    import httpx

    async with httpx.AsyncClient(timeout=cfg.request_timeout) as c:
        await one_request(c, url, model, PROMPTS[0], cfg.max_tokens, cfg.request_timeout)
        record["rss_mb_one_request"] = rss_mb(pid)
        # Warm up every slot at once: onnxruntime's buffers for a full batch and the KV pages
        # are steady-state memory (int4 gpt2: +445 MB from 1 to 8 rows, then flat up to 32
        # clients), not growth the run should be blamed for.
        await asyncio.gather(*(one_request(c, url, model, PROMPTS[i % len(PROMPTS)],
                                           cfg.max_tokens, cfg.request_timeout)
                               for i in range(cfg.slots)))
    await wait_idle(url)
    record["rss_mb_before"] = rss_mb(pid)
    record["closed_loop"] = []
    for conc in cfg.concurrency:
        level = await closed_loop(url, model, cfg, conc)
        record["closed_loop"].append(asdict(level))
        print(f"  c={conc}: {level.tokens_per_s:.1f} tok/s, {level.requests_per_s:.2f} req/s, "
              f"ttft p50 {level.ttft_ms_p50 or 0:.0f} ms, itl p99 {level.itl_ms_p99 or 0:.0f} "
              f"ms, errors {level.errors}", file=sys.stderr, flush=True)
        save()
        await wait_idle(url)
    best = max((lv["requests_per_s"] for lv in record["closed_loop"]), default=1.0) or 1.0
    record["overload"] = await open_loop(url, model, cfg, cfg.overload_factor * best)
    ov = record["overload"]
    print(f"  overload at {ov['rate_per_s']:.1f} req/s: {ov['by_status']}", file=sys.stderr,
          flush=True)
    await wait_idle(url)
    time.sleep(1.0)
    record["rss_mb_after"] = rss_mb(pid)
    save()


# ------------------------------------------------------------------------------ the run


def _goals(rec: dict[str, Any]) -> dict[str, Any]:
    by_c = {lv["concurrency"]: lv for lv in rec.get("closed_loop", [])}
    goals: dict[str, Any] = {}
    if 1 in by_c and 8 in by_c and by_c[1]["tokens_per_s"]:
        ratio = by_c[8]["tokens_per_s"] / by_c[1]["tokens_per_s"]
        goals["c8_over_c1"] = {"value": ratio, "goal": ">= 3.5 (fp32-fused)",
                               "met": ratio >= 3.5}
    inproc, http = rec.get("inprocess_tok_s"), rec.get("http_c1_tok_s")
    if inproc and http:
        base, served = float(np.median(inproc)), float(np.median(http))
        overhead = 1 - served / base
        goals["http_overhead_c1"] = {"value": overhead, "inprocess_tok_s": base,
                                     "http_tok_s": served, "goal": "<= 5 %",
                                     "met": overhead <= 0.05}
    ov = rec.get("overload")
    if ov:
        goals["overload_all_answered"] = {"value": ov["by_status"],
                                          "goal": "every request 200 or 429",
                                          "met": ov["every_request_answered"]}
    before, after = rec.get("rss_mb_before"), rec.get("rss_mb_after")
    if before and after:
        growth = after / before - 1
        goals["rss_growth"] = {"value": growth, "goal": "<= 5 %", "met": growth <= 0.05}
    if rec.get("name", "").endswith("int4") or rec.get("precision") == "int4":
        ahead = {c: by_c[c]["tokens_per_s"] > peer for c, peer in LLAMA_SERVER_Q4_0.items()
                 if c in by_c}
        goals["ahead_of_llama_server_q4_0"] = {"value": ahead, "goal": "every concurrency",
                                               "met": bool(ahead) and all(ahead.values())}
    return goals


def run(cfg: Config) -> dict[str, Any]:
    cfg.out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "peer_llama_server_q4_0_tok_s": LLAMA_SERVER_Q4_0, "runs": []}

    def save() -> None:
        for rec in doc["runs"]:
            rec["goals"] = _goals(rec)
        (cfg.out / "serve_load.json").write_text(json.dumps(doc, indent=2))
        (cfg.out / "serve_load.md").write_text(markdown(doc))

    if cfg.target:
        rec: dict[str, Any] = {"name": cfg.target_name, "url": cfg.target}
        doc["runs"].append(rec)
        print(f"{cfg.target_name}: {cfg.target}", file=sys.stderr, flush=True)
        asyncio.run(run_load(cfg.target, cfg.target_model, cfg.target_pid, cfg, rec, save))
        save()
        return doc
    assert cfg.model_dir is not None
    for precision in cfg.precisions:
        rec = {"name": f"gpt2-onnx {precision}", "precision": precision}
        doc["runs"].append(rec)
        with tempfile.TemporaryDirectory() as tmp:
            server = ServerProcess(cfg.model_dir, precision, cfg, Path(tmp) / "server.log")
            print(f"{precision}: server {server.url}; in-process vs HTTP rounds",
                  file=sys.stderr, flush=True)
            try:
                rec["inprocess_tok_s"], rec["http_c1_tok_s"] = asyncio.run(
                    overhead_rounds(cfg.model_dir, precision, cfg, server.url))
                gc.collect()
                save()
                asyncio.run(run_load(server.url, None, server.proc.pid, cfg, rec, save))
            finally:
                rec["server_exit_code"] = server.stop()
                rec["server_log_tail"] = server.log.read_text()[-600:]
        save()
    return doc


def markdown(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    lines = [f"# Serving load: {doc['when']}", "",
             f"{doc['machine']['cpus']} CPUs, {cfg['threads']} threads, {cfg['slots']} slots, "
             f"max queue {cfg['max_queue']}; streamed greedy completions of {cfg['max_tokens']} "
             f"tokens from short prompts; closed loop per concurrency (bounded: "
             f"{cfg['level_requests']} requests or {cfg['level_seconds']:g} s), then an open-loop "
             f"overload at {cfg['overload_factor']:g}x the best requests/s for "
             f"{cfg['overload_seconds']:g} s. Loopback only. Load average at the start: "
             f"{', '.join(f'{x:.1f}' for x in doc['machine']['load_average_at_start'])} "
             "(other work on the machine makes every figure noisier).", ""]
    if cfg["quick"]:
        lines += ["Quick mode: the tiny model, a check of the machinery. Its tokens cost ~1 ms, "
                  "so Python and HTTP dominate and the goals (set for gpt2-large, where a token "
                  "costs 15-80 ms) do not apply here.", ""]
    for rec in doc["runs"]:
        lines += [f"## {rec['name']}", "",
                  "| concurrency | tokens/s | requests/s | TTFT p50 / p99 ms | inter-token p50 "
                  "/ p99 ms | errors |", "| ---: | ---: | ---: | ---: | ---: | --- |"]
        for lv in rec.get("closed_loop", []):
            def ms(v: float | None) -> str:
                return "-" if v is None else f"{v:.0f}"
            lines.append(
                f"| {lv['concurrency']} | {lv['tokens_per_s']:.1f} | {lv['requests_per_s']:.2f} "
                f"| {ms(lv['ttft_ms_p50'])} / {ms(lv['ttft_ms_p99'])} | {ms(lv['itl_ms_p50'])} / "
                f"{ms(lv['itl_ms_p99'])} | {lv['errors'] or 'none'} |")
        ov = rec.get("overload")
        if ov:
            lines += ["", f"Overload: {ov['sent']} requests at {ov['rate_per_s']:.1f}/s over "
                      f"{ov['sent_seconds']:.0f} s: {ov['by_status']} (hung {ov['hung']}, lost "
                      f"{ov['lost']}); completed ones {ov['tokens_per_s']:.1f} tokens/s."]
        if rec.get("rss_mb_before"):
            lines += [f"Server RSS: {rec.get('rss_mb_one_request') or 0:.0f} MB after one "
                      f"request, {rec['rss_mb_before']:.0f} MB after the warm-up of every slot "
                      f"(before), {rec.get('rss_mb_after') or 0:.0f} MB after the run."]
        if rec.get("inprocess_tok_s") and rec.get("http_c1_tok_s"):
            r, h = rec["inprocess_tok_s"], rec["http_c1_tok_s"]
            lines += [f"One request at a time, alternating: the engine in-process (no HTTP) "
                      f"median {np.median(r):.1f} tokens/s ({min(r):.1f}-{max(r):.1f}), through "
                      f"the server median {np.median(h):.1f} ({min(h):.1f}-{max(h):.1f}), "
                      f"{len(r)} rounds."]
        if "server_exit_code" in rec:
            lines += [f"SIGTERM after the run: exit code {rec['server_exit_code']}."]
        goals = rec.get("goals", {})
        if goals:
            lines += ["", "| goal | measured | target | met |", "| --- | --- | --- | --- |"]
            for name, g in goals.items():
                v = g["value"]
                shown = f"{v:.1%}" if name in ("http_overhead_c1", "rss_growth") else (
                    f"{v:.2f}x" if isinstance(v, float) else json.dumps(v))
                lines.append(f"| {name} | {shown} | {g['goal']} | "
                             f"{'yes' if g['met'] else '**no**'} |")
        lines.append("")
    peer = doc.get("peer_llama_server_q4_0_tok_s", {})
    lines += ["Peer (issue 13, measured by hand): llama.cpp `llama-server`, random gpt2-large "
              "Q4_0, 8 slots, 2 threads, same load: " + ", ".join(
                  f"c={c}: {v} tok/s" for c, v in peer.items()) + ".", ""]
    return "\n".join(lines)


def _export_tiny(dest: Path) -> Path:
    from gpt2_onnx.export.pipeline import ExportOptions, run_export

    return run_export(ExportOptions(source=None, out=dest, random_init="tiny", seed=0,
                                    precisions=("fp32", "fp32-fused"), verify=False,
                                    force=True))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--precisions", default="fp32-fused,int4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--concurrency", default="1,2,4,8,16,32")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--level-seconds", type=float, default=60.0)
    p.add_argument("--level-requests", type=int, default=64)
    p.add_argument("--inprocess-requests", type=int, default=6,
                   help="rounds of in-process vs HTTP at concurrency 1")
    p.add_argument("--overload-factor", type=float, default=10.0)
    p.add_argument("--overload-seconds", type=float, default=20.0)
    p.add_argument("--target", help="URL of a running OpenAI-compatible server (loopback)")
    p.add_argument("--target-name", default="target")
    p.add_argument("--target-pid", type=int, help="its pid, for RSS")
    p.add_argument("--target-model", help="the model name to send to the target")
    p.add_argument("--out", type=Path)
    p.add_argument("--quick", action="store_true",
                   help="tiny model (exported here unless --model-dir), c=1,2,4, short levels")
    a = p.parse_args(argv)
    cfg = Config(model_dir=a.model_dir, threads=a.threads, slots=a.slots,
                 max_queue=a.max_queue, max_tokens=a.max_tokens,
                 precisions=tuple(x for x in a.precisions.split(",") if x),
                 concurrency=tuple(int(x) for x in a.concurrency.split(",") if x),
                 level_seconds=a.level_seconds, level_requests=a.level_requests,
                 inprocess_requests=a.inprocess_requests, overload_factor=a.overload_factor,
                 overload_seconds=a.overload_seconds, target=a.target,
                 target_name=a.target_name, target_pid=a.target_pid,
                 target_model=a.target_model, quick=a.quick,
                 out=a.out or (HERE / "results" / "serve" / ("quick" if a.quick else "")))
    if cfg.target and (urlparse(cfg.target).hostname or "") not in LOOPBACK:
        p.error(f"--target {cfg.target}: load goes to the loopback address only (127.0.0.1)")
    if a.quick:
        cfg.precisions = ("fp32-fused",) if a.precisions == "fp32-fused,int4" else cfg.precisions
        if a.concurrency == "1,2,4,8,16,32":
            cfg.concurrency = (1, 2, 4)
        cfg.level_seconds, cfg.level_requests = 4.0, 12
        cfg.inprocess_requests, cfg.overload_seconds = 3, 2.0
        cfg.max_tokens = a.max_tokens if a.max_tokens != 64 else 32
    if cfg.model_dir is None and not cfg.target:
        if not a.quick:
            p.error("give --model-dir (or --quick, which exports the tiny preset)")
        with tempfile.TemporaryDirectory() as tmp:
            cfg.model_dir = _export_tiny(Path(tmp) / "random-tiny-seed0")
            run(cfg)
        return
    run(cfg)


if __name__ == "__main__":
    main()
