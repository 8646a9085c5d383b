"""CPU benchmark: gpt2-onnx's variants against PyTorch, optimum, CTranslate2 and llama.cpp.

    python bench/run_bench.py [--preset gpt2-large] [--model-dir DIR] [--threads 2] [--repeats 3]
        [--systems ours,torch,optimum,ct2-float32,ct2-int8,llama] [--contexts 8,256,900] [--quick]

Needs the export and bench extras. Every system runs the same random-init checkpoint (preset,
seed): the transformers checkpoint, its CTranslate2 conversions (float32, int8), its llama.cpp GGUF
files (F32, Q8_0, Q4_0, Q4_K_M; llama.cpp itself built once by bench/llama_setup.py) and, when no
--model-dir is given, our export (fp32, fp32-fused, int8, int4) are built once into --cache. Each
measurement runs in a fresh subprocess (bench/peers.py), so load time and peak RSS are the system's
own; by default the systems alternate within each round (a round = one context, then the 512-token
time to first token, then the batch), the order rotating from round to round, so a slow spell of a
shared machine does not land on one system only. --repeats N runs the whole schedule N times (the
order rotated again each time): every figure is the median of its N subprocesses, shown with its
spread (min-max).

The memory-bandwidth ceiling is measured in the same run, before and after the rounds, by several
probes on the same threads (numpy's float32 gemv, onnxruntime's own float32 MatMul gemv, a plain
streaming read), and is never below the best bytes/s any system achieved in the run (a ceiling
that a system beats is not one): bandwidth = max(probes, achieved). Ceiling tokens/s of a system
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
import shutil
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
LLAMA_SYSTEMS = ("llama-f32", "llama-q8_0", "llama-q4_0", "llama-q4_k_m")  # llama_setup.SYSTEMS
DEFAULT_SYSTEMS = ("ours", *PEERS, "llama")
OUR_PRECISIONS = ("fp32", "fp32-fused", "int8", "int4")  # issue 16 goals need fp32-fused
PROBES = ("gemv", "ort-gemv", "stream")  # bandwidth probes (bench/peers.py)
WORKER_TIMEOUT_S = 3600
KV_BYTES = 4  # the KV cache in float32 (ours, PyTorch, optimum, CTranslate2)
LLAMA_KV_BYTES = 2  # llama.cpp's default KV cache type is F16
# issue 16: each of our variants against every peer of the same or coarser precision
RIVALS: dict[str, tuple[str, ...]] = {
    "ours:fp32": ("llama-f32", "ct2-float32"),
    "ours:fp32-fused": ("llama-f32", "ct2-float32"),
    "ours:int8": ("llama-q8_0", "ct2-int8"),
    "ours:int4": ("llama-q4_0", "llama-q4_k_m"),
}
CEILING_SHARE = 0.85  # issue 16: decode at the first context >= 85 % of the sound ceiling
CEILING_VARIANTS = ("ours:fp32-fused", "ours:int8", "ours:int4")
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
    repeats: int = 3  # rounds: every figure is the median of this many subprocesses
    alternate: bool = True
    gemv_mib: int = 1024  # each bandwidth probe reads this many MiB
    build_llama: bool = True  # False: llama systems run only if llama.cpp is already built
    prepare_only: bool = False  # stop after the (cached) checkpoint, conversions and exports
    verify_report: Path | None = None  # a `gpt2-onnx verify --report` of the model directory
    render_only: bool = False  # rewrite bench.md/png (and goals) from OUT/bench.json, no run

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

    def genai_dir(self, system: str) -> Path:
        return self.cache_dir / system.replace(":", "-")  # "genai-int4"


# --quick writes beside the cache, not over the committed results (bench/results/quick holds a
# reference run; pass --out bench/results/quick to refresh it).
QUICK = dict(preset="tiny", new_tokens=16, prompt_tokens=128, alternate=False, gemv_mib=512,
             repeats=1, build_llama=False, out=Config.cache / "quick-results")


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
    from gpt2_onnx.runtime.manifest import read_manifest

    variants = list(read_manifest(cfg.our_dir).variants)
    for system in expand_systems(cfg.systems, variants):
        if system.startswith("genai:"):
            prepare_genai_dir(cfg, system)


def prepare_genai_dir(cfg: Config, system: str) -> None:
    """cache/genai-<precision>: hard links to our directory's graph, data and tokenizer files
    (no copy of the weights), its genai_config.json (threads pinned like the other systems') and,
    for a fused variant, the genai-facing graph. Rebuilt each run: cheap, and never stale."""
    from gpt2_onnx.export.genai import write_genai_files
    from gpt2_onnx.runtime.manifest import read_manifest

    manifest = read_manifest(cfg.our_dir)
    variant = manifest.variants[system.split(":", 1)[1]]
    dest = cfg.genai_dir(system)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    names = [variant.graph, *variant.data, manifest.tokenizer, "tokenizer_config.json",
             "generation_config.json", "config.json"]
    for name in names:
        if (cfg.our_dir / name).is_file():
            try:
                os.link(cfg.our_dir / name, dest / name)
            except OSError:  # another filesystem
                shutil.copy2(cfg.our_dir / name, dest / name)
    write_genai_files(dest, manifest.dims, variant)
    config_path = dest / "genai_config.json"
    doc = json.loads(config_path.read_text())
    doc["model"]["decoder"]["session_options"].update(
        intra_op_num_threads=cfg.threads, inter_op_num_threads=1)
    config_path.write_text(json.dumps(doc, indent=2) + "\n")


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
    """"ours" -> one "ours:<precision>" per variant of the model directory; "genai" -> one
    "genai:<precision>" per variant onnxruntime-genai runs."""
    from gpt2_onnx.runtime.variants import genai_preferred

    genai_runs = genai_preferred()
    out: list[str] = []
    for s in systems:
        if s == "ours":
            out += [f"ours:{p}" for p in variants]
        elif s == "genai":
            out += [f"genai:{p}" for p in variants if p in genai_runs]
        elif s.startswith(("ours:", "genai:")):
            if s.split(":", 1)[1] not in variants:
                raise ValueError(f"--systems {s}: the model directory has {', '.join(variants)}")
            if s.startswith("genai:") and s.split(":", 1)[1] not in genai_runs:
                raise ValueError(f"--systems {s}: onnxruntime-genai runs "
                                 f"{', '.join(genai_runs)}")
            out.append(s)
        elif s == "llama":
            out += list(LLAMA_SYSTEMS)
        elif s in PEERS or s in LLAMA_SYSTEMS:
            out.append(s)
        else:
            raise ValueError(f"--systems: unknown {s!r}; choose ours, ours:<precision>, genai, "
                             "genai:<precision>, llama (all of "
                             f"{', '.join(LLAMA_SYSTEMS)}), {', '.join(PEERS)}")
    return list(dict.fromkeys(out))


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


def kv_bytes_read(dims: Any, past: float, itemsize: int = KV_BYTES) -> float:
    """Keys and values of every layer for `past` positions, one row."""
    return 2 * dims.n_layer * dims.n_head * dims.head_dim * past * itemsize


def kv_itemsize(system: str) -> int:
    """Bytes per cached key/value element of `system`."""
    return LLAMA_KV_BYTES if system in LLAMA_SYSTEMS else KV_BYTES


def weight_bytes_read(cfg: Config, manifest: Any, system: str) -> int:
    if system.startswith(("ours:", "genai:")):  # the same graph
        variant = manifest.variants[system.split(":", 1)[1]]
        return graph_bytes_read(cfg.our_dir / variant.graph)
    if system == "ct2-int8":
        return (cfg.ct2_dir(system) / "model.bin").stat().st_size  # approximate: the whole file
    if system in LLAMA_SYSTEMS:
        import llama_setup

        return llama_setup.gguf_bytes_read(llama_setup.default(), llama_gguf(cfg, system))
    return fp32_bytes_read(manifest.dims)  # torch, optimum, ct2-float32: float32 weights


# --------------------------------------------------------------------------- llama.cpp


def llama_dir(cfg: Config) -> Path:
    return cfg.cache_dir / "llama.cpp"  # the GGUF files of this checkpoint


def llama_gguf(cfg: Config, system: str) -> Path:
    import llama_setup

    return llama_setup.gguf_path(llama_dir(cfg), system)


def prepare_llama(cfg: Config, systems: list[str], log: Callable[[str], None]
                  ) -> dict[str, Any]:
    """Build llama.cpp (cached; minutes the first time) and convert the checkpoint for the
    llama systems in `systems`; what the workers need (bindings, library, GGUF per system) and
    the build record. Raises RuntimeError when the download, build or conversion fails."""
    import llama_setup

    wanted = [s for s in systems if s in LLAMA_SYSTEMS]
    if not cfg.build_llama and not llama_setup.default().is_built():
        raise RuntimeError("llama.cpp is not built and --quick does not build it (minutes); "
                           "run `python bench/llama_setup.py build` once")
    lc = llama_setup.ensure_built(log=log)
    ggufs = llama_setup.convert(lc, cfg.checkpoint, llama_dir(cfg), wanted, log=log)
    return {**lc.worker_paths(), "ggufs": {s: str(p) for s, p in ggufs.items()},
            "build": lc.info()}


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


def measure_bandwidth(cfg: Config, when: str, tmp: Path, env: dict[str, str],
                      log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every probe of PROBES, each in its own subprocess on cfg.threads threads."""
    out = []
    for kind in PROBES:
        answer = run_worker({"system": kind, "mib": cfg.gemv_mib, "threads": cfg.threads,
                             "tmp_dir": str(tmp)}, tmp, env)
        answer["when"] = when
        log(f"bandwidth probe {kind} ({when}): "
            + (f"FAILED {answer['error']}" if "error" in answer
               else f"{answer['bytes_per_s'] / 1e9:.1f} GB/s"))
        out.append(answer)
    return out


def phases(cfg: Config, dims: Any) -> list[dict[str, Any]]:
    """The measurements, in round order: decode at each context, ttft, batch."""
    from gpt2_onnx.runtime.bench import clamp_context, default_contexts, synthetic_prompt

    vocab, n_pos = dims.vocab_size, dims.n_positions
    contexts = cfg.contexts or default_contexts(n_pos)
    out = []
    for c in dict.fromkeys(clamp_context(c, cfg.new_tokens, n_pos) for c in contexts):
        out.append({"kind": "decode", "prompts": [synthetic_prompt(c, vocab)],
                    "new_tokens": cfg.new_tokens, "repeats": 1})
    p = clamp_context(cfg.prompt_tokens, 2, n_pos)
    out.append({"kind": "ttft", "prompts": [synthetic_prompt(p, vocab)], "new_tokens": 2,
                "repeats": 1})
    b = clamp_context(cfg.batch_context or contexts[0], cfg.new_tokens, n_pos)
    out.append({"kind": "batch", "new_tokens": cfg.new_tokens, "repeats": 1,
                "prompts": [synthetic_prompt(b, vocab, seed=r) for r in range(cfg.batch)]})
    return out


def schedule(cfg: Config, systems: list[str], measurements: list[dict[str, Any]],
             repeat: int = 0) -> list[tuple[str, list[dict[str, Any]]]]:
    """(system, phases) per worker of repetition `repeat`: alternating rounds with an order that
    rotates from round to round and again from one repetition to the next, or one worker per
    system with every phase (--no-alternate; the order rotates between repetitions)."""
    def rotated(k: int) -> list[str]:
        k %= len(systems)
        return systems[k:] + systems[:k]

    if not cfg.alternate:
        return [(s, measurements) for s in rotated(repeat)]
    jobs = []
    for r, phase in enumerate(measurements):
        jobs += [(s, [phase]) for s in rotated(r + repeat * len(measurements))]
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


def failed_variants(verify: dict[str, Any] | None) -> set[str]:
    """Variants with a failed verify check. A check that did not run because it does not apply
    (sampling equality for an inexact variant: status "not run", figure "not run") is no
    failure; the summary's own verdict says so too."""
    failed = set()
    for c in (verify or {}).get("checks", []):
        not_run = c.get("status") == "not run" or c.get("figure") == "not run"
        if c.get("passed") is False and not (not_run and c.get("essential") is not True):
            failed.add(c.get("variant"))
    return failed


def verify_of(cfg: Config, recorded: dict[str, Any] | None) -> dict[str, Any] | None:
    """The verify result the table reports: --verify-report's (a directory exported with
    --no-verify and verified apart), else the manifest's."""
    if cfg.verify_report is None:
        return recorded
    report = json.loads(Path(cfg.verify_report).read_text())
    if not isinstance(report.get("checks"), list) or "passed" not in report:
        raise ValueError(f"--verify-report {cfg.verify_report}: not a gpt2-onnx verify report")
    return {**report, "source": str(cfg.verify_report)}


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
    notes: list[str] = []
    llama: dict[str, Any] = {}
    if any(s in LLAMA_SYSTEMS for s in systems):
        log("llama.cpp: build (cached) and GGUF conversions (cached)")
        try:
            llama = prepare_llama(cfg, systems, log)
        except (RuntimeError, OSError) as exc:
            dropped = [s for s in systems if s in LLAMA_SYSTEMS]
            notes.append(f"llama.cpp systems skipped ({', '.join(dropped)}): {exc}")
            log("  " + notes[-1])
            systems = [s for s in systems if s not in LLAMA_SYSTEMS]
    if cfg.prepare_only:
        return {"prepared": str(cfg.cache_dir), "systems": systems, "notes": notes}
    measurements = phases(cfg, manifest.dims)
    paths = {"model_dir": str(cfg.our_dir), "checkpoint": str(cfg.checkpoint),
             "optimum_dir": str(optimum_dir(cfg)) if "optimum" in systems else "",
             "ct2_dirs": {s: str(cfg.ct2_dir(s)) for s in PEERS if s.startswith("ct2-")},
             "genai_dirs": {s: str(cfg.genai_dir(s)) for s in systems if s.startswith("genai:")},
             "llama": {k: v for k, v in llama.items() if k != "build"}}
    doc: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": package_versions(BENCH_VERSIONS, missing="not installed"),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "model": {"name": manifest.name, "source": manifest.source, "dims": asdict(manifest.dims),
                  "verify": verify_of(cfg, manifest.verify)},
        "llama_cpp": llama.get("build"), "notes": notes,
        "systems": systems, "bandwidth": {"probes": []}, "workers": [],
    }
    env = worker_env(cfg.threads)
    doc["machine"]["loadavg_start"] = list(os.getloadavg())  # quiet machine: ~0 here
    with tempfile.TemporaryDirectory(prefix="gpt2-onnx-bench-") as tmp_name:
        tmp = Path(tmp_name)
        doc["bandwidth"]["probes"] += measure_bandwidth(cfg, "before", tmp, env, log)
        jobs = [(r, *job) for r in range(cfg.repeats)
                for job in schedule(cfg, systems, measurements, r)]
        for n, (r, system, job_phases) in enumerate(jobs, 1):
            kinds = ", ".join(f"{p['kind']}@{len(p['prompts'][0])}" for p in job_phases)
            log(f"[{n}/{len(jobs)}] repeat {r + 1}/{cfg.repeats} {system}: {kinds}")
            task = {"system": system, "threads": cfg.threads, "phases": job_phases, **paths}
            answer = run_worker(task, tmp, env)
            answer["repeat"] = r
            if "error" in answer:
                log(f"  FAILED: {answer['error']}")
                answer["phases"] = [{"kind": p["kind"], "context": len(p["prompts"][0]),
                                     "batch": len(p["prompts"])} for p in job_phases]
            if doc["llama_cpp"] is not None and "system_info" in answer:
                doc["llama_cpp"]["system_info"] = answer.pop("system_info")
            doc["workers"].append(answer)
            write_json(doc, cfg.out)
        doc["bandwidth"]["probes"] += measure_bandwidth(cfg, "after", tmp, env, log)
    doc["machine"]["loadavg_end"] = list(os.getloadavg())
    per_step = {s: weight_bytes_read(cfg, manifest, s) for s in systems}
    files = {}
    for s in systems:
        variant = manifest.variants.get(s.split(":", 1)[1]) \
            if s.startswith(("ours:", "genai:")) else None
        files[s] = sum(manifest.files[f].size for f in (variant.graph, *variant.data)) \
            if variant else None
    doc["summary"] = summarize(manifest.dims, systems, doc, per_step, files)
    doc["goals"] = goals_issue16(doc["summary"], doc["model"].get("verify"))
    doc["goals_issue5"] = goals(doc["summary"], cfg)
    return doc


