"""Decode speed and time to first token: the gpt2-onnx runtime vs transformers PyTorch `generate`.

    python bench/gpu_bench.py MODEL_DIR --out DIR [--device cuda] [--precisions fp32,fp16,...]
        [--batches 1,8] [--contexts 8,900] [--steps 64] [--no-torch] [--threads N]

For each precision of MODEL_DIR, batch and context: a seeded random prompt of `context` tokens
per row; time to first token = prefill forward + argmax; then `steps` greedy decode steps (forward
+ argmax of the [batch, vocab] logits brought to the host), the runtime's own decoder with
IOBinding (ConcatDecoder for fp32/fp16, SharedKVDecoder for fp16-fused), as TextGenerator drives
it (no EOS stop, so every run decodes exactly `steps` tokens). On CUDA TF32 stays off (the
runtime's default), so fp32 is PyTorch's fp32 arithmetic.
PyTorch: `generate(do_sample=False, min_new_tokens=max_new_tokens)` on the same device in fp32 and
fp16 (transformers' default attention), TTFT = generate of 1 token, decode = the rest.
Writes OUT/gpu-bench.json (rewritten after every measurement, so a run cut short still reports)
and OUT/gpu-bench.md (a markdown table and the issue's goals).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Row:
    engine: str  # "gpt2-onnx" or "torch"
    precision: str  # fp32 / fp16
    batch: int
    context: int  # prompt tokens per row
    steps: int  # decode steps timed after the first token
    ttft_ms: float  # prompt -> first token
    decode_tok_s: float  # per row: steps / decode seconds
    throughput_tok_s: float  # all rows: batch * steps / decode seconds


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def prompt_ids(batch: int, context: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Seeded random prompt ids [batch, context] (below the EOS id)."""
    return np.random.default_rng(seed).integers(0, vocab - 1, size=(batch, context),
                                                dtype=np.int64)


def time_runtime(gen: Any, batch: int, context: int, steps: int) -> tuple[float, float]:
    """(ttft seconds, decode seconds for `steps` steps) of the runtime's decoder."""
    dec = gen.decoder
    ids = prompt_ids(batch, context, gen.manifest.dims.vocab_size)  # [b, n]
    mask = np.ones_like(ids)  # [b, n]
    t0 = time.perf_counter()
    cache = dec.start(batch, context + steps + 1)
    logits, cache = dec.forward(cache, ids, mask, np.cumsum(mask, axis=1) - 1)
    nxt = logits.argmax(-1)[:, None]  # [b, 1]
    t1 = time.perf_counter()
    for s in range(steps):
        mask = np.ones((batch, context + s + 1), dtype=np.int64)  # [b, past + 1]
        pos = np.full((batch, 1), context + s, dtype=np.int64)  # [b, 1]
        logits, cache = dec.forward(cache, nxt.astype(np.int64), mask, pos)
        nxt = logits.argmax(-1)[:, None]
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def bench_runtime(model_dir: Path, device: str, precision: str, shapes: list[tuple[int, int]],
                  steps: int, threads: int | None, record: Any) -> None:
    from gpt2_onnx.runtime.generator import TextGenerator

    t = time.perf_counter()
    gen = TextGenerator.load(model_dir, device=device, precision=precision, threads=threads)
    record.note(f"gpt2-onnx {precision}: loaded on {gen.device} in "
                f"{time.perf_counter() - t:.1f} s")
    time_runtime(gen, 1, 8, 2)  # warm-up: kernels, allocator, cuBLAS handles
    for batch, context in shapes:
        time_runtime(gen, batch, context, 2)  # warm-up of this shape
        ttft, decode = time_runtime(gen, batch, context, steps)
        record.add(Row("gpt2-onnx", precision, batch, context, steps, ttft * 1e3,
                       steps / decode, batch * steps / decode))
    del gen


def torch_model(model_dir: Path) -> Any:
    """The transformers model of the directory: rebuilt bit-exactly for a random-init export,
    else a random model of the same config (speed does not depend on the weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2_onnx.runtime.manifest import read_manifest

    source = read_manifest(model_dir).source
    if source.get("kind") == "random-init":
        from gpt2_onnx.export.presets import build_random_model

        return build_random_model(source["preset"], int(source.get("seed", 0))).eval()
    return GPT2LMHeadModel(GPT2Config.from_pretrained(model_dir)).eval()


def torch_generate(model: Any, ids: Any, new: int, device: str) -> float:
    """Seconds for `generate` of exactly `new` greedy tokens after `ids` [batch, context]."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, use_cache=True,
                       pad_token_id=model.config.eos_token_id)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench_torch(model_dir: Path, device: str, precisions: list[str],
                shapes: list[tuple[int, int]], steps: int, record: Any) -> None:
    import torch

    model = torch_model(model_dir)
    # fp32 first: Module.to() converts in place, and fp16 -> fp32 would not give fp32 back.
    for precision in sorted(precisions, key=lambda p: p != "fp32"):
        dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(precision)
        if dtype is None or (dtype == torch.float16 and device == "cpu"):
            continue  # int8/int4 have no PyTorch counterpart here; fp16 on CPU is not a baseline
        model = model.to(device=device, dtype=dtype)
        record.note(f"torch {precision}: {torch.__version__}, attention "
                    f"{model.config._attn_implementation}")
        torch_generate(model, torch.zeros((1, 8), dtype=torch.long, device=device), 2, device)
        for batch, context in shapes:
            ids = torch.from_numpy(prompt_ids(batch, context, model.config.vocab_size)).to(device)
            torch_generate(model, ids, 2, device)  # warm-up of this shape
            ttft = torch_generate(model, ids, 1, device)
            decode = max(torch_generate(model, ids, steps + 1, device) - ttft, 1e-9)
            record.add(Row("torch", precision, batch, context, steps, ttft * 1e3,
                           steps / decode, batch * steps / decode))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


