"""Quality table: what each variant of the yardstick costs against PyTorch fp32.

For a model directory exported from the yardstick checkpoint (bench/train_yardstick.py), on its
held-out text (the standard-library files listed in the checkpoint's yardstick.json):

- perplexity of each variant and its change against PyTorch fp32 (transformers' loss on the same
  chunks: n_positions-token chunks, labels = input ids, so each chunk's first token is context);
- top-1 agreement with PyTorch fp32 at every held-out position (teacher-forced along the text);
- top-1 agreement along fp32's own greedy path: PyTorch greedy-decodes from prompts taken from
  the held-out text, each variant is teacher-forced along that path and its argmax compared with
  fp32's choice at every generated step (>= 256 steps in all);
- the first step where the variant's own free-running greedy output leaves fp32's;
- mean KL(fp32 || variant) over the held-out positions, in nats.

Writes quality.json and quality.md (a markdown table) into --out (default bench/results/).

    python bench/quality.py models/yardstick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_yardstick import (  # noqa: E402  (a script beside this one)
    YARDSTICK_JSON,
    eval_chunks,
    heldout_tokens,
    tokens_sha256,
)

from gpt2_onnx.runtime.generator import TextGenerator  # noqa: E402
from gpt2_onnx.runtime.manifest import read_manifest  # noqa: E402
from gpt2_onnx.runtime.sampling import log_softmax  # noqa: E402
from gpt2_onnx.runtime.scoring import batch_logits  # noqa: E402
from gpt2_onnx.runtime.variants import thresholds_for  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class VariantQuality:
    """Figures of one variant (or of the PyTorch reference itself)."""

    name: str  # "pytorch-fp32" or the manifest's precision
    size_mb: float | None  # graph + data files
    perplexity: float
    ppl_change: float  # perplexity / reference perplexity - 1
    top1_heldout: float  # fraction of held-out positions whose argmax equals fp32's
    top1_greedy: float  # fraction of fp32-greedy steps whose argmax equals fp32's choice
    top1_decisive: float  # the same, only where fp32's top-2 gap >= the precision's top1_margin
    decisive_share: float  # share of held-out positions that are decisive
    mean_kl: float  # nats, KL(fp32 || variant) averaged over held-out positions
    max_kl: float
    first_divergence: list[int] = field(default_factory=list)  # per prompt; -1 = never
    seconds: float = 0.0  # time to compute this variant's figures


@dataclass
class _Accumulator:
    margin: float = 0.0  # top-2 gap (nats) from which a position counts as decisive
    nll: float = 0.0
    agree: int = 0
    decisive: int = 0
    decisive_agree: int = 0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    count: int = 0

    def add(self, logp: np.ndarray, ref: np.ndarray, targets: np.ndarray) -> None:
        """logp, ref: float64 [n, vocab] log-distributions; targets int64 [n]."""
        rows = np.arange(len(targets))
        self.nll -= float(logp[rows, targets].sum())
        same = logp.argmax(-1) == ref.argmax(-1)  # [n]
        self.agree += int(same.sum())
        top2 = np.partition(ref, -2, axis=-1)[:, -2:]  # [n, 2]
        decisive = (top2[:, 1] - top2[:, 0]) >= self.margin  # [n]
        self.decisive += int(decisive.sum())
        self.decisive_agree += int((same & decisive).sum())
        kl = (np.exp(ref) * (ref - logp)).sum(-1)  # [n]
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))
        self.count += len(targets)


def load_reference(checkpoint: Path) -> Any:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(checkpoint), dtype="float32").eval()


def torch_logits(model: Any, seqs: np.ndarray) -> np.ndarray:
    """PyTorch fp32 logits float32 [b, s, vocab] of int64 [b, s] sequences."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(seqs)).logits.numpy()


