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
  llama-<type>      llama.cpp (bench/llama_setup.py builds it) through its ctypes bindings, one
                    GGUF file per weight type: llama-f32, llama-q8_0, llama-q4_0, llama-q4_k_m

Bandwidth probes (run_bench.py's ceiling; one per subprocess, each on the task's threads):
  gemv              numpy's float32 gemv (its BLAS)
  ort-gemv          onnxruntime's own float32 MatMul gemv: a one-node graph, weight as initializer
  stream            a plain streaming read: `threads` Python threads each reduce their share
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

PEERS = ("torch", "optimum", "ct2-float32", "ct2-int8")
LLAMA_SYSTEMS = ("llama-f32", "llama-q8_0", "llama-q4_0", "llama-q4_k_m")
PROBES = ("gemv", "ort-gemv", "stream")
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


def import_llama_cpp(python_dir: str, lib_dir: str) -> Any:
    """llama-cpp-python's bindings from the unpacked sdist, loading libllama.so from the
    benchmark's own build (bench/llama_setup.py): no second compile, no pip install."""
    import os

    os.environ["LLAMA_CPP_LIB_PATH"] = lib_dir  # read once, when the bindings are imported
    if python_dir not in sys.path:
        sys.path.insert(0, python_dir)
    import llama_cpp

    return llama_cpp


class LlamaRunner:
    """llama.cpp through its C API (llama-cpp-python's ctypes bindings): every row one sequence
    of a unified KV cache, prompts decoded in one llama_decode (logits at each row's last token
    only), then one token per row per llama_decode, greedy = argmax of each row's logits."""

    def __init__(self, gguf: str, threads: int, llama: dict[str, str], max_rows: int) -> None:
        import numpy as np

        self.np = np
        lib = self.lib = import_llama_cpp(llama["python_dir"], llama["lib_dir"])
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(gguf.encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = 0  # 0: the model's own context (n_positions)
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.n_seq_max = max_rows
        cparams.kv_unified = True  # one cache of n_ctx cells, any row may use all of it
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {gguf}")
        self.n_ctx = lib.llama_n_ctx(self.ctx)
        self.n_batch = lib.llama_n_batch(self.ctx)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self.system_info = lib.llama_print_system_info().decode(errors="replace")
        self.last_tokens: list[list[int]] = []

    def _decode(self, rows: list[list[int]], start: int) -> list[int]:
        """Append rows[i] to sequence i at positions start.. (every row the same length); each
        row's next token (argmax). Split into calls of at most n_batch tokens, rows kept whole
        where they fit."""
        lib, b, n = self.lib, self.batch, len(rows[0])
        nexts: list[int] = []
        per_call = max(1, self.n_batch // n)  # rows per call
        for first in range(0, len(rows), per_call):
            group = rows[first:first + per_call]
            for lo in range(0, n, self.n_batch):  # a row longer than n_batch: in pieces
                hi = min(n, lo + self.n_batch)
                k = 0
                for r, row in enumerate(group):
                    for j in range(lo, hi):
                        b.token[k] = row[j]
                        b.pos[k] = start + j
                        b.n_seq_id[k] = 1
                        b.seq_id[k][0] = first + r
                        b.logits[k] = j == n - 1
                        k += 1
                b.n_tokens = k
                rc = lib.llama_decode(self.ctx, b)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc}")
            width = hi - lo  # tokens per row in the last call
            for r in range(len(group)):
                ptr = lib.llama_get_logits_ith(self.ctx, r * width + width - 1)
                logits = self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))  # [vocab]
                nexts.append(int(logits.argmax()))
        return nexts

    def run(self, prompts: list[list[int]], new_tokens: int) -> Run:
        length = len(prompts[0])
        if length + new_tokens > self.n_ctx:
            raise ValueError(f"context {length} + {new_tokens} new tokens > n_ctx {self.n_ctx}")
        start = time.perf_counter()
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        tokens = self._decode(prompts, 0)
        stamps = [time.perf_counter()]
        self.last_tokens = [tokens]  # step -> each row's token (for tests)
        for step in range(1, new_tokens):
            tokens = self._decode([[t] for t in tokens], length + step - 1)
            stamps.append(time.perf_counter())
            self.last_tokens.append(tokens)
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
    if system in LLAMA_SYSTEMS:
        rows = max(len(p["prompts"]) for p in task["phases"]) if task["phases"] else 1
        return LlamaRunner(task["llama"]["ggufs"][system], threads, task["llama"], rows)
    raise ValueError(f"unknown system {system!r}; choose ours:<precision>, genai:<precision> "
                     f"or one of {PEERS + LLAMA_SYSTEMS}")