class Record:
    """Collects rows and notes; rewrites the JSON and markdown after each one."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out, self.meta = out, meta
        self.rows: list[Row] = []
        self.notes: list[str] = []
        out.mkdir(parents=True, exist_ok=True)

    def note(self, text: str) -> None:
        print(text, flush=True)
        self.notes.append(text)
        self.write()

    def add(self, row: Row) -> None:
        print(f"{row.engine:9s} {row.precision} b{row.batch} ctx{row.context}: ttft "
              f"{row.ttft_ms:.1f} ms, {row.decode_tok_s:.1f} tok/s/row, "
              f"{row.throughput_tok_s:.1f} tok/s", flush=True)
        self.rows.append(row)
        self.write()

    def find(self, engine: str, precision: str, batch: int, context: int) -> Row | None:
        return next((r for r in self.rows if (r.engine, r.precision, r.batch, r.context)
                     == (engine, precision, batch, context)), None)

    def goals(self) -> list[dict[str, Any]]:
        """The issue's goals for each half-precision variant measured (missing rows: None)."""
        out = []
        halves = [p for p in ("fp16", "fp16-fused")
                  if any(r.engine == "gpt2-onnx" and r.precision == p for r in self.rows)]
        batches = sorted({r.batch for r in self.rows if r.batch > 1})
        for precision in halves:
            for context in sorted({r.context for r in self.rows}):
                ours = self.find("gpt2-onnx", precision, 1, context)
                ref = self.find("torch", "fp16", 1, context)
                ratio = ours.decode_tok_s / ref.decode_tok_s if ours and ref else None
                out.append({"goal": f"decode b1 {precision} ctx{context} >= 2x torch fp16",
                            "figure": ratio, "passed": ratio is not None and ratio >= 2})
                big = self.find("gpt2-onnx", precision, batches[-1], context) if batches else None
                scale = big.throughput_tok_s / ours.throughput_tok_s if ours and big else None
                out.append({"goal": f"throughput b{batches[-1] if batches else '?'} >= 6x b1 "
                            f"({precision}, ctx{context})", "figure": scale,
                            "passed": scale is not None and scale >= 6})
        return out

    def write(self) -> None:
        doc = {**self.meta, "notes": self.notes, "rows": [asdict(r) for r in self.rows],
               "goals": self.goals()}
        (self.out / "gpu-bench.json").write_text(json.dumps(doc, indent=2) + "\n")
        (self.out / "gpu-bench.md").write_text(self.markdown())

    def markdown(self) -> str:
        lines = [f"Decode benchmark: {self.meta['model']} on {self.meta['device_name']} "
                 f"({self.meta['steps']} decode steps, greedy)", "",
                 "| engine | precision | batch | context | TTFT ms | tok/s per row | "
                 "tok/s all rows |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in self.rows:
            lines.append(f"| {r.engine} | {r.precision} | {r.batch} | {r.context} | "
                         f"{r.ttft_ms:.1f} | {r.decode_tok_s:.1f} | {r.throughput_tok_s:.1f} |")
        lines += ["", "| goal | figure | passed |", "| --- | ---: | --- |"]
        for g in self.goals():
            fig = "n/a" if g["figure"] is None else f"{g['figure']:.2f}x"
            lines.append(f"| {g['goal']} | {fig} | {'yes' if g['passed'] else 'no'} |")
        return "\n".join(lines) + "\n"


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda (?)"
    return f"{platform.processor() or platform.machine()} CPU"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--precisions", default="fp32,fp16,fp16-fused")
    ap.add_argument("--batches", type=ints, default=[1, 8])
    ap.add_argument("--contexts", type=ints, default=[8, 900])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from gpt2_onnx.runtime.manifest import read_manifest

    manifest = read_manifest(args.model_dir)
    precisions = [p for p in args.precisions.split(",") if p in manifest.variants]
    limit = manifest.dims.n_positions - args.steps - 1
    contexts = [c for c in args.contexts if c <= limit]
    if contexts != args.contexts:
        print(f"contexts above {limit} dropped (n_positions {manifest.dims.n_positions})")
    shapes = [(b, c) for c in contexts for b in args.batches]
    record = Record(args.out, {
        "model": manifest.name, "device": args.device, "device_name": device_name(args.device),
        "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
        "steps": args.steps, "precisions": precisions, "shapes": shapes})
    for precision in precisions:
        bench_runtime(args.model_dir, args.device, precision, shapes, args.steps, args.threads,
                      record)
    if not args.no_torch:
        bench_torch(args.model_dir, args.device, precisions, shapes, args.steps, record)
    print(record.markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
