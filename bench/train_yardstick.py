"""Train the quality yardstick: a small GPT-2 whose next-token distributions are peaked.

Random-init weights give nearly flat distributions, so quantization error measured on them says
little. This script trains a small GPT-2-architecture model (the real 50257-token GPT-2 tokenizer,
so the embedding is big and the width small) on text every Python installation carries: the
standard library's .py sources (site-packages and test directories left out), in sorted order,
every 20th file held out. Fixed seed, a fixed number of steps and a schedule that follows the
steps, fp32 (no bf16 autocast unless asked): the same command gives the same model on any machine
with the same Python standard library and torch, up to float rounding between thread counts.

It saves a transformers checkpoint that `gpt2-onnx export DIR` takes as a local directory, plus
`yardstick.json`: the command line and settings, size, steps, training time, the loss of every
step, held-out perplexity and the random-init model's.

    python bench/train_yardstick.py --out models/yardstick-ckpt          # the committed yardstick
    gpt2-onnx export models/yardstick-ckpt --out models/yardstick --precision fp32,int8,int4
    python bench/train_yardstick.py --out models/yardstick8-ckpt --layers 8   # a deeper one

Needs the export extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shlex
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

HELDOUT_EVERY = 20  # file i is held out when i % 20 == 19
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
VOCAB_SIZE = 50257
EOS_ID = 50256
YARDSTICK_JSON = "yardstick.json"


@dataclass(frozen=True)
class TrainConfig:
    """Shape and schedule of the yardstick (defaults: ~7 M parameters, 6.4 M in the embedding)."""

    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # width (the lm_head's 6 * width * 50257 FLOPs a token dominate the cost)
    n_positions: int = 256  # context; training windows use all of it
    batch: int = 8  # windows per step (batch * n_positions tokens)
    lr: float = 6e-3  # AdamW peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * this at the end of the budget
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    steps: int = 354  # optimizer steps; the cosine schedule spans them (~12 min on 2 cores)
    eval_tokens: int = 16384  # held-out tokens scored for the perplexities
    bf16: bool = False  # autocast to bfloat16 (faster where supported, but machine-dependent)
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    max_files: int | None = None  # use only the first N corpus files (quick test runs)


# ------------------------------------------------------------------------------------ the corpus


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files, sorted by relative path, third-party and tests left out."""
    root = root or stdlib_root()
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_files(files: list[Path], every: int = HELDOUT_EVERY) -> tuple[list[Path], list[Path]]:
    """(train, held-out): every `every`-th file (index every-1, 2*every-1, ...) is held out."""
    train = [f for i, f in enumerate(files) if i % every != every - 1]
    heldout = [f for i, f in enumerate(files) if i % every == every - 1]
    return train, heldout


