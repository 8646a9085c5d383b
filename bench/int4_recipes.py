"""4-bit recipes compared: what each costs in quality, size and speed (issue 17).

For one model (a seeded random-init preset, or a local checkpoint such as the yardstick from
bench/train_yardstick.py), every recipe's fused graph is built (export/fused.py, QuantRecipe) and
teacher-forced over the same held-out text as PyTorch fp32 (the standard library's held-out files,
as the yardstick scores them). Figures per recipe:

- mean and max KL(PyTorch fp32 || recipe) over the positions, nats; max |logit difference|;
- top-1 agreement with fp32 at every position, and at decisive positions only (fp32's top-2 gap
  >= the int4 entry's top1_margin in runtime/variants.py);
- perplexity of the text and its change against PyTorch fp32 (meaningful on a trained model);
- size of the graph and its data; decode tokens/s at batch 1 with an 8-token and a long context
  (median of --repeats runs of --steps steps, each after a warm-up step).

    python bench/int4_recipes.py --random-init gpt2-large --out bench/results/int4
    python bench/int4_recipes.py --checkpoint models/yardstick-ckpt --out bench/results/int4

Each run writes OUT/int4_recipes-<model>.json; `--table` merges every JSON in OUT into
OUT/int4_recipes.md. Needs the export extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_yardstick import corpus_files, heldout_tokens, split_files, stdlib_root  # noqa: E402

from gpt2_onnx.export.fused import RECIPES, QuantRecipe, build_fused_graph  # noqa: E402
from gpt2_onnx.runtime.device import CPU  # noqa: E402
from gpt2_onnx.runtime.scoring import log_softmax  # noqa: E402
from gpt2_onnx.runtime.session import create_session  # noqa: E402
from gpt2_onnx.runtime.shared_kv import SharedKVDecoder  # noqa: E402
from gpt2_onnx.runtime.variants import thresholds_for  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "int4"
# name -> recipe; the one equal to RECIPES["int4"] is what `--precision int4` exports.
PROJ = ("attn.c_proj", "mlp.c_proj")  # the projections that write into the residual stream
CANDIDATES: dict[str, QuantRecipe] = {
    "b32": QuantRecipe(bits=4),  # round to nearest, symmetric, block 32, int8 activations
    "b32-acc0": QuantRecipe(bits=4, accuracy_level=0),  # the same with fp32 activations
    "b16": QuantRecipe(bits=4, block_size=16),
    "b64": QuantRecipe(bits=4, block_size=64),
    "b128": QuantRecipe(bits=4, block_size=128),
    "b32-asym": QuantRecipe(bits=4, symmetric=False),  # a zero point per block
    "b32-hqq": QuantRecipe(bits=4, method="hqq"),  # HQQ-optimised scale and zero point
    "b32-mixed": QuantRecipe(bits=4, mixed=True),  # llama.cpp Q4_K_M's 8-bit layers
    "b32-proj8": QuantRecipe(bits=4, keep_8bit=PROJ),  # every output projection 8-bit
    "b32-asym-proj8": QuantRecipe(bits=4, symmetric=False, keep_8bit=PROJ),
    "b16-asym-mixed": QuantRecipe(bits=4, block_size=16, symmetric=False, mixed=True),
    "b16-asym-mixed-attn8": QuantRecipe(bits=4, block_size=16, symmetric=False, mixed=True,
                                        keep_8bit=("attn.c_proj",)),
    "int8": RECIPES["int8"],  # for reference
}


@dataclass
class RecipeResult:
    recipe: str
    settings: dict[str, Any]
    default: bool  # the recipe `--precision int4` (or int8) exports
    size_mb: float
    mean_kl: float
    max_kl: float
    max_abs: float
    top1: float
    top1_decisive: float | None
    decisive_share: float
    perplexity: float
    ppl_change: float
    decode_tok_s_short: float | None  # None: speed not measured (--speed-recipes)
    decode_tok_s_long: float | None
    build_s: float


def load_model(args: argparse.Namespace) -> tuple[Any, str]:
    if args.random_init:
        from gpt2_onnx.export.presets import build_random_model

        return build_random_model(args.random_init, args.seed), \
            f"random-{args.random_init}-seed{args.seed}"
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(args.checkpoint).eval(), Path(args.checkpoint).name


def eval_tokens(chunk: int, n_chunks: int) -> np.ndarray:
    """[n_chunks, chunk] int64: the yardstick's held-out text (the same files, same order)."""
    root = stdlib_root()
    _, held = split_files(corpus_files(root))
    tokens = heldout_tokens([f.relative_to(root).as_posix() for f in held], root)
    if len(tokens) < chunk * n_chunks:
        raise ValueError(f"need {chunk * n_chunks} held-out tokens, have {len(tokens)}")
    return tokens[:chunk * n_chunks].reshape(n_chunks, chunk).astype(np.int64)


