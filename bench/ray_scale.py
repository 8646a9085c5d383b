"""Scale-out benchmark (issue 14): Ray Serve replicas against `gpt2-onnx serve` on one machine.

    python bench/ray_scale.py --model-dir models/random-gpt2-large-seed0 --precision int4
    python bench/ray_scale.py --quick          # tiny random export, short levels (~4 min)

Setups, each a fresh subprocess on the loopback address, the same total cores (--cores, 2):
- `direct`: `gpt2-onnx serve --threads CORES` (one process, no proxy);
- `ray 1x{CORES}`: `serve --ray --replicas 1 --threads CORES` (Serve's proxy in front of one
  replica: the proxy's overhead against `direct`);
- `ray {CORES}x1`: `serve --ray --replicas CORES --threads 1` (replicas instead of threads).
At each concurrency (--concurrency, 1,4,8) a closed loop of streamed greedy completions
(bench/serve_load.py's clients): tokens/s, time to first token p50/p99, errors. Bounded in
requests (--level-requests) and seconds (--level-seconds) per level. Writes OUT/ray_scale.json
and OUT/ray_scale.md (OUT: results/ray/, or results/ray/quick/ with --quick); the servers' logs
go to a temporary directory (printed).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import serve_load  # noqa: E402  (bench/serve_load.py: the clients and the tiny export)

LAUNCH = "import sys; from gpt2_onnx.cli import main; sys.argv[0] = 'gpt2-onnx'; main()"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`gpt2-onnx serve ARGS` on a free loopback port; ready when /health answers 200."""

    def __init__(self, args: list[str], log: Path, timeout: float = 600) -> None:
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "serve", *args,
                                      "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=self._log,
                                     env={**os.environ, "COLUMNS": "300", "NO_COLOR": "1"})
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"not ready in {timeout} s: {log.read_text()[-2000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(120)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self._log.close()


def setups(cores: int) -> list[tuple[str, list[str]]]:
    """(name, CLI arguments after the model directory) of each setup."""
    out = [("direct", ["--threads", str(cores)]),
           (f"ray 1x{cores}", ["--ray", "--replicas", "1", "--threads", str(cores)])]
    if cores > 1:
        out.append((f"ray {cores}x1", ["--ray", "--replicas", str(cores), "--threads", "1"]))
    return out


def run(model_dir: Path, precision: str | None, cfg: serve_load.Config, cores: int,
        out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model_dir": str(model_dir), "precision": precision, "cores": cores,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "setups": {},
    }
    logs = Path(tempfile.mkdtemp(prefix="ray_scale-"))  # servers' stderr (Ray's is chatty)
    print(f"server logs: {logs}", flush=True)
    for name, args in setups(cores):
        extra = ["--precision", precision] if precision else []
        log = logs / f"server-{re.sub(r'[^a-z0-9]+', '-', name)}.log"
        t0 = time.perf_counter()
        server = Server([str(model_dir), *args, *extra, "--slots", str(cfg.slots),
                         "--max-queue", str(cfg.max_queue)], log)
        rec: dict[str, Any] = {"args": args, "start_s": round(time.perf_counter() - t0, 1),
                               "levels": []}
        try:
            for c in cfg.concurrency:
                level = asyncio.run(serve_load.closed_loop(server.url, None, cfg, c))
                rec["levels"].append(asdict(level))
                print(f"{name:>10} c={c:<2} {level.tokens_per_s:7.1f} tok/s  ttft p50 "
                      f"{level.ttft_ms_p50 or 0:7.1f} p99 {level.ttft_ms_p99 or 0:7.1f} ms  "
                      f"errors {level.errors}", flush=True)
        finally:
            rec["exit_code"] = server.stop()
        doc["setups"][name] = rec
        (out / "ray_scale.json").write_text(json.dumps(doc, indent=2))
    (out / "ray_scale.md").write_text(markdown(doc))
    return doc


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"Ray scale-out bench, {doc['when']}, {doc['machine']['cpus']} CPUs, "
             f"{doc['model_dir']} ({doc['precision'] or 'default precision'}), "
             f"{doc['config']['max_tokens']} new tokens per streamed greedy request.", "",
             "| setup | concurrency | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | errors |",
             "|---|---:|---:|---:|---:|---:|---|"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    for name, rec in doc["setups"].items():
        for lv in rec["levels"]:
            lines.append(f"| {name} | {lv['concurrency']} | {lv['tokens_per_s']:.1f} | "
                         f"{ms(lv['ttft_ms_p50'])} | {ms(lv['ttft_ms_p99'])} | "
                         f"{ms(lv['itl_ms_p50'])} | {lv['errors'] or ''} |")
    direct = {lv["concurrency"]: lv for lv in doc["setups"].get("direct", {}).get("levels", [])}
    proxied = next((r for n, r in doc["setups"].items() if n.startswith("ray 1x")), None)
    if direct and proxied:
        lines += ["", "Proxy overhead (ray 1xN against direct, TTFT p50 and tokens/s):", ""]
        for lv in proxied["levels"]:
            d = direct.get(lv["concurrency"])
            if d and d["ttft_ms_p50"] is not None and lv["ttft_ms_p50"] is not None:
                lines.append(f"- concurrency {lv['concurrency']}: TTFT p50 "
                             f"{lv['ttft_ms_p50'] - d['ttft_ms_p50']:+.1f} ms, tokens/s "
                             f"{lv['tokens_per_s'] / max(d['tokens_per_s'], 1e-9):.2f}x")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--precision")
    p.add_argument("--cores", type=int, default=2, help="cores per setup (threads x replicas)")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--level-seconds", type=float, default=60.0)
    p.add_argument("--level-requests", type=int, default=48)
    p.add_argument("--out", type=Path)
    p.add_argument("--quick", action="store_true",
                   help="tiny random export, 16 tokens, short levels (checks the script)")
    a = p.parse_args(argv)
    if a.cores < 1:
        p.error("--cores must be >= 1")
    cfg = serve_load.Config(slots=a.slots, max_queue=a.max_queue, max_tokens=a.max_tokens,
                            concurrency=tuple(int(c) for c in a.concurrency.split(",")),
                            level_seconds=a.level_seconds, level_requests=a.level_requests,
                            request_timeout=120.0)
    out = a.out or HERE / "results" / "ray" / ("quick" if a.quick else "")
    if a.quick:
        cfg = replace(cfg, max_tokens=16, level_seconds=15.0, level_requests=16)
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = serve_load._export_tiny(Path(tmp) / "tiny")
            run(model_dir, a.precision, cfg, a.cores, out)
    else:
        if a.model_dir is None:
            p.error("--model-dir is required (or --quick)")
        run(a.model_dir, a.precision, cfg, a.cores, out)
    print((out / "ray_scale.md").read_text())


if __name__ == "__main__":
    main()
