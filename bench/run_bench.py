"""CPU benchmark: gpt2-onnx's variants against PyTorch, optimum and CTranslate2, in one run.

    python bench/run_bench.py [--preset gpt2-large] [--model-dir DIR] [--threads 2]
        [--systems ours,torch,optimum,ct2-float32,ct2-int8] [--contexts 8,256,900] [--quick]

Needs the export and bench extras. Every system runs the same random-init checkpoint (preset,
seed): the transformers checkpoint, its CTranslate2 conversions (float32, int8) and, when no
--model-dir is given, our export (fp32, int8, int4) are built once into --cache. Each
measurement runs in a fresh subprocess (bench/peers.py), so load time and peak RSS are the
system's own; by default the systems alternate within each round (a round = one context, then
the 512-token time to first token, then the batch), the order rotating from round to round, so a
slow spell of a shared machine does not land on one system only.

The memory-bandwidth ceiling is measured in the same run, before and after the rounds: a float32
gemv in numpy on the same threads (bytes of the matrix / best time). Ceiling tokens/s of a system
at a context = bandwidth / (weight bytes one decode step reads + KV bytes read at the mean past
length of the timed steps).

Writes OUT/bench.json (rewritten after each worker, so a run cut short still reports),
OUT/bench.md and OUT/bench.png (bench/chart.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEERS_SCRIPT = HERE / "peers.py"
PEERS = ("torch", "optimum", "ct2-float32", "ct2-int8")
DEFAULT_SYSTEMS = ("ours", *PEERS)
OUR_PRECISIONS = ("fp32", "int8", "int4")
WORKER_TIMEOUT_S = 3600
KV_BYTES = 4  # every system keeps the KV cache in float32
CACHE_SIZED_BYTES = 256 << 20  # weights below this may stay in L2/L3: no bandwidth ceiling
GATHER_OPS = {"Gather", "GatherElements", "GatherND", "GatherBlockQuantized"}


@dataclass
class Config:
    """One benchmark run's settings (see --help for each)."""

    preset: str = "gpt2-large"
    seed: int = 0
    model_dir: Path | None = None  # None: export into cache/model
    cache: Path = Path.home() / ".cache" / "gpt2-onnx" / "bench"
    out: Path = HERE / "results"
    threads: int = 2
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    contexts: tuple[int, ...] | None = None  # None: default_contexts(n_positions)
    new_tokens: int = 32
    batch: int = 8
    batch_context: int | None = None  # None: the first context
    prompt_tokens: int = 512
    repeats: int = 1
    alternate: bool = True
    gemv_mib: int = 1024

    @property
    def cache_dir(self) -> Path:
        return self.cache / f"{self.preset}-seed{self.seed}"

    @property
    def checkpoint(self) -> Path:
        return self.cache_dir / "checkpoint"

    def ct2_dir(self, system: str) -> Path:
        return self.cache_dir / system  # "ct2-float32" / "ct2-int8"

    @property
    def our_dir(self) -> Path:
        return self.model_dir or self.cache_dir / "model"


# --quick writes beside the cache, not over the committed results (bench/results/quick holds a
# reference run; pass --out bench/results/quick to refresh it).
QUICK = dict(preset="tiny", new_tokens=16, prompt_tokens=128, alternate=False, gemv_mib=512,
             out=Config.cache / "quick-results")


# --------------------------------------------------------------------------- preparation


