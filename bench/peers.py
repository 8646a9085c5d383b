"""The systems of the CPU benchmark, and the worker that measures one of them in a subprocess.

    python bench/peers.py TASK.json      (run_bench.py writes the task; one JSON line on stdout)

Each system is loaded in its own process, so its peak RSS is its own. A worker imports only what
its system needs (ours never imports torch; CTranslate2 never imports onnxruntime), loads the
model (timed), warms up with a 4-token prompt and 2 new tokens, then runs the task's phases. Every
system is driven the same way: greedy, exactly `new_tokens` new tokens per row (EOS is not a stop
for the peers; ours stops at EOS, and the tokens it did produce are counted), time to first token
= call start -> first token, decode = first token -> last token, tokens/s = decoded tokens of all
rows after the first / decode seconds.

Systems:
  ours:<precision>  gpt2_onnx.runtime.TextGenerator (one variant of the model directory)
  torch             transformers GPT2LMHeadModel.generate, float32, torch.set_num_threads
  optimum           optimum.onnxruntime.ORTModelForCausalLM.generate (optimum's fp32 graph)
  ct2-float32       ctranslate2.Generator, model converted with quantization float32
  ct2-int8          the same, quantization int8
  genai:<precision> onnxruntime-genai's C++ loop over the same graph as ours:<precision> (its
                    genai_config.json in a directory of hard links; run_bench.py prepares it)
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

PEERS = ("torch", "optimum", "ct2-float32", "ct2-int8")
WARMUP_PROMPT = [464, 3290, 318, 257]  # 4 ids; any ids below EOS do
WARMUP_TOKENS = 2


@dataclass(frozen=True)
class Run:
    """Timings of one call that generates for a batch of prompts."""

    ttft_s: float  # call start -> first token of every row
    decode_s: float  # first token -> last token
    decoded: int  # tokens of all rows after each row's first


class Runner(Protocol):
    def run(self, prompts: list[list[int]], new_tokens: int) -> Run:
        """Greedy generation of `new_tokens` tokens per prompt (prompts of equal length)."""


# --------------------------------------------------------------------------- the systems


class OursRunner:
    """gpt2-onnx's runtime: TextGenerator.generate_ids (its Timings time prefill and decode)."""

    def __init__(self, model_dir: str, precision: str, threads: int) -> None:
        from gpt2_onnx.runtime.generator import TextGenerator

        self.gen = TextGenerator.load(model_dir, device="cpu", precision=precision,
                                      threads=threads)

    def run(self, prompts: list[list[int]], new_tokens: int) -> Run:
        results = self.gen.generate_ids(prompts, max_new_tokens=new_tokens, greedy=True)
        t = results[0].timings  # one loop: the rows share prefill and decode time
        decoded = sum(max(len(r.ids) - 1, 0) for r in results)
        return Run(t.prefill_ms / 1e3, t.decode_ms / 1e3, decoded)


class _Stamps:
    """A transformers LogitsProcessor that records when each step's logits arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.times.append(time.perf_counter())
        return scores


class HFGenerateRunner:
    """transformers `generate` (PyTorch eager, or optimum's ORTModelForCausalLM)."""

    def __init__(self, model: Any, eos: int) -> None:
        self.model = model
        self.eos = eos

    def run(self, prompts: list[list[int]], new_tokens: int) -> Run:
        import torch
        from transformers import LogitsProcessorList

        ids = torch.tensor(prompts, dtype=torch.long)  # [batch, context]
        stamps = _Stamps()
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, num_beams=1, use_cache=True,
                pad_token_id=self.eos, logits_processor=LogitsProcessorList([stamps]))
        t = stamps.times
        return Run(t[0] - start, t[-1] - t[0], len(prompts) * (len(t) - 1))


def torch_runner(checkpoint: str, threads: int) -> HFGenerateRunner:
    import torch
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(threads)
    model = GPT2LMHeadModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return HFGenerateRunner(model, model.config.eos_token_id)


def optimum_runner(onnx_dir: str, threads: int) -> HFGenerateRunner:
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    model = ORTModelForCausalLM.from_pretrained(
        onnx_dir, file_name="model.onnx", use_cache=True, provider="CPUExecutionProvider",
        session_options=opts)
    return HFGenerateRunner(model, model.config.eos_token_id)


class CT2Runner:
    """ctranslate2.Generator.generate_batch; a step callback stamps each token as it is produced
    (generate_tokens is the same call with a queue in between)."""

    def __init__(self, model_dir: str, threads: int, vocab_file: str) -> None:
        import ctranslate2

        self.generator = ctranslate2.Generator(model_dir, device="cpu", intra_threads=threads,
                                               inter_threads=1)
        with open(vocab_file, encoding="utf-8") as f:
            vocab: dict[str, int] = json.load(f)
        self.tokens = {i: t for t, i in vocab.items()}  # id -> BPE token string

    def run(self, prompts: list[list[int]], new_tokens: int) -> Run:
        starts = [[self.tokens[i] for i in p] for p in prompts]
        settings = dict(max_length=new_tokens, min_length=new_tokens, sampling_topk=1)
        last: dict[int, float] = {}  # step -> when the last row's token of that step arrived

        def stamp(step: Any) -> bool:
            last[step.step] = time.perf_counter()
            return False  # False: keep decoding this row

        start = time.perf_counter()
        self.generator.generate_batch(starts, include_prompt_in_result=False, callback=stamp,
                                      **settings)
        steps = sorted(last)
        return Run(last[steps[0]] - start, last[steps[-1]] - last[steps[0]],
                   len(prompts) * (len(steps) - 1))