def tokenize_files(files: list[Path], tokenizer: Any) -> np.ndarray:
    """One token stream: each file's tokens followed by <|endoftext|>. int32 [n_tokens]."""
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    parts: list[np.ndarray] = []
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=np.int32))
        parts.append(np.asarray([EOS_ID], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def tokens_sha256(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i4").tobytes()).hexdigest()


def eval_chunks(tokens: np.ndarray, length: int, max_tokens: int) -> np.ndarray:
    """Consecutive non-overlapping chunks [n, length] from the start of the stream."""
    n = min(len(tokens), max_tokens) // length
    if n == 0:
        raise ValueError(f"need at least {length} held-out tokens, have {len(tokens)}")
    return tokens[:n * length].reshape(n, length).astype(np.int64)


def heldout_tokens(files: list[str], root: Path | None = None) -> np.ndarray:
    """The held-out stream again from the relative file names recorded in yardstick.json."""
    from gpt2_onnx.export.tokenizer import build_gpt2_tokenizer

    root = root or stdlib_root()
    return tokenize_files([root / f for f in files], build_gpt2_tokenizer())


# ------------------------------------------------------------------------------------ the model


def build_model(cfg: TrainConfig) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB_SIZE, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
        n_positions=cfg.n_positions, n_ctx=cfg.n_positions, bos_token_id=EOS_ID,
        eos_token_id=EOS_ID, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(config)


def heldout_perplexity(model: Any, chunks: np.ndarray, batch: int = 8) -> float:
    """exp(mean loss) over the chunks, transformers' loss (labels = input ids), fp32."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(chunks), batch):
            x = torch.from_numpy(chunks[b:b + batch])  # [b, length]
            loss = model(input_ids=x, labels=x).loss
            n = x.shape[0] * (x.shape[1] - 1)  # the first token of each chunk is not predicted
            total += float(loss) * n
            count += n
    return math.exp(total / count)


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio as progress goes 0 -> 1."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    low = cfg.lr * cfg.min_lr_ratio
    return low + 0.5 * (cfg.lr - low) * (1 + math.cos(math.pi * min(progress, 1.0)))


def bf16_supported() -> bool:
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def train(cfg: TrainConfig, out: Path, log: Any = None, command: str = "") -> dict[str, Any]:
    """Train, evaluate, save the checkpoint and yardstick.json into `out`; return the record.

    `command` (the command line that ran this) is recorded beside the settings."""
    import torch

    from gpt2_onnx.export.tokenizer import build_gpt2_tokenizer, save_tokenizer_files

    def say(msg: str) -> None:
        if log is not None:
            log(msg)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.bf16 and not bf16_supported():
        raise ValueError("bf16 autocast asked for, but this CPU has no bfloat16 support")
    use_bf16 = cfg.bf16
    root = stdlib_root()
    files = corpus_files(root)[:cfg.max_files]
    train_files, held_files = split_files(files)
    t0 = time.perf_counter()
    tokenizer = build_gpt2_tokenizer()
    train_tokens = tokenize_files(train_files, tokenizer)
    held = tokenize_files(held_files, tokenizer)
    say(f"corpus: {len(train_files)} train files ({len(train_tokens)} tokens), "
        f"{len(held_files)} held out ({len(held)} tokens); tokenized in "
        f"{time.perf_counter() - t0:.1f} s")
    chunks = eval_chunks(held, cfg.n_positions, cfg.eval_tokens)

    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    t_eval = time.perf_counter()
    init_ppl = heldout_perplexity(model, chunks)
    say(f"model: {n_params / 1e6:.2f} M parameters; random-init held-out perplexity "
        f"{init_ppl:.0f} ({time.perf_counter() - t_eval:.1f} s)")

    rng = np.random.default_rng(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)
    span = cfg.n_positions
    model.train()
    losses: list[float] = []
    t_train = time.perf_counter()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step, step / cfg.steps)
        starts = rng.integers(0, len(train_tokens) - span, size=cfg.batch)
        x = torch.from_numpy(np.stack([train_tokens[s:s + span] for s in starts]).astype(
            np.int64))  # [batch, span]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % 10 == 0:
            say(f"step {step + 1}/{cfg.steps}: loss {np.mean(losses[-10:]):.3f} "
                f"({time.perf_counter() - t_train:.0f} s)")
    step = cfg.steps
    train_s = time.perf_counter() - t_train

    model.eval()
    t_eval = time.perf_counter()
    ppl = heldout_perplexity(model, chunks)
    say(f"trained {step} steps in {train_s:.0f} s; held-out perplexity {ppl:.2f} "
        f"(random init {init_ppl:.0f}; eval {time.perf_counter() - t_eval:.1f} s)")

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer_files(out, model.config.n_positions)
    weights = out / "model.safetensors"
    record = {
        "command": command or None,
        "config": asdict(cfg),
        "parameters": n_params,
        "checkpoint_bytes": weights.stat().st_size if weights.is_file() else None,
        "steps": step,
        "tokens_seen": step * cfg.batch * span,
        "train_seconds": round(train_s, 1),
        "bf16_autocast": use_bf16,
        "final_train_loss": float(np.mean(losses[-10:])) if losses else None,
        "losses": losses,  # per step, fp32 training loss: a rerun is checked against these
        "train_sha256": tokens_sha256(train_tokens),
        "heldout": {
            "perplexity": ppl,
            "random_init_perplexity": init_ppl,
            "eval_tokens": int(chunks.size),
            "chunk_tokens": span,
            "tokens": int(len(held)),
            "sha256": tokens_sha256(held),
            "files": [f.relative_to(root).as_posix() for f in held_files],
        },
        "train": {"files": len(train_files), "tokens": int(len(train_tokens))},
        "stdlib": str(root),
        "corpus_files": len(files),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    (out / YARDSTICK_JSON).write_text(json.dumps(record, indent=2) + "\n")
    return record


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Path]:
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=d.steps,
                   help="optimizer steps; the learning-rate schedule spans them [%(default)s]")
    p.add_argument("--layers", type=int, default=d.n_layer)
    p.add_argument("--heads", type=int, default=d.n_head)
    p.add_argument("--width", type=int, default=d.n_embd)
    p.add_argument("--positions", type=int, default=d.n_positions)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-files", type=int, default=None,
                   help="use only the first N corpus files (quick runs)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=d.bf16,
                   help="bfloat16 autocast: faster, but the result depends on the CPU [off]")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error("--steps must be >= 1")
    if a.width % a.heads:
        p.error(f"--width {a.width} must be a multiple of --heads {a.heads}")
    cfg = TrainConfig(n_layer=a.layers, n_head=a.heads, n_embd=a.width,
                      n_positions=a.positions, batch=a.batch, lr=a.lr, seed=a.seed,
                      steps=a.steps, eval_tokens=a.eval_tokens,
                      bf16=a.bf16, threads=a.threads,
                      max_files=a.max_files)
    return cfg, a.out


def main(argv: list[str] | None = None) -> None:
    cfg, out = parse_args(argv)
    args = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "bench/train_yardstick.py", *args])
    record = train(cfg, out, log=lambda m: print(m, file=sys.stderr, flush=True),
                   command=command)
    h = record["heldout"]
    print(json.dumps({"out": str(out), "parameters": record["parameters"],
                      "steps": record["steps"], "train_seconds": record["train_seconds"],
                      "heldout_perplexity": round(h["perplexity"], 2),
                      "random_init_perplexity": round(h["random_init_perplexity"], 1)}))


if __name__ == "__main__":
    main()