def torch_logits(model: Any, chunks: np.ndarray) -> np.ndarray:
    """PyTorch fp32 logits [n_chunks, chunk, vocab] (float32)."""
    import torch

    out = []
    with torch.no_grad():
        for row in chunks:
            out.append(model(torch.from_numpy(row[None])).logits[0].float().numpy())
    return np.stack(out)


def onnx_logits(decoder: SharedKVDecoder, chunks: np.ndarray) -> np.ndarray:
    """The recipe's logits of every position, one prefill per chunk."""
    out = []
    for row in chunks:
        ids = row[None]  # [1, chunk]
        cache = decoder.start(1, ids.shape[1])
        logits, _ = decoder.forward(cache, ids, np.ones_like(ids), np.arange(ids.shape[1])[None],
                                    all_logits=True)
        out.append(logits[0])
    return np.stack(out)


def decode_rate(decoder: SharedKVDecoder, context: int, steps: int, repeats: int) -> float:
    """Median decode tokens/s at batch 1 after a `context`-token prompt (greedy)."""
    rates = []
    rng = np.random.default_rng(0)
    for _ in range(repeats):
        ids = rng.integers(0, 50000, size=(1, context), dtype=np.int64)
        cache = decoder.start(1, context + steps + 1)
        logits, cache = decoder.forward(cache, ids, np.ones_like(ids), np.arange(context)[None])
        t0 = None
        for i in range(steps + 1):  # the first step is a warm-up
            if i == 1:
                t0 = time.perf_counter()
            nxt = np.array([[int(logits[0].argmax())]], dtype=np.int64)
            mask = np.ones((1, context + i + 1), dtype=np.int64)
            logits, cache = decoder.forward(cache, nxt, mask, np.array([[context + i]]))
        rates.append(steps / (time.perf_counter() - t0))
    return float(np.median(rates))


def compare(ref: np.ndarray, got: np.ndarray, chunks: np.ndarray, margin: float) -> dict:
    """Quality figures of `got` against `ref` (both [n, chunk, vocab]) on the text `chunks`."""
    ref2, got2 = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
    lp, lq = log_softmax(ref2.astype(np.float64)), log_softmax(got2.astype(np.float64))
    kl = np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0)  # [positions]
    top2 = np.sort(ref2, axis=-1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) >= margin
    agree = ref2.argmax(-1) == got2.argmax(-1)
    # perplexity of the text: position t predicts token t+1 within each chunk
    targets = chunks[:, 1:].reshape(-1)
    rows = np.arange(chunks.shape[1] - 1)
    pick = (np.arange(chunks.shape[0])[:, None] * chunks.shape[1] + rows[None]).reshape(-1)
    ppl_ref = float(np.exp(-lp[pick, targets].mean()))
    ppl = float(np.exp(-lq[pick, targets].mean()))
    return dict(mean_kl=float(kl.mean()), max_kl=float(kl.max()),
                max_abs=float(np.abs(ref2 - got2).max()), top1=float(agree.mean()),
                top1_decisive=float(agree[decisive].mean()) if decisive.any() else None,
                decisive_share=float(decisive.mean()), perplexity=ppl,
                ppl_change=ppl / ppl_ref - 1, ppl_ref=ppl_ref)