def import_system(system: str, task_llama: dict[str, str] | None = None) -> None:
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
    elif system in LLAMA_SYSTEMS:
        import_llama_cpp(task_llama["python_dir"], task_llama["lib_dir"])


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
    import_system(task["system"], task.get("llama"))
    t1 = time.perf_counter()
    runner = make_runner(task)
    load_s = time.perf_counter() - t1
    runner.run([WARMUP_PROMPT], WARMUP_TOKENS)
    phases = [run_phase(runner, phase) for phase in task["phases"]]
    answer = {"system": task["system"], "import_s": t1 - t0, "load_s": load_s,
              "peak_rss": peak_rss(), "phases": phases}
    if isinstance(runner, LlamaRunner):
        answer["system_info"] = runner.system_info  # the CPU features llama.cpp was built with
    return answer


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


def _best_of(fn: Callable[[], Any], nbytes: int, runs: int) -> dict[str, Any]:
    fn()  # warm-up: threads started, pages resident
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"matrix_bytes": nbytes, "best_s": min(times), "bytes_per_s": nbytes / min(times),
            "times_s": times}


def ort_gemv_bandwidth(mib: int, threads: int, tmp_dir: str, runs: int = 10) -> dict[str, Any]:
    """Memory bandwidth as onnxruntime's own float32 MatMul reads it: y = x @ W, a one-node
    graph whose weight W ([n, n], `mib` MiB) is an initializer in an external data file, as in
    our graphs (so onnxruntime prepacks it); on `threads` intra-op threads."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n = int((mib * 2**20 / 4) ** 0.5)
    folder = Path(tempfile.mkdtemp(prefix="ort-gemv-", dir=tmp_dir))
    try:
        np.full((n, n), 0.5, dtype=np.float32).tofile(folder / "w.bin")  # [n, n]
        init = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[n, n])
        init.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(4 * n * n))):
            init.external_data.add(key=key, value=value)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "W"], ["y"])], "gemv",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], initializer=[init])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.save(model, str(folder / "gemv.onnx"))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(folder / "gemv.onnx"), opts,
                                       providers=["CPUExecutionProvider"])
        x = np.ones((1, n), dtype=np.float32)  # [1, n]
        out = _best_of(lambda: session.run(None, {"x": x}), 4 * n * n, runs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"system": "ort-gemv", **out}


def stream_bandwidth(mib: int, threads: int, runs: int = 10) -> dict[str, Any]:
    """A plain streaming read: `threads` Python threads each take the max of their share of a
    `mib` MiB float32 array (numpy drops the GIL inside the reduction; no arithmetic to speak
    of, so the read is the cost)."""
    import numpy as np

    a = np.full(mib * 2**20 // 4, 0.5, dtype=np.float32)  # written: every page resident
    parts = np.array_split(a, threads)

    def read() -> None:
        workers = [threading.Thread(target=np.max, args=(p,)) for p in parts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    return {"system": "stream", **_best_of(read, a.nbytes, runs)}


def probe(task: dict[str, Any]) -> dict[str, Any]:
    """One bandwidth probe (task["system"] in PROBES) on task["threads"] threads."""
    kind, mib, threads = task["system"], task["mib"], task.get("threads", 1)
    if kind == "gemv":
        return gemv_bandwidth(mib)
    if kind == "ort-gemv":
        return ort_gemv_bandwidth(mib, threads, task.get("tmp_dir") or tempfile.gettempdir())
    if kind == "stream":
        return stream_bandwidth(mib, threads)
    raise ValueError(f"unknown probe {kind!r}; choose one of {PROBES}")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python bench/peers.py TASK.json\n")
        return 2
    task = json.loads(Path(argv[0]).read_text())
    answer = probe(task) if task["system"] in PROBES else work(task)
    sys.stdout.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