class GenaiRunner:
    """onnxruntime-genai's Generator: append the batch, then generate_next_token until done
    (min_length keeps EOS from ending a row early); each step stamped as it returns."""

    def __init__(self, model_dir: str) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(model_dir)

    def run(self, prompts: list[list[int]], new_tokens: int) -> Run:
        import numpy as np

        og = self.og
        total = len(prompts[0]) + new_tokens
        start = time.perf_counter()
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total,
                                  batch_size=len(prompts))
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.asarray(prompts, dtype=np.int32))
        stamps = []
        while not generator.is_done():
            generator.generate_next_token()
            generator.get_next_tokens()  # the tokens reach the caller, as a stream would
            stamps.append(time.perf_counter())
        return Run(stamps[0] - start, stamps[-1] - stamps[0], len(prompts) * (len(stamps) - 1))


def make_runner(task: dict[str, Any]) -> Runner:
    """The runner of task["system"], loaded from the task's paths."""
    system, threads = task["system"], task["threads"]
    if system.startswith("ours:"):
        return OursRunner(task["model_dir"], system.split(":", 1)[1], threads)
    if system == "torch":
        return torch_runner(task["checkpoint"], threads)
    if system == "optimum":
        return optimum_runner(task["optimum_dir"], threads)
    if system.startswith("genai:"):
        return GenaiRunner(task["genai_dirs"][system])
    if system in ("ct2-float32", "ct2-int8"):
        return CT2Runner(task["ct2_dirs"][system], threads,
                         str(Path(task["checkpoint"]) / "vocab.json"))
    raise ValueError(f"unknown system {system!r}; choose ours:<precision>, genai:<precision> "
                     f"or one of {PEERS}")


def import_system(system: str) -> None:
    """Import the system's packages before the load timer starts (imports are not load)."""
    if system.startswith("ours:"):
        import gpt2_onnx.runtime.generator  # noqa: F401
    elif system == "torch":
        import torch  # noqa: F401
        import transformers  # noqa: F401
    elif system == "optimum":
        import optimum.onnxruntime  # noqa: F401
    elif system.startswith("ct2-"):
        import ctranslate2  # noqa: F401
    elif system.startswith("genai:"):
        import onnxruntime_genai  # noqa: F401


# --------------------------------------------------------------------------- phases


def run_phase(runner: Runner, phase: dict[str, Any]) -> dict[str, Any]:
    """One measurement: phase {"kind": decode|ttft|batch, "prompts", "new_tokens", "repeats",
    "warmup"}.

    With "warmup" (default), the same prompts run once with 2 new tokens first, so buffers sized
    by this shape (prefill activations, arenas) are allocated before the timed runs: steady state,
    as a server sees it. The median run (by decode tokens/s, or by ttft for "ttft") is reported,
    with all runs.
    """
    prompts, new = phase["prompts"], phase["new_tokens"]
    if phase.get("warmup", True):
        runner.run(prompts, WARMUP_TOKENS)
    runs = [runner.run(prompts, new) for _ in range(max(1, phase.get("repeats", 1)))]
    if phase["kind"] == "ttft":
        runs.sort(key=lambda r: r.ttft_s)
    else:
        runs.sort(key=lambda r: r.decoded / r.decode_s if r.decode_s > 0 else 0.0)
    mid = runs[len(runs) // 2]
    return {
        "kind": phase["kind"], "batch": len(prompts), "context": len(prompts[0]),
        "new_tokens": new, "ttft_ms": mid.ttft_s * 1e3, "decode_s": mid.decode_s,
        "decoded": mid.decoded,
        "tokens_per_s": mid.decoded / mid.decode_s if mid.decode_s > 0 else 0.0,
        "runs": [{"ttft_ms": r.ttft_s * 1e3, "decode_s": r.decode_s, "decoded": r.decoded}
                 for r in runs],
    }


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("VmHWM missing from /proc/self/status (Linux only)")


def work(task: dict[str, Any]) -> dict[str, Any]:
    """Import, load (timed), warm up, run every phase; the worker's JSON answer."""
    t0 = time.perf_counter()
    import_system(task["system"])
    t1 = time.perf_counter()
    runner = make_runner(task)
    load_s = time.perf_counter() - t1
    runner.run([WARMUP_PROMPT], WARMUP_TOKENS)
    phases = [run_phase(runner, phase) for phase in task["phases"]]
    return {"system": task["system"], "import_s": t1 - t0, "load_s": load_s,
            "peak_rss": peak_rss(), "phases": phases}


def gemv_bandwidth(mib: int, runs: int = 10) -> dict[str, Any]:
    """Memory bandwidth as a decode step sees it: y = A @ x over a float32 matrix far larger than
    the caches, on the threads numpy's BLAS was given (OMP/OPENBLAS_NUM_THREADS); bytes of A /
    best time."""
    import numpy as np

    n = int((mib * 2**20 / 4) ** 0.5)
    a = np.full((n, n), 0.5, dtype=np.float32)  # [n, n], written so every page is resident
    x = np.ones(n, dtype=np.float32)  # [n]
    a @ x  # warm-up: BLAS threads started
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        a @ x
        times.append(time.perf_counter() - t)
    return {"system": "gemv", "matrix_bytes": a.nbytes, "best_s": min(times),
            "bytes_per_s": a.nbytes / min(times), "times_s": times}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python bench/peers.py TASK.json\n")
        return 2
    task = json.loads(Path(argv[0]).read_text())
    answer = gemv_bandwidth(task["mib"]) if task["system"] == "gemv" else work(task)
    sys.stdout.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