def run(args: argparse.Namespace) -> dict:
    from gpt2_onnx.export.pipeline import model_dims

    model, label = load_model(args)
    dims = model_dims(model.config)
    chunk = min(args.chunk, dims.n_positions)
    chunks = eval_tokens(chunk, args.chunks)
    print(f"[int4_recipes] {label}: PyTorch fp32 over {chunks.size} tokens", file=sys.stderr)
    ref = torch_logits(model, chunks)
    margin = thresholds_for("int4")["top1_margin"]
    long_ctx = min(900, dims.n_positions - args.steps - 2)
    results, ppl_ref = [], None
    names = args.recipes.split(",") if args.recipes else list(CANDIDATES)
    for name in names:
        recipe = CANDIDATES[name]
        precision = "int8" if recipe.bits == 8 else "int4"
        print(f"[int4_recipes] {label}: {name}", file=sys.stderr, flush=True)
        work = Path(tempfile.mkdtemp(prefix="int4-recipe-"))
        try:
            t0 = time.perf_counter()
            variant = build_fused_graph(model, work, precision, recipe=recipe)
            build_s = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in work.iterdir())
            session = create_session(work / variant.graph, CPU, args.threads)
            decoder = SharedKVDecoder(session, dims, variant)
            figures = compare(ref, onnx_logits(decoder, chunks), chunks, margin)
            ppl_ref = figures.pop("ppl_ref")
            short = long = None
            if args.speed_recipes is None or name in args.speed_recipes.split(","):
                short = decode_rate(decoder, 8, args.steps, args.repeats)
                long = decode_rate(decoder, long_ctx, args.steps, args.repeats)
            del decoder, session
        finally:
            shutil.rmtree(work, ignore_errors=True)
        results.append(RecipeResult(
            recipe=name, settings=asdict(recipe), default=recipe == RECIPES[precision],
            size_mb=size / 1e6, decode_tok_s_short=short, decode_tok_s_long=long,
            build_s=build_s, **figures))
        print(json.dumps(asdict(results[-1])), file=sys.stderr, flush=True)
    return {
        "model": label, "dims": asdict(dims), "eval_tokens": int(chunks.size),
        "chunk_tokens": chunk, "top1_margin": margin, "long_context": long_ctx,
        "decode_steps": args.steps, "repeats": args.repeats, "threads": args.threads,
        "pytorch_fp32_perplexity": ppl_ref, "command": " ".join(sys.argv),
        "machine": platform.processor() or platform.machine(),
        "recipes": [asdict(r) for r in results],
    }


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(out: Path) -> str:
    """Markdown of every result file in `out`."""
    lines = []
    for path in sorted(out.glob("int4_recipes-*.json")):
        doc = json.loads(path.read_text())
        lines += [f"### {doc['model']} ({doc['eval_tokens']} held-out tokens; PyTorch fp32 "
                  f"perplexity {doc['pytorch_fp32_perplexity']:.2f}; decisive: top-2 gap >= "
                  f"{doc['top1_margin']} nats)", "",
                  f"`{doc['command']}`", "",
                  "| recipe | size MB | mean KL | max KL | max abs logit | top-1 | top-1 decisive "
                  "(share) | perplexity change | tok/s @8 | tok/s @"
                  f"{doc['long_context']} |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in doc["recipes"]:
            dec = "-" if r["top1_decisive"] is None else f"{r['top1_decisive']:.4f}"
            name = f"**{r['recipe']}** (default)" if r["default"] else r["recipe"]
            lines.append(
                f"| {name} | {r['size_mb']:.1f} | {r['mean_kl']:.2e} | {r['max_kl']:.2e} | "
                f"{r['max_abs']:.3f} | {r['top1']:.4f} | {dec} ({r['decisive_share']:.0%}) | "
                f"{r['ppl_change']:+.3%} | {_rate(r['decode_tok_s_short'])} | "
                f"{_rate(r['decode_tok_s_long'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--random-init", help="a preset (gpt2-large, tiny, ...)")
    src.add_argument("--checkpoint", type=Path, help="a local transformers checkpoint folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", default="", help=f"comma-separated, of: {', '.join(CANDIDATES)}")
    ap.add_argument("--chunk", type=int, default=256, help="tokens per teacher-forced chunk")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per speed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed-recipes", default=None,
                    help="time decode only for these (comma-separated) [every recipe]")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--table", action="store_true", help="only rewrite OUT/int4_recipes.md")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        if not (args.random_init or args.checkpoint):
            ap.error("give --random-init PRESET or --checkpoint DIR")
        doc = run(args)
        (args.out / f"int4_recipes-{doc['model']}.json").write_text(json.dumps(doc, indent=2))
    (args.out / "int4_recipes.md").write_text(table(args.out))
    print(table(args.out))


if __name__ == "__main__":
    main()
