"""Where a variant's load time, peak RSS and prefill go: one fresh process per setting.

    python bench/profile_session.py MODEL_DIR --precision int4 [--threads 2]
        [--setting default --setting session.disable_prepacking=1 --setting arena=0 ...]
        [--prompt-tokens 512] [--ort-profile DIR]

Each setting runs in its own subprocess (peak RSS is per process): create the session through
the runtime (TextGenerator.load) with the setting applied to its SessionOptions, then the runs
of --phases, greedy: ttft (2 tokens from a `--prompt-tokens` prompt), decode (16 tokens from an
8-token prompt), batch (16 tokens for each of `--batch` 8-token prompts). Reports load seconds,
RSS (VmRSS, VmHWM, and its anonymous and file-backed shares) after load and after the runs, and
each run's figure. With --ort-profile, onnxruntime's profiler (SessionOptions.enable_profiling)
records every run and the kernel time per operator type is summed (the top 8). A setting is
`default`, `arena=0` (no CPU memory arena) or any `session.*` config entry `key=value`
(onnxruntime_session_options_config_keys.h).

A bench tool (needs only the runtime); the findings go to bench/results/profile-notes.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any


def memory() -> dict[str, int]:
    """VmRSS, VmHWM and RssFile of this process, in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM", "RssFile", "RssAnon"):
            out[key] = int(line.split()[1]) // 1024
    return out


def op_times(profile: Path, top: int = 8) -> list[tuple[str, float]]:
    """Milliseconds per operator type in an onnxruntime profile (kernel time events)."""
    events = json.loads(profile.read_text())
    per_op: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e.get("args", {}).get("op_name", "?")] += e.get("dur", 0) / 1e3
    return per_op.most_common(top)


PHASES = ("ttft", "decode", "batch")


def child(model_dir: str, precision: str, threads: int, setting: str, prompt_tokens: int,
          ort_profile: str | None, phases: tuple[str, ...] = PHASES, batch: int = 8
          ) -> dict[str, Any]:
    """Load with `setting`, then the runs of `phases` (ttft: a `prompt_tokens` prompt, 2 new
    tokens; decode: 8-token prompt, 16 new; batch: `batch` such prompts); the figures."""
    import gpt2_onnx.runtime.session as session_mod
    from gpt2_onnx.runtime.bench import synthetic_prompt
    from gpt2_onnx.runtime.generator import TextGenerator

    base = session_mod.session_options

    def patched(threads_: int | None, prepack: bool = True) -> Any:
        opts = base(threads_, prepack)
        if setting == "arena=0":
            opts.enable_cpu_mem_arena = False
        elif "=" in setting:
            key, value = setting.split("=", 1)
            opts.add_session_config_entry(key, value)
        if ort_profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(ort_profile) / f"{precision}-{setting}")
        return opts

    session_mod.session_options = patched
    t = time.perf_counter()
    gen = TextGenerator.load(model_dir, device="cpu", precision=precision, threads=threads)
    load_s = time.perf_counter() - t
    after_load = memory()
    vocab = gen.manifest.dims.vocab_size
    long = synthetic_prompt(prompt_tokens, vocab)
    gen.generate_ids([long[:4]], max_new_tokens=2, greedy=True)  # warm-up
    out: dict[str, Any] = {"setting": setting, "precision": precision, "load_s": load_s,
                           "after_load_mib": after_load}
    if "ttft" in phases:
        out["ttft_ms"] = gen.generate_ids([long], max_new_tokens=2,
                                          greedy=True)[0].timings.prefill_ms
    if "decode" in phases:
        r = gen.generate_ids([long[:8]], max_new_tokens=16, greedy=True)[0]
        out["decode_tok_s"] = (len(r.ids) - 1) / (r.timings.decode_ms / 1e3)
    if "batch" in phases:
        rows = [synthetic_prompt(8, vocab, seed=i) for i in range(batch)]
        gen.generate_ids(rows, max_new_tokens=2, greedy=True)  # warm-up of this shape
        rs = gen.generate_ids(rows, max_new_tokens=16, greedy=True)
        out[f"batch{batch}_tok_s"] = sum(len(r.ids) - 1 for r in rs) / (
            rs[0].timings.decode_ms / 1e3)
    out["after_runs_mib"] = memory()
    if ort_profile:
        files = [s.end_profiling() for s in _sessions(gen)]
        out["ops_ms"] = [op for f in files if f for op in op_times(Path(f))]
    return out


def _sessions(gen: Any) -> list[Any]:
    """The onnxruntime sessions a generator holds (for end_profiling)."""
    import onnxruntime as ort

    found = []
    stack, seen = [gen], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, ort.InferenceSession):
            found.append(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return found


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--precision", default="int4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--setting", action="append", help="default, arena=0 or session.KEY=VALUE "
                   "(repeatable; one subprocess each) [default]")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--ort-profile", help="folder for onnxruntime profiles (of every run)")
    p.add_argument("--phases", default=",".join(PHASES), help="runs after the load, comma-"
                   "separated: ttft, decode, batch [%(default)s]")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    settings = a.setting or ["default"]
    if a.child:
        sys.stdout.write(json.dumps(child(
            a.model_dir, a.precision, a.threads, settings[0], a.prompt_tokens, a.ort_profile,
            tuple(a.phases.split(",")), a.batch)) + "\n")
        return 0
    if a.ort_profile:
        Path(a.ort_profile).mkdir(parents=True, exist_ok=True)
    for setting in settings:
        cmd = [sys.executable, __file__, a.model_dir, "--child", "--precision", a.precision,
               "--threads", str(a.threads), "--setting", setting,
               "--prompt-tokens", str(a.prompt_tokens), "--phases", a.phases,
               "--batch", str(a.batch)]
        if a.ort_profile:
            cmd += ["--ort-profile", a.ort_profile]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stdout.write(json.dumps({"setting": setting, "error": proc.stderr[-500:]}) + "\n")
        else:
            sys.stdout.write(proc.stdout.strip().splitlines()[-1] + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