def write_json(doc: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- derived figures


Stat = dict[str, float]  # {"median", "min", "max", "n"} of one figure over the repetitions


def stat(values: Sequence[float]) -> Stat | None:
    """Median and spread (min, max) of one figure's runs; None when there are none."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def med(s: Stat | None) -> float | None:
    """The median of a Stat (None passes through)."""
    return None if s is None else s["median"]


@dataclass
class SystemSummary:
    system: str
    weight_bytes_read: int  # per decode step
    kv_itemsize: int  # bytes per cached key/value element
    file_bytes: int | None  # ours: the variant's files (graph + data)
    decode: dict[int, Stat] = field(default_factory=dict)  # context -> tok/s, batch 1
    ceiling: dict[int, float] = field(default_factory=dict)  # context -> ceiling tok/s
    ttft_ms: Stat | None = None
    ttft_prompt: int | None = None
    batch_tokens_per_s: Stat | None = None
    batch_context: int | None = None
    load_s: Stat | None = None  # over every subprocess of this system
    peak_rss: Stat | None = None  # per repetition the max over its subprocesses; over repetitions
    errors: list[str] = field(default_factory=list)


def step_bytes(dims: Any, weight_bytes: int, itemsize: int, context: int, new_tokens: int
               ) -> float:
    """Bytes one decode step reads at `context`: the weights and the KV cache at the mean past
    length of the timed steps."""
    return weight_bytes + kv_bytes_read(dims, context + new_tokens / 2, itemsize)


def achieved_bandwidth(dims: Any, doc: dict[str, Any], per_step: dict[str, int]
                       ) -> list[dict[str, Any]]:
    """Bytes/s each batch-1 decode figure of the run implies (tok/s x bytes per step), for
    systems whose weights do not fit the CPU caches (those would measure cache bandwidth)."""
    out = []
    for w in doc["workers"]:
        system = w.get("system")
        if "error" in w or per_step.get(system, 0) < CACHE_SIZED_BYTES:
            continue
        for p in w["phases"]:
            if p["kind"] == "decode" and p.get("tokens_per_s"):
                nbytes = step_bytes(dims, per_step[system], kv_itemsize(system), p["context"],
                                    p["new_tokens"])
                out.append({"system": system, "context": p["context"],
                            "repeat": w.get("repeat", 0),
                            "bytes_per_s": p["tokens_per_s"] * nbytes})
    return out


def sound_bandwidth(probes: list[dict[str, Any]], achieved: list[dict[str, Any]]
                    ) -> dict[str, Any]:
    """The ceiling's bandwidth: the best probe, and never below the best bytes/s a system
    achieved (a ceiling some system beats is not one). Says which one set it."""
    best_probe = max((p for p in probes if "error" not in p), key=lambda p: p["bytes_per_s"],
                     default=None)
    best_run = max(achieved, key=lambda a: a["bytes_per_s"], default=None)
    probe_bw = best_probe["bytes_per_s"] if best_probe else 0.0
    run_bw = best_run["bytes_per_s"] if best_run else 0.0
    if best_probe is None and best_run is None:
        return {"bytes_per_s": 0.0, "set_by": "nothing measured"}
    if probe_bw >= run_bw:
        set_by = f"probe {best_probe['system']} ({best_probe.get('when', '?')})"
    else:
        set_by = (f"{best_run['system']} decode at context {best_run['context']} (repeat "
                  f"{best_run['repeat'] + 1}): faster than every probe")
    return {"bytes_per_s": max(probe_bw, run_bw), "set_by": set_by,
            "best_probe_bytes_per_s": probe_bw, "best_achieved": best_run}


def summarize(dims: Any, systems: list[str], doc: dict[str, Any], per_step: dict[str, int],
              files: dict[str, int | None]) -> dict[str, dict[str, Any]]:
    """Per system: each figure's median and spread over its subprocesses, and the ceiling at
    each context (sound bandwidth / bytes per step). Sets doc["bandwidth"]'s derived fields."""
    achieved = achieved_bandwidth(dims, doc, per_step)
    doc["bandwidth"].update(sound_bandwidth(doc["bandwidth"].get("probes", []), achieved))
    bandwidth = doc["bandwidth"]["bytes_per_s"]
    out = {}
    for system in systems:
        s = SystemSummary(system, per_step[system], kv_itemsize(system), files.get(system))
        decode: dict[int, list[float]] = {}
        new_tokens: dict[int, int] = {}
        ttft: list[float] = []
        batch: list[float] = []
        loads: list[float] = []
        rss: dict[int, int] = {}  # repetition -> max peak RSS over its subprocesses
        for w in (w for w in doc["workers"] if w.get("system") == system):
            if "error" in w:
                s.errors.append(w["error"])
                continue
            loads.append(w["load_s"])
            r = w.get("repeat", 0)
            rss[r] = max(rss.get(r, 0), w["peak_rss"])
            for p in w["phases"]:
                if p["kind"] == "decode":
                    decode.setdefault(p["context"], []).append(p["tokens_per_s"])
                    new_tokens[p["context"]] = p["new_tokens"]
                elif p["kind"] == "ttft":
                    ttft.append(p["ttft_ms"])
                    s.ttft_prompt = p["context"]
                elif p["kind"] == "batch":
                    batch.append(p["tokens_per_s"])
                    s.batch_context = p["context"]
        for c in sorted(decode):
            s.decode[c] = stat(decode[c])
            if bandwidth:
                s.ceiling[c] = bandwidth / step_bytes(dims, s.weight_bytes_read, s.kv_itemsize,
                                                      c, new_tokens[c])
        s.ttft_ms, s.batch_tokens_per_s = stat(ttft), stat(batch)
        s.load_s, s.peak_rss = stat(loads), stat(list(rss.values()))
        out[system] = asdict(s)
    return out


def _by_context(figures: dict[Any, Any]) -> dict[int, Any]:
    """JSON turns int keys into strings; both are accepted."""
    return {int(k): v for k, v in figures.items()}


# column -> (label, higher is better)
COLUMNS = {"ttft_ms": ("time to first token", False),
           "batch_tokens_per_s": ("batch throughput", True),
           "load_s": ("load", False), "peak_rss": ("peak RSS", False)}


def goals_issue16(summary: dict[str, dict[str, Any]], verify: dict[str, Any] | None = None
                  ) -> list[dict[str, Any]]:
    """Issue 16's goals from the medians: first place in every column against every peer of the
    same or coarser precision (RIVALS), and decode at the first context >= 85 % of the sound
    ceiling. Each row: the figure ours / the best rival's (target 1: >= for higher-is-better
    columns, <= for the others), the rival, met."""
    rows: list[dict[str, Any]] = []
    failed_verify = failed_variants(verify)

    def add(goal: str, measured: float | None, target: float, higher: bool, versus: str = "",
            note: str = "") -> None:
        met = None if measured is None else (measured >= target if higher else measured <= target)
        rows.append({"goal": goal, "measured": measured, "target": target, "unit": "x",
                     "compare": ">=" if higher else "<=", "met": met, "versus": versus,
                     "note": note})

    for ours, rivals in RIVALS.items():
        mine = summary.get(ours)
        present = [r for r in rivals if r in summary]
        if not mine or not present:
            continue
        note = "verify FAILED for this variant" if ours.split(":", 1)[1] in failed_verify else ""
        columns: list[tuple[str, str, bool, Any]] = [
            (f"decode @{c}", "decode", True, c) for c in sorted(_by_context(mine["decode"]))]
        columns += [(label, key, higher, None) for key, (label, higher) in COLUMNS.items()]
        for label, key, higher, c in columns:
            def figure(s: dict[str, Any], key: str = key, c: Any = c) -> float | None:
                v = _by_context(s[key]).get(c) if c is not None else s.get(key)
                return med(v)

            value = figure(mine)
            theirs = {r: figure(summary[r]) for r in present}
            theirs = {r: v for r, v in theirs.items() if v}
            if not value or not theirs:
                add(f"{ours} {label}: first against {', '.join(present)}", None, 1.0, higher)
                continue
            best = (max if higher else min)(theirs, key=lambda r: theirs[r])
            add(f"{ours} {label}: first against {', '.join(present)}", value / theirs[best], 1.0,
                higher, versus=best, note=note)
    for ours in CEILING_VARIANTS:
        mine = summary.get(ours)
        if not mine or not mine["decode"]:
            continue
        decode, ceiling = _by_context(mine["decode"]), _by_context(mine["ceiling"])
        c = min(decode)
        d, ceil = med(decode[c]), ceiling.get(c)
        add(f"{ours} decode @{c} / sound ceiling", d / ceil if d and ceil else None,
            CEILING_SHARE, True, versus="ceiling")
    return rows


def goals(summary: dict[str, dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """Issue 5's goals (from the medians), each with the measured figure, the target and
    whether it is met."""
    rows: list[dict[str, Any]] = []

    def add(goal: str, measured: float | None, target: float, unit: str,
            higher_is_better: bool = True) -> None:
        met = None if measured is None else (measured >= target if higher_is_better
                                             else measured <= target)
        rows.append({"goal": goal, "measured": measured, "target": target, "unit": unit,
                     "compare": ">=" if higher_is_better else "<=", "met": met})

    def get(system: str) -> dict[str, Any] | None:
        s = summary.get(system)
        if s is None:
            return None
        return {**s, "decode": {c: med(v) for c, v in _by_context(s["decode"]).items()},
                "ceiling": _by_context(s["ceiling"]),
                **{k: med(s[k]) for k in ("ttft_ms", "batch_tokens_per_s", "load_s",
                                          "peak_rss")}}

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
    for system in summary:
        v = get(system)
        if not system.startswith("ours:") or v is None:
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
    for system in summary:  # issue 18: the same graph in genai's C++ loop
        if not system.startswith("genai:") or not get("ours:" + system.split(":", 1)[1]):
            continue
        theirs = get(system)
        mine = get("ours:" + system.split(":", 1)[1])
        for c in sorted(mine["decode"]):
            if theirs["decode"].get(c):
                add(f"ours:{system[6:]} decode at context {c} / {system}",
                    mine["decode"][c] / theirs["decode"][c], 0.95, "x")
        if mine.get("batch_tokens_per_s") and theirs.get("batch_tokens_per_s"):
            add(f"ours:{system[6:]} batch-{cfg.batch} throughput / {system}",
                mine["batch_tokens_per_s"] / theirs["batch_tokens_per_s"], 1.0, "x")
    if fp32 and fp32.get("load_s") is not None:
        add("fp32 load (session ready)", fp32["load_s"], 2.0, "s", higher_is_better=False)
    return rows


# --------------------------------------------------------------------------- markdown


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def cell(s: Stat | None, fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    """A table cell: the median, and its spread "(min–max)" when there are several runs."""
    if s is None:
        return "—"
    text = fmt.format(s["median"] / scale)
    if s.get("n", 1) > 1:
        text += f" ({fmt.format(s['min'] / scale)}–{fmt.format(s['max'] / scale)})"
    return text


def _loadavg(m: dict[str, Any]) -> str:
    """The machine's load average (1/5/15 min) before and after the run: a run that starts
    above ~0.5 on a 2-core machine shared it with something else (llama.cpp's spinning threads
    collapse then; profile-notes.md)."""
    if "loadavg_start" not in m:
        return ""
    fmt = "/".join(["{:.1f}"] * 3)
    end = m.get("loadavg_end")
    return (f" Load average (1/5/15 min) before the run {fmt.format(*m['loadavg_start'])}"
            + (f", after {fmt.format(*end)}" if end else "") + ".")


def _bandwidth_lines(doc: dict[str, Any]) -> list[str]:
    bw, gb = doc["bandwidth"], 1e9
    probes = ", ".join(
        f"{p['system']} {p.get('when', '')} "
        + ("failed" if "error" in p else f"{p['bytes_per_s'] / gb:.1f}")
        for p in bw.get("probes", []))
    return [f"- Bandwidth ceiling: **{bw.get('bytes_per_s', 0) / gb:.1f} GB/s**, set by "
            f"{bw.get('set_by', '?')}; probes ({doc['config']['gemv_mib']} MiB each, same "
            f"threads; GB/s): {probes or 'none'}."]


def _llama_line(doc: dict[str, Any]) -> list[str]:
    info = doc.get("llama_cpp")
    if not info:
        return []
    flags = " ".join(f for f in info.get("cmake_flags", []) if "NATIVE" in f or "BUILD_TYPE" in f)
    return [f"- llama.cpp: commit {str(info.get('llama_cpp_commit'))[:12]} (vendored by "
            f"llama-cpp-python {info.get('llama_cpp_python')}), {info.get('compiler')}, {flags}; "
            f"driven through its C API (llama-cpp-python's ctypes bindings), F16 KV cache. "
            f"System info: {info.get('system_info', '—').strip()}"]


def markdown(doc: dict[str, Any]) -> str:
    """bench.md: machine, the systems table (medians and spreads), ceilings, goals, method."""
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
        f"- Every figure: the median of {cfg['repeats']} subprocess(es), spread (min–max) in "
        "brackets." + _loadavg(m),
        *_bandwidth_lines(doc),
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + ".",
        *_llama_line(doc),
        *[f"- Note: {n}" for n in doc.get("notes", [])],
        "",
        "| system | MiB read / step | " + " | ".join(f"tok/s @{c}" for c in contexts)
        + " | % of ceiling (" + " / ".join(f"@{c}" for c in contexts) + ")"
        + f" | TTFT {cfg['prompt_tokens']} tok (ms) | batch-{cfg['batch']} tok/s | load (s) "
          "| peak RSS (MiB) |",
        "|---" * (6 + len(contexts)) + "|---|",
    ]
    verify = doc["model"].get("verify") or {}
    failed_verify = failed_variants(verify)
    for system, s in summary.items():
        decode, ceiling = _by_context(s["decode"]), _by_context(s["ceiling"])
        rates = [cell(decode.get(c)) for c in contexts]
        shares = []
        for c in contexts:
            d, ceil = med(decode.get(c)), ceiling.get(c)
            shares.append(_f(100 * d / ceil if d and ceil else None, "{:.0f}"))
        name = system + (" ⚠ " + "; ".join(s["errors"])[:80] if s["errors"] else "")
        if system.startswith("ours:") and system.split(":", 1)[1] in failed_verify:
            name += " (fails verify)"
        lines.append(
            f"| {name} | {s['weight_bytes_read'] / mib:.0f} | " + " | ".join(rates)
            + f" | {' / '.join(shares)} | {cell(s['ttft_ms'], '{:.0f}')} | "
            f"{cell(s['batch_tokens_per_s'], '{:.1f}')} | {cell(s['load_s'])} | "
            f"{cell(s['peak_rss'], '{:.0f}', mib)} |")
    smallest = min((s["weight_bytes_read"] for s in summary.values()), default=0)
    if smallest < CACHE_SIZED_BYTES:
        lines += ["", f"Note: {smallest / mib:.0f} MiB of weights can sit in the CPU caches, so "
                  "the ceilings (DRAM bandwidth) do not bind and the figures measure per-step "
                  "overhead; run gpt2-large for the real comparison."]
    lines += ["", "Ceiling tok/s at each context (sound bandwidth / (weights + KV read per "
              "step)):", "", "| system | " + " | ".join(f"@{c}" for c in contexts) + " |",
              "|---" * (1 + len(contexts)) + "|"]
    for system, s in summary.items():
        ceiling = _by_context(s["ceiling"])
        cells = [_f(ceiling.get(c), "{:.1f}") for c in contexts]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    lines += ["", "## Goals (issue 16)", "",
              "Ratios of medians: ours / the best rival of the same or coarser precision "
              "(≥ 1 = first place where higher is better, ≤ 1 where lower is better).", "",
              "| goal | measured | best rival | target | met |", "|---|---|---|---|---|"]
    for g in doc["goals"]:
        met = {True: "yes", False: "**no**", None: "—"}[g["met"]]
        op = "≥" if g["compare"] == ">=" else "≤"
        note = f" ({g['note']})" if g.get("note") else ""
        lines.append(f"| {g['goal']}{note} | {_f(g['measured'], '{:.3g}')} x | "
                     f"{g.get('versus') or '—'} | {op} {g['target']} x | {met} |")
    met = [g["met"] for g in doc["goals"]]
    lines += ["", f"Met: {met.count(True)} of {len(met)}"
              + (f" ({met.count(None)} not measured)" if None in met else "") + "."]
    if doc.get("goals_issue5"):
        lines += ["", "## Earlier goals (issue 5)", "", "| goal | measured | target | met |",
                  "|---|---|---|---|"]
        for g in doc["goals_issue5"]:
            met5 = {True: "yes", False: "**no**", None: "—"}[g["met"]]
            op = "≥" if g["compare"] == ">=" else "≤"
            lines.append(f"| {g['goal']} | {_f(g['measured'], '{:.3g}')} {g['unit']} | {op} "
                         f"{g['target']} {g['unit']} | {met5} |")
    verify = doc["model"].get("verify")
    if verify:
        verdict = "passed" if verify.get("passed") else "FAILED"
        lines += ["", f"Verify (from {verify.get('source', 'the manifest')}): {verdict}; "
                  + "; ".join(f"{c.get('variant')} {c.get('check')} {c.get('figure')}"
                              for c in verify.get("checks", []))]
    else:
        lines += ["", "Verify: not recorded in the model directory's manifest (export with "
                      "verify to report top-1 agreement and KL per variant)."]
    lines += [
        "", "Method: each figure from a fresh subprocess per system (bench/peers.py); "
        + ("systems alternate within each round, order rotating" if cfg["alternate"]
           else "one subprocess per system (--no-alternate)")
        + f"; the whole schedule {cfg['repeats']} time(s), the order rotated each time. "
        "Decode tok/s = tokens after the first / (last token time − first token time). TTFT = "
        "call start → first token. Batch = tokens of all rows after the first / decode time. "
        "Load = model load after imports (every subprocess of the system). Peak RSS = "
        "VmHWM of the subprocess (interpreter and libraries included), per repetition the max "
        "over its subprocesses. CTranslate2 int8 bytes read = its model.bin size "
        "(approximate); llama.cpp bytes read = its GGUF tensors but the position table, KV "
        "cache in F16. The ceiling's bandwidth is the best of the probes and of every decode "
        "figure's achieved bytes/s (tok/s × bytes per step), so no system exceeds 100 %.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny preset, short contexts, one subprocess per system, llama.cpp "
                        "only if already built (~1-3 min)")
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
                   help="comma-separated: ours (every variant), ours:<precision>, genai "
                        "(every variant onnxruntime-genai runs), genai:<precision>, llama "
                        f"(builds llama.cpp once: {', '.join(LLAMA_SYSTEMS)}), "
                        f"{', '.join(PEERS)} [%(default)s]")
    p.add_argument("--contexts", help="decode contexts [8, n_positions/4, ~0.88 n_positions: "
                   "8,256,900 for gpt2-large; 8,64,225 with --quick]")
    p.add_argument("--new-tokens", type=int, help="new tokens per decode figure [32; 16]")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batch-context", type=int, help="prompt length of the batch rows "
                   "[the first context]")
    p.add_argument("--prompt-tokens", type=int, help="time-to-first-token prompt [512; 128]")
    p.add_argument("--repeats", type=int, help="repetitions of the whole schedule; every "
                   "figure is their median, with the spread [3; 1 with --quick]")
    p.add_argument("--alternate", action=argparse.BooleanOptionalAction, default=None,
                   help="one subprocess per system and round [on; off with --quick]")
    p.add_argument("--gemv-mib", type=int, help="MiB each bandwidth probe reads "
                   "[1024; 512 with --quick]")
    p.add_argument("--verify-report", type=Path,
                   help="mark the table from this `gpt2-onnx verify --report` JSON [the "
                        "manifest's verify summary]")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite bench.md, bench.png and the goals from OUT/bench.json (no run)")
    p.add_argument("--prepare-only", action="store_true",
                   help="only build what the run needs (checkpoint, conversions, llama.cpp, "
                        "GGUF files; all cached), untimed: do it while the machine is busy")
    a = p.parse_args(argv)
    base = {**asdict(Config()), **(QUICK if a.quick else {})}
    chosen = dict(prepare_only=a.prepare_only or None, verify_report=a.verify_report,
                  render_only=a.render_only or None,
        preset=a.preset, seed=a.seed, model_dir=a.model_dir, cache=a.cache, out=a.out,
        threads=a.threads, batch=a.batch, batch_context=a.batch_context, repeats=a.repeats,
        systems=tuple(s.strip() for s in a.systems.split(",") if s.strip()),
        contexts=tuple(int(c) for c in a.contexts.split(",")) if a.contexts else None,
        new_tokens=a.new_tokens, prompt_tokens=a.prompt_tokens, alternate=a.alternate,
        gemv_mib=a.gemv_mib)
    cfg = Config(**{**base, **{k: v for k, v in chosen.items() if v is not None}})
    if cfg.render_only and cfg.prepare_only:
        p.error("--render-only and --prepare-only exclude each other")
    if cfg.threads < 1 or cfg.batch < 1 or cfg.new_tokens < 2 or cfg.repeats < 1:
        p.error("--threads, --batch and --repeats must be >= 1, --new-tokens >= 2")
    unknown = [s for s in cfg.systems if s not in ("ours", "genai", "llama")
               and not s.startswith(("ours:", "genai:")) and s not in PEERS + LLAMA_SYSTEMS]
    if unknown or not cfg.systems:
        p.error(f"--systems: unknown {unknown}; choose ours, ours:<precision>, genai, "
                f"genai:<precision>, llama, {', '.join(PEERS + LLAMA_SYSTEMS)}")
    return cfg


def main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    start = time.perf_counter()

    def log(msg: str) -> None:
        sys.stderr.write(f"[{time.perf_counter() - start:7.1f} s] {msg}\n")
        sys.stderr.flush()

    if cfg.render_only:  # the goals again, from the medians an earlier run wrote
        doc = json.loads((cfg.out / "bench.json").read_text())
        doc["goals"] = goals_issue16(doc["summary"], doc["model"].get("verify"))
    else:
        doc = run(cfg, log)
    if cfg.prepare_only:
        log(f"prepared {doc['prepared']} for {', '.join(doc['systems'])}")
        return 0
    write_json(doc, cfg.out)
    (cfg.out / "bench.md").write_text(markdown(doc))
    from chart import NO_MATPLOTLIB, plot

    if plot(doc, cfg.out / "bench.png") is None:
        log(NO_MATPLOTLIB)
        log(f"wrote {cfg.out}/bench.json, bench.md")
    else:
        log(f"wrote {cfg.out}/bench.json, bench.md, bench.png")
    sys.stdout.write(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