def prepare(cfg: Config) -> None:
    """Build what is missing in the cache: checkpoint, CTranslate2 conversions, our export."""
    from gpt2_onnx.export.presets import build_random_model
    from gpt2_onnx.export.tokenizer import save_tokenizer_files

    if not (cfg.checkpoint / "config.json").is_file():
        model = build_random_model(cfg.preset, cfg.seed)
        tmp = cfg.checkpoint.with_name("checkpoint.tmp")
        model.save_pretrained(tmp)
        save_tokenizer_files(tmp, model.config.n_positions)
        del model
        os.replace(tmp, cfg.checkpoint)
    for system in ("ct2-float32", "ct2-int8"):
        if system in cfg.systems and not (cfg.ct2_dir(system) / "model.bin").is_file():
            from ctranslate2.converters import TransformersConverter

            TransformersConverter(str(cfg.checkpoint)).convert(
                str(cfg.ct2_dir(system)), quantization=system.split("-", 1)[1], force=True)
    if cfg.model_dir is None and not (cfg.our_dir / "gpt2-onnx.json").is_file():
        from gpt2_onnx.export.pipeline import ExportOptions, run_export

        run_export(ExportOptions(source=None, out=cfg.our_dir, random_init=cfg.preset,
                                 seed=cfg.seed, precisions=OUR_PRECISIONS, verify=False,
                                 force=True))
    if "optimum" in cfg.systems and optimum_dir(cfg) != cfg.our_dir:
        export_optimum(cfg)


def optimum_dir(cfg: Config) -> Path:
    """Where ORTModelForCausalLM loads from: our directory when its fp32 variant is optimum's own
    graph (model.onnx, concat cache, config.json beside it), else an optimum export in the cache."""
    from gpt2_onnx.runtime.manifest import read_manifest

    fp32 = read_manifest(cfg.our_dir).variants.get("fp32")
    if fp32 is not None and fp32.graph == "model.onnx" and fp32.io.kv_layout == "concat" \
            and (cfg.our_dir / "config.json").is_file():
        return cfg.our_dir
    return cfg.cache_dir / "optimum"


def export_optimum(cfg: Config) -> None:
    target = cfg.cache_dir / "optimum"
    if (target / "model.onnx").is_file():
        return
    from optimum.exporters.onnx import main_export

    main_export(str(cfg.checkpoint), output=str(target), task="text-generation-with-past")


def check_model_dir(cfg: Config) -> Any:
    """Our manifest; ValueError unless it is the same random-init checkpoint as the peers'."""
    from gpt2_onnx.runtime.manifest import read_manifest

    manifest = read_manifest(cfg.our_dir)
    want = {"kind": "random-init", "preset": cfg.preset, "seed": cfg.seed}
    got = {k: manifest.source.get(k) for k in want}
    if got != want:
        raise ValueError(f"{cfg.our_dir}: source {got} is not {want}; the peers run the "
                         f"random-init checkpoint, so export --random-init {cfg.preset} "
                         f"--seed {cfg.seed} (or drop --model-dir)")
    return manifest


def expand_systems(systems: Sequence[str], variants: Sequence[str]) -> list[str]:
    """"ours" -> one "ours:<precision>" per variant of the model directory."""
    out: list[str] = []
    for s in systems:
        if s == "ours":
            out += [f"ours:{p}" for p in variants]
        elif s.startswith("ours:"):
            if s.split(":", 1)[1] not in variants:
                raise ValueError(f"--systems {s}: the model directory has {', '.join(variants)}")
            out.append(s)
        elif s in PEERS:
            out.append(s)
        else:
            raise ValueError(f"--systems: unknown {s!r}; choose ours, ours:<precision>, "
                             f"{', '.join(PEERS)}")
    return out


# --------------------------------------------------------------------------- bytes and ceilings