def greedy_paths(model: Any, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    """fp32 greedy continuations (prompt + new tokens), int64 [b, prompt + new]."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompts), attention_mask=torch.ones_like(
            torch.from_numpy(prompts)), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=model.config.eos_token_id)
    return out.numpy()


def yardstick_record(yardstick: dict[str, Any]) -> dict[str, Any]:
    """What quality.json keeps of the checkpoint's yardstick.json: how it was made (the command,
    every setting, the corpus hash, the first losses, which tests/test_yardstick.py replays) and
    what it scored."""
    keep = ("command", "config", "parameters", "steps", "train_seconds", "tokens_seen",
            "checkpoint_bytes", "bf16_autocast", "final_train_loss", "train_sha256", "python",
            "torch")
    return {k: yardstick.get(k) for k in keep} | {
        "first_losses": (yardstick.get("losses") or [])[:10],
        "heldout_perplexity": yardstick["heldout"]["perplexity"],
        "eval_tokens": yardstick["heldout"]["eval_tokens"],
        "random_init_perplexity": yardstick["heldout"]["random_init_perplexity"],
    }


def measure(model_dir: Path, checkpoint: Path, precisions: list[str], *, tokens: int,
            prompts: int, prompt_tokens: int, device: str, threads: int | None,
            batch: int = 2, log: Any = print) -> dict[str, Any]:
    """Compute the quality table; returns the JSON-ready record."""
    manifest = read_manifest(model_dir)
    yardstick = json.loads((checkpoint / YARDSTICK_JSON).read_text())
    held = heldout_tokens(yardstick["heldout"]["files"])
    if tokens_sha256(held) != yardstick["heldout"]["sha256"]:
        raise ValueError(f"the held-out text differs from the one {checkpoint} was trained "
                         "beside (another Python's standard library?); retrain the yardstick")
    n_pos = manifest.dims.n_positions
    chunks = eval_chunks(held, n_pos, tokens)  # int64 [n_chunks, n_pos]
    ref_model = load_reference(checkpoint)
    # fp32's greedy paths from prompts spread over the held-out chunks
    starts = chunks[np.linspace(0, len(chunks) - 1, prompts).astype(int), :prompt_tokens]
    new = n_pos - prompt_tokens
    paths = greedy_paths(ref_model, starts, new)  # [prompts, n_pos]
    log(f"held-out: {chunks.size} tokens in {len(chunks)} chunks; greedy: {prompts} prompts x "
        f"{new} steps")

    runners: list[tuple[str, TextGenerator | None, Any]] = [
        ("pytorch-fp32", None, lambda seqs: torch_logits(ref_model, seqs))]
    for p in precisions:
        gen = TextGenerator.load(model_dir, device=device, precision=p, threads=threads)
        runners.append((p, gen, lambda seqs, g=gen: np.stack(batch_logits(g.decoder,
                                                                          list(seqs)))))
    accs = {name: _Accumulator(margin=0.0 if name == "pytorch-fp32" else
                               thresholds_for(name).get("top1_margin", 0.0))
            for name, _, _ in runners}
    seconds = dict.fromkeys(accs, 0.0)
    # Chunk-major: fp32's log-distributions are computed once per batch of chunks.
    for b in range(0, len(chunks), batch):
        seqs = chunks[b:b + batch]  # [b, n_pos]
        ref = log_softmax(torch_logits(ref_model, seqs)[:, :-1])  # [b, n_pos - 1, vocab]
        for name, gen, run in runners:
            t0 = time.perf_counter()
            got = ref if gen is None else log_softmax(run(seqs)[:, :-1])
            for r in range(len(seqs)):
                accs[name].add(got[r], ref[r], seqs[r, 1:])
            seconds[name] += time.perf_counter() - t0
    ref_nll = accs["pytorch-fp32"].nll / accs["pytorch-fp32"].count
    results: list[VariantQuality] = []
    for name, gen, run in runners:
        t0 = time.perf_counter()
        acc = accs[name]
        # teacher-forced along fp32's greedy path: steps prompt_tokens .. n_pos - 1
        path_logits = run(paths)[:, prompt_tokens - 1:-1]  # [prompts, new, vocab]
        agree = float((path_logits.argmax(-1) == paths[:, prompt_tokens:]).mean())
        divergence = [] if gen is None else first_divergences(gen, starts, paths, new)
        size = None
        if gen is not None:
            v = manifest.variants[name]
            size = sum(manifest.files[f].size for f in (v.graph, *v.data)) / 1e6
        q = VariantQuality(
            name=name, size_mb=size, perplexity=float(np.exp(acc.nll / acc.count)),
            ppl_change=float(np.exp(acc.nll / acc.count - ref_nll) - 1),
            top1_heldout=acc.agree / acc.count, top1_greedy=agree,
            top1_decisive=acc.decisive_agree / acc.decisive if acc.decisive else 1.0,
            decisive_share=acc.decisive / acc.count,
            mean_kl=acc.kl_sum / acc.count, max_kl=acc.kl_max, first_divergence=divergence,
            seconds=round(seconds[name] + time.perf_counter() - t0, 1))
        log(f"{name}: ppl {q.perplexity:.3f} ({q.ppl_change:+.4%}), top-1 {q.top1_heldout:.4f} "
            f"/ greedy {q.top1_greedy:.4f}, KL {q.mean_kl:.2e}, diverge {divergence} "
            f"({q.seconds} s)")
        results.append(q)
    return {
        "model_dir": str(model_dir),
        "checkpoint": str(checkpoint),
        "yardstick": yardstick_record(yardstick),
        "method": {
            "heldout_tokens": int(chunks.size), "chunk_tokens": n_pos,
            "scored_positions": int(len(chunks) * (n_pos - 1)),
            "greedy_prompts": prompts, "prompt_tokens": prompt_tokens, "greedy_steps": new,
            "greedy_steps_total": int(prompts * new), "device": device,
            "top1_greedy": "teacher-forced along PyTorch fp32's greedy path",
            "top1_heldout": "teacher-forced along the held-out text",
            "mean_kl": "KL(PyTorch fp32 || variant), nats, mean over held-out positions",
        },
        "variants": [asdict(q) for q in results],
    }


def first_divergences(gen: TextGenerator, prompts: np.ndarray, paths: np.ndarray,
                      new: int) -> list[int]:
    """Per prompt, the first generated step where the variant's own greedy output leaves fp32's
    (-1 when it never does)."""
    results = gen.generate_ids([list(map(int, p)) for p in prompts], max_new_tokens=new,
                               greedy=True)
    out = []
    for res, path in zip(results, paths, strict=True):
        want = path[prompts.shape[1]:]
        got = np.asarray(res.ids[:new])
        diff = np.nonzero(got != want[:len(got)])[0]
        out.append(int(diff[0]) if len(diff) else (-1 if len(got) == new else len(got)))
    return out


def markdown(record: dict[str, Any]) -> str:
    y, m = record["yardstick"], record["method"]
    c = y["config"]
    lines = [
        "# Quality of each variant on the yardstick",
        "",
        f"Yardstick: GPT-2 architecture, {c['n_layer']} layers, {c['n_head']} heads, width "
        f"{c['n_embd']}, {c['n_positions']} positions, vocab 50257 ({y['parameters'] / 1e6:.1f} M "
        f"parameters), trained {y['steps']} steps / {y['train_seconds'] / 60:.1f} min on the "
        f"standard library's sources by bench/train_yardstick.py; held-out perplexity "
        f"{y['heldout_perplexity']:.2f} on its first {y['eval_tokens']} held-out tokens "
        f"(random init {y['random_init_perplexity']:.0f}).",
        "",
        f"Made by: `{y.get('command') or 'not recorded'}` (Python {y.get('python')}, torch "
        f"{y.get('torch')}; every setting in quality.json).",
        "",
        f"Held-out: {m['heldout_tokens']} tokens in {m['chunk_tokens']}-token chunks "
        f"({m['scored_positions']} scored positions). Greedy: {m['greedy_prompts']} prompts x "
        f"{m['greedy_steps']} steps = {m['greedy_steps_total']} steps. Device: {m['device']}.",
        "",
        "| variant | size MB | perplexity | vs PyTorch fp32 | top-1 held-out | top-1 decisive "
        "(share) | top-1 greedy path | mean KL (nats) | max KL | first greedy divergence |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for v in record["variants"]:
        size = f"{v['size_mb']:.1f}" if v["size_mb"] is not None else "-"
        div = ", ".join("never" if d < 0 else str(d) for d in v["first_divergence"]) or "-"
        lines.append(
            f"| {v['name']} | {size} | {v['perplexity']:.3f} | {v['ppl_change']:+.3%} | "
            f"{v['top1_heldout']:.4f} | {v['top1_decisive']:.4f} ({v['decisive_share']:.0%}) | "
            f"{v['top1_greedy']:.4f} | {v['mean_kl']:.2e} | "
            f"{v['max_kl']:.2e} | {div} |")
    lines += [
        "",
        "top-1 held-out: argmax equal to PyTorch fp32's at each held-out position (teacher-forced "
        "along the text). top-1 decisive: the same, only at positions where fp32's top-2 gap is "
        "at least the precision's `top1_margin` (runtime/variants.py; flips inside the "
        "quantization noise are not counted), with the share of such positions. "
        "top-1 greedy path: teacher-forced along PyTorch fp32's greedy "
        "continuation, argmax equal to fp32's choice. First greedy divergence: the first step, "
        "per prompt, where the variant's own greedy output differs from fp32's. KL is "
        "KL(fp32 || variant).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path, help="exported from the yardstick checkpoint")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="the yardstick checkpoint [the manifest's local source]")
    p.add_argument("--precision", default=None,
                   help="comma-separated variants [all in the manifest]")
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens to score")
    p.add_argument("--prompts", type=int, default=4, help="greedy prompts")
    p.add_argument("--prompt-tokens", type=int, default=32, help="tokens per greedy prompt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS, help="where quality.json/.md go")
    a = p.parse_args(argv)
    manifest = read_manifest(a.model_dir)
    checkpoint = a.checkpoint
    if checkpoint is None:
        if manifest.source.get("kind") != "local":
            p.error(f"{a.model_dir} was not exported from a local checkpoint; pass --checkpoint")
        checkpoint = Path(manifest.source["path"])
    precisions = a.precision.split(",") if a.precision else list(manifest.variants)
    missing = [x for x in precisions if x not in manifest.variants]
    if missing:
        p.error(f"{a.model_dir} has no variant {missing}; it has {list(manifest.variants)}")
    if not 1 <= a.prompt_tokens < manifest.dims.n_positions:
        p.error(f"--prompt-tokens must be in [1, {manifest.dims.n_positions - 1}]")
    record = measure(a.model_dir, checkpoint, precisions, tokens=a.tokens, prompts=a.prompts,
                     prompt_tokens=a.prompt_tokens, device=a.device, threads=a.threads,
                     log=lambda msg: print(msg, file=sys.stderr, flush=True))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "quality.json").write_text(json.dumps(record, indent=2) + "\n")
    (a.out / "quality.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