def graph_bytes_read(graph: Path) -> int:
    """Bytes of initializers one decode step reads: all but tables only gathered from (the token
    and position embeddings, unless the lm_head reads them too)."""
    import numpy as np
    import onnx
    from onnx import helper

    proto = onnx.load(str(graph), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in proto.graph.initializer:
        ops = consumers.get(init.name, set())
        if ops and ops <= GATHER_OPS:
            continue
        external = {e.key: e.value for e in init.external_data}
        if "length" in external:
            total += int(external["length"])
        elif init.raw_data:
            total += len(init.raw_data)
        else:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
            total += int(np.prod(init.dims)) * itemsize
    return total


def fp32_bytes_read(dims: Any) -> int:
    """A float32 GPT-2 decode step: every block's matrices, ln_f and the tied lm_head (vocab x
    n_embd); the embeddings are only gathered from."""
    e = dims.n_embd
    per_layer = 12 * e * e + 13 * e
    return 4 * (dims.n_layer * per_layer + dims.vocab_size * e + 2 * e)


def kv_bytes_read(dims: Any, past: float) -> float:
    """Keys and values of every layer for `past` positions, one row."""
    return 2 * dims.n_layer * dims.n_head * dims.head_dim * past * KV_BYTES


def weight_bytes_read(cfg: Config, manifest: Any, system: str) -> int:
    if system.startswith("ours:"):
        variant = manifest.variants[system.split(":", 1)[1]]
        return graph_bytes_read(cfg.our_dir / variant.graph)
    if system == "ct2-int8":
        return (cfg.ct2_dir(system) / "model.bin").stat().st_size  # approximate: the whole file
    return fp32_bytes_read(manifest.dims)  # torch, optimum, ct2-float32: float32 weights


# --------------------------------------------------------------------------- workers


def run_worker(task: dict[str, Any], tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run bench/peers.py on `task` in a fresh process; its JSON answer, or {"error": ...}."""
    path = tmp / f"task-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(task))
    try:
        proc = subprocess.run([sys.executable, str(PEERS_SCRIPT), str(path)], env=env,
                              capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"system": task["system"], "error": f"timed out after {WORKER_TIMEOUT_S} s"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"system": task["system"], "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def measure_bandwidth(mib: int, tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    return run_worker({"system": "gemv", "mib": mib}, tmp, env)


def phases(cfg: Config, dims: Any) -> list[dict[str, Any]]:
    """The measurements, in round order: decode at each context, ttft, batch."""
    from gpt2_onnx.runtime.bench import clamp_context, default_contexts, synthetic_prompt

    vocab, n_pos = dims.vocab_size, dims.n_positions
    contexts = cfg.contexts or default_contexts(n_pos)
    out = []
    for c in dict.fromkeys(clamp_context(c, cfg.new_tokens, n_pos) for c in contexts):
        out.append({"kind": "decode", "prompts": [synthetic_prompt(c, vocab)],
                    "new_tokens": cfg.new_tokens, "repeats": cfg.repeats})
    p = clamp_context(cfg.prompt_tokens, 2, n_pos)
    out.append({"kind": "ttft", "prompts": [synthetic_prompt(p, vocab)], "new_tokens": 2,
                "repeats": cfg.repeats})
    b = clamp_context(cfg.batch_context or contexts[0], cfg.new_tokens, n_pos)
    out.append({"kind": "batch", "new_tokens": cfg.new_tokens, "repeats": cfg.repeats,
                "prompts": [synthetic_prompt(b, vocab, seed=r) for r in range(cfg.batch)]})
    return out


def schedule(cfg: Config, systems: list[str], measurements: list[dict[str, Any]]
             ) -> list[tuple[str, list[dict[str, Any]]]]:
    """(system, phases) per worker: alternating rounds with a rotating order, or one worker per
    system with every phase (--no-alternate)."""
    if not cfg.alternate:
        return [(s, measurements) for s in systems]
    jobs = []
    for r, phase in enumerate(measurements):
        order = systems[r % len(systems):] + systems[:r % len(systems)]
        jobs += [(s, [phase]) for s in order]
    return jobs


# --------------------------------------------------------------------------- the run


def machine() -> dict[str, Any]:
    from gpt2_onnx.runtime.session import physical_cores

    model, flags = "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": model, "isa": isa, "logical_cpus": os.cpu_count(),
            "physical_cores": physical_cores(), "memory_bytes": mem,
            "python": platform.python_version(), "platform": platform.platform()}


BENCH_VERSIONS = ("gpt2-onnx", "onnxruntime", "numpy", "torch", "transformers", "optimum",
                  "optimum-onnx", "ctranslate2")  # recorded with the results


def run(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """Prepare, measure every system, derive ceilings and goals; the document bench.json holds."""
    from gpt2_onnx.runtime.manifest import package_versions

    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"preparing {cfg.cache_dir} (checkpoint, conversions, exports; cached)")
    child = multiprocessing.get_context("spawn").Process(target=prepare, args=(cfg,))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"preparation failed (exit {child.exitcode}); see the traceback above")
    manifest = check_model_dir(cfg)
    systems = expand_systems(cfg.systems, list(manifest.variants))
    measurements = phases(cfg, manifest.dims)
    paths = {"model_dir": str(cfg.our_dir), "checkpoint": str(cfg.checkpoint),
             "optimum_dir": str(optimum_dir(cfg)) if "optimum" in systems else "",
             "ct2_dirs": {s: str(cfg.ct2_dir(s)) for s in PEERS if s.startswith("ct2-")}}
    doc: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": package_versions(BENCH_VERSIONS, missing="not installed"),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "model": {"name": manifest.name, "source": manifest.source, "dims": asdict(manifest.dims),
                  "verify": manifest.verify},
        "systems": systems, "bandwidth": {}, "workers": [],
    }
    env = worker_env(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="gpt2-onnx-bench-") as tmp_name:
        tmp = Path(tmp_name)
        log(f"bandwidth: float32 gemv of {cfg.gemv_mib} MiB on {cfg.threads} threads")
        doc["bandwidth"]["before"] = measure_bandwidth(cfg.gemv_mib, tmp, env)
        jobs = schedule(cfg, systems, measurements)
        for n, (system, job_phases) in enumerate(jobs, 1):
            kinds = ", ".join(f"{p['kind']}@{len(p['prompts'][0])}" for p in job_phases)
            log(f"[{n}/{len(jobs)}] {system}: {kinds}")
            task = {"system": system, "threads": cfg.threads, "phases": job_phases, **paths}
            answer = run_worker(task, tmp, env)
            if "error" in answer:
                log(f"  FAILED: {answer['error']}")
                answer["phases"] = [{"kind": p["kind"], "context": len(p["prompts"][0]),
                                     "batch": len(p["prompts"])} for p in job_phases]
            doc["workers"].append(answer)
            write_json(doc, cfg.out)
        doc["bandwidth"]["after"] = measure_bandwidth(cfg.gemv_mib, tmp, env)
    doc["summary"] = summarize(cfg, manifest, systems, doc)
    doc["goals"] = goals(doc["summary"], cfg)
    return doc


def write_json(doc: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- derived figures


@dataclass
class SystemSummary:
    system: str
    weight_bytes_read: int  # per decode step
    file_bytes: int | None  # ours: the variant's files (graph + data)
    decode: dict[int, float] = field(default_factory=dict)  # context -> tok/s, batch 1
    ceiling: dict[int, float] = field(default_factory=dict)  # context -> ceiling tok/s
    ttft_ms: float | None = None
    ttft_prompt: int | None = None
    batch_tokens_per_s: float | None = None
    batch_context: int | None = None
    load_s: float | None = None  # median over this system's workers
    peak_rss: int | None = None  # max over this system's workers
    errors: list[str] = field(default_factory=list)


def summarize(cfg: Config, manifest: Any, systems: list[str], doc: dict[str, Any]
              ) -> dict[str, dict[str, Any]]:
    """Per system: the figures of its workers, and the ceiling at each context."""
    gemv = [doc["bandwidth"].get(k, {}).get("bytes_per_s", 0.0) for k in ("before", "after")]
    bandwidth = max(gemv)
    doc["bandwidth"]["bytes_per_s"] = bandwidth
    out = {}
    for system in systems:
        variant = manifest.variants.get(system.split(":", 1)[1]) if system.startswith("ours:") \
            else None
        files = sum(manifest.files[f].size for f in (variant.graph, *variant.data)) \
            if variant else None
        s = SystemSummary(system, weight_bytes_read(cfg, manifest, system), files)
        loads, rss = [], []
        for w in (w for w in doc["workers"] if w.get("system") == system):
            if "error" in w:
                s.errors.append(w["error"])
                continue
            loads.append(w["load_s"])
            rss.append(w["peak_rss"])
            for p in w["phases"]:
                if p["kind"] == "decode":
                    s.decode[p["context"]] = p["tokens_per_s"]
                    past = p["context"] + p["new_tokens"] / 2  # mean past of the timed steps
                    if bandwidth:
                        s.ceiling[p["context"]] = bandwidth / (
                            s.weight_bytes_read + kv_bytes_read(manifest.dims, past))
                elif p["kind"] == "ttft":
                    s.ttft_ms, s.ttft_prompt = p["ttft_ms"], p["context"]
                elif p["kind"] == "batch":
                    s.batch_tokens_per_s, s.batch_context = p["tokens_per_s"], p["context"]
        s.load_s = statistics.median(loads) if loads else None
        s.peak_rss = max(rss) if rss else None
        out[system] = asdict(s)
    return out


def goals(summary: dict[str, dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """Issue 5's goals, each with the measured figure, the target and whether it is met."""
    rows: list[dict[str, Any]] = []

    def add(goal: str, measured: float | None, target: float, unit: str,
            higher_is_better: bool = True) -> None:
        met = None if measured is None else (measured >= target if higher_is_better
                                             else measured <= target)
        rows.append({"goal": goal, "measured": measured, "target": target, "unit": unit,
                     "compare": ">=" if higher_is_better else "<=", "met": met})

    def get(system: str) -> dict[str, Any] | None:
        return summary.get(system)

    fp32, int8, int4 = get("ours:fp32"), get("ours:int8"), get("ours:int4")
    ct2_int8, torch_ = get("ct2-int8"), get("torch")
    contexts = sorted((fp32 or {}).get("decode", {}))
    if fp32 and contexts:
        for c, share in ((contexts[0], 0.95), (contexts[-1], 0.85)):
            d, ceil = fp32["decode"].get(c), fp32["ceiling"].get(c)
            add(f"fp32 decode at context {c} / bandwidth ceiling",
                d / ceil if d and ceil else None, share, "x")
    for name, v, factor in (("int8", int8, 1.3), ("int4", int4, 2.0)):
        if v and ct2_int8:
            for c in sorted(v["decode"]):
                theirs = ct2_int8["decode"].get(c)
                add(f"{name} decode at context {c} / CTranslate2 int8",
                    v["decode"][c] / theirs if theirs else None, factor, "x")
    for system, v in summary.items():
        if not system.startswith("ours:"):
            continue
        if torch_ and torch_.get("ttft_ms") and v.get("ttft_ms"):
            add(f"{system} time to first token ({v['ttft_prompt']} tokens) / PyTorch",
                v["ttft_ms"] / torch_["ttft_ms"], 1.0, "x", higher_is_better=False)
        one = v["decode"].get(v["batch_context"])
        if v.get("batch_tokens_per_s") and one:
            add(f"{system} batch-{cfg.batch} throughput / batch 1 (context {v['batch_context']})",
                v["batch_tokens_per_s"] / one, 4.0, "x")
        if v.get("peak_rss") and v.get("file_bytes"):
            add(f"{system} peak RSS / weight bytes", v["peak_rss"] / v["file_bytes"], 1.2, "x",
                higher_is_better=False)
    if fp32 and fp32.get("load_s") is not None:
        add("fp32 load (session ready)", fp32["load_s"], 2.0, "s", higher_is_better=False)
    return rows


# --------------------------------------------------------------------------- markdown


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def markdown(doc: dict[str, Any]) -> str:
    """bench.md: machine, the systems table, ceilings, goals, method."""
    m, cfg, summary = doc["machine"], doc["config"], doc["summary"]
    mib, gb = 1 << 20, 1e9
    contexts = sorted({int(c) for s in summary.values() for c in s["decode"]})
    src = doc["model"]["source"]
    dims = doc["model"]["dims"]
    lines = [
        f"# CPU benchmark: random-init {src.get('preset')} (seed {src.get('seed')})",
        "",
        f"- Machine: {m['cpu']} ({', '.join(m['isa']) or 'no AVX2'}), {m['physical_cores']} "
        f"physical cores / {m['logical_cpus']} logical, {m['memory_bytes'] / gb:.0f} GB; "
        f"**{cfg['threads']} threads** for every system; {doc['date']}.",
        f"- Model: {dims['n_layer']} layers, {dims['n_head']} heads, width {dims['n_embd']}, "
        f"{dims['n_positions']} positions. Batch 1, greedy, {cfg['new_tokens']} new tokens per "
        "decode figure (prefill excluded).",
        f"- Memory bandwidth (float32 gemv, {cfg['gemv_mib']} MiB, same threads): "
        f"{doc['bandwidth']['bytes_per_s'] / gb:.1f} GB/s (before "
        f"{doc['bandwidth']['before'].get('bytes_per_s', 0) / gb:.1f}, after "
        f"{doc['bandwidth']['after'].get('bytes_per_s', 0) / gb:.1f}).",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + ".",
        "",
        "| system | MiB read / step | " + " | ".join(f"tok/s @{c}" for c in contexts)
        + " | % of ceiling (" + " / ".join(f"@{c}" for c in contexts) + ")"
        + f" | TTFT {cfg['prompt_tokens']} tok (ms) | batch-{cfg['batch']} tok/s | load (s) "
          "| peak RSS (MiB) |",
        "|---" * (6 + len(contexts)) + "|---|",
    ]
    for system, s in summary.items():
        rates = [_f(s["decode"].get(str(c), s["decode"].get(c))) for c in contexts]
        shares = []
        for c in contexts:
            d = s["decode"].get(str(c), s["decode"].get(c))
            ceil = s["ceiling"].get(str(c), s["ceiling"].get(c))
            shares.append(_f(100 * d / ceil if d and ceil else None, "{:.0f}"))
        name = system + (" ⚠ " + "; ".join(s["errors"])[:80] if s["errors"] else "")
        lines.append(
            f"| {name} | {s['weight_bytes_read'] / mib:.0f} | " + " | ".join(rates)
            + f" | {' / '.join(shares)} | {_f(s['ttft_ms'], '{:.0f}')} | "
            f"{_f(s['batch_tokens_per_s'])} | {_f(s['load_s'])} | "
            f"{_f(s['peak_rss'] and s['peak_rss'] / mib, '{:.0f}')} |")
    smallest = min((s["weight_bytes_read"] for s in summary.values()), default=0)
    if smallest < CACHE_SIZED_BYTES:
        lines += ["", f"Note: {smallest / mib:.0f} MiB of weights can sit in the CPU caches, so "
                  "the ceilings (DRAM bandwidth) do not bind and the figures measure per-step "
                  "overhead; run gpt2-large for the real comparison."]
    lines += ["", "Ceiling tok/s at each context (bandwidth / (weights + KV read per step)):", "",
              "| system | " + " | ".join(f"@{c}" for c in contexts) + " |",
              "|---" * (1 + len(contexts)) + "|"]
    for system, s in summary.items():
        cells = [_f(s["ceiling"].get(str(c), s["ceiling"].get(c)), "{:.1f}") for c in contexts]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    lines += ["", "## Goals (issue 5)", "", "| goal | measured | target | met |",
              "|---|---|---|---|"]
    for g in doc["goals"]:
        met = {True: "yes", False: "**no**", None: "—"}[g["met"]]
        op = "≥" if g["compare"] == ">=" else "≤"
        measured = _f(g["measured"], "{:.3g}")
        lines.append(f"| {g['goal']} | {measured} {g['unit']} | {op} {g['target']} {g['unit']} "
                     f"| {met} |")
    verify = doc["model"].get("verify")
    if verify:
        lines += ["", "Verify (from the manifest): " + ("passed" if verify.get("passed")
                                                        else "FAILED") + "; " + "; ".join(
            f"{c.get('variant')} {c.get('check')} {c.get('figure')}"
            for c in verify.get("checks", []))]
    else:
        lines += ["", "Verify: not recorded in the model directory's manifest (export with "
                      "verify to report top-1 agreement and KL per variant)."]
    lines += [
        "", "Method: each figure from a fresh subprocess per system (bench/peers.py); "
        + ("systems alternate within each round, order rotating. " if cfg["alternate"]
           else "one subprocess per system (--no-alternate). ")
        + "Decode tok/s = tokens after the first / (last token time − first token time). TTFT = "
        "call start → first token. Batch = tokens of all rows after the first / decode time. "
        "Load = model load after imports (median over the system's subprocesses). Peak RSS = "
        "VmHWM of the subprocess (interpreter and libraries included), max over its "
        "subprocesses. CTranslate2 int8 bytes read = its model.bin size (approximate).", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny preset, short contexts, one subprocess per system (~1-3 min)")
    p.add_argument("--preset", help="random-init preset [gpt2-large; tiny with --quick]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-dir", type=Path, help="our export of the same preset and seed "
                   "[export fp32,int8,int4 into the cache]")
    p.add_argument("--cache", type=Path, default=Config.cache,
                   help="checkpoint, conversions and exports [%(default)s]")
    p.add_argument("--out", type=Path,
                   help="results [bench/results; ~/.cache/gpt2-onnx/bench/quick-results]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help="comma-separated: ours (every variant), ours:<precision>, "
                        f"{', '.join(PEERS)} [%(default)s]")
    p.add_argument("--contexts", help="decode contexts [8, n_positions/4, ~0.88 n_positions: "
                   "8,256,900 for gpt2-large; 8,64,225 with --quick]")
    p.add_argument("--new-tokens", type=int, help="new tokens per decode figure [32; 16]")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batch-context", type=int, help="prompt length of the batch rows "
                   "[the first context]")
    p.add_argument("--prompt-tokens", type=int, help="time-to-first-token prompt [512; 128]")
    p.add_argument("--repeats", type=int, default=1, help="runs per figure (median) [1]")
    p.add_argument("--alternate", action=argparse.BooleanOptionalAction, default=None,
                   help="one subprocess per system and round [on; off with --quick]")
    p.add_argument("--gemv-mib", type=int, help="gemv matrix size [1024; 512 with --quick]")
    a = p.parse_args(argv)
    base = {**asdict(Config()), **(QUICK if a.quick else {})}
    chosen = dict(
        preset=a.preset, seed=a.seed, model_dir=a.model_dir, cache=a.cache, out=a.out,
        threads=a.threads, batch=a.batch, batch_context=a.batch_context, repeats=a.repeats,
        systems=tuple(s.strip() for s in a.systems.split(",") if s.strip()),
        contexts=tuple(int(c) for c in a.contexts.split(",")) if a.contexts else None,
        new_tokens=a.new_tokens, prompt_tokens=a.prompt_tokens, alternate=a.alternate,
        gemv_mib=a.gemv_mib)
    cfg = Config(**{**base, **{k: v for k, v in chosen.items() if v is not None}})
    if cfg.threads < 1 or cfg.batch < 1 or cfg.new_tokens < 2 or cfg.repeats < 1:
        p.error("--threads, --batch and --repeats must be >= 1, --new-tokens >= 2")
    unknown = [s for s in cfg.systems if s != "ours" and not s.startswith("ours:")
               and s not in PEERS]
    if unknown or not cfg.systems:
        p.error(f"--systems: unknown {unknown}; choose ours, ours:<precision>, {', '.join(PEERS)}")
    return cfg


def main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    start = time.perf_counter()

    def log(msg: str) -> None:
        sys.stderr.write(f"[{time.perf_counter() - start:7.1f} s] {msg}\n")
        sys.stderr.flush()

    doc = run(cfg, log)
    write_json(doc, cfg.out)
    (cfg.out / "bench.md").write_text(markdown(doc))
    from chart import plot

    plot(doc, cfg.out / "bench.png")
    log(f"wrote {cfg.out}/bench.json, bench.md, bench.png")
    sys.stdout.write(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
