"""Verify a model directory: the runtime's own loop checked against transformers' PyTorch model.

Per variant (precision) and prompt it drives the code users run — `TextGenerator.load`, its
`decoder` and `generate_ids`, and `gpt2_onnx.runtime.sampling.sample_token` — and compares with
`GPT2LMHeadModel` rebuilt from the manifest's source record (or `reference`):

1. logits-prefill / logits-decode: logits at the prefill and at every decode step with the KV cache,
   teacher-forced along transformers' greedy tokens (max and mean absolute difference, mean KL);
2. greedy-tokens: `generate(greedy=True)` vs transformers `generate(do_sample=False)` — identical
   for exact variants, a top-1 agreement rate and first divergence for quantized / fp16 ones;
3. top-k-sampling (exact variants): the runtime's loop samples with a seed; `sample_token` fed
   PyTorch's logits along the same sequence with the same seed must pick the same tokens, and every
   token must lie in PyTorch's top-k;
4. cache-vs-recompute: the last cached step equals a forward over the whole sequence, no cache;
5. batch-vs-single: a left-padded greedy batch gives each row's tokens alone.

Each check yields one row per variant (the worst prompt named in `detail`). Memory: the reference
model plus one onnxruntime session at a time (variants are loaded one after another).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from gpt2_onnx.runtime import variants
from gpt2_onnx.runtime.manifest import Manifest, ModelDims, Variant, read_manifest

LOGITS_PREFILL = "logits-prefill"
LOGITS_DECODE = "logits-decode"
GREEDY = "greedy-tokens"
SAMPLING = "top-k-sampling"
CACHE = "cache-vs-recompute"
BATCH = "batch-vs-single"
CHECKS = (LOGITS_PREFILL, LOGITS_DECODE, GREEDY, SAMPLING, CACHE, BATCH)

# Thresholds per precision live in the variant registry (runtime/variants.py; measured on the
# yardstick); the export copies them into each variant's manifest entry, which overrides them
# key by key. An unknown precision is an error, never another variant's limits.

SAMPLING_TOP_K = 50  # transformers' default top_k
SAMPLING_SEED = 1234
LONG_PROMPT_TOKENS = 512
# Below this width the matmuls are too small to split across threads: more threads only spin
# (on a busy 2-core machine torch took 2.5 s instead of 0.1 s for tiny's 9 greedy steps).
SMALL_WIDTH = 512
DEFAULT_PROMPTS = ("Paris will", "London was")
EMOJI_CJK_PROMPT = "I ❤️ 東京 and 北京 🍜🍣 — こんにちは、世界! 你好 😀"
BATCH_PROMPTS = ("Hello", "The quick brown fox jumps over the lazy dog and then", "In 1776,")
_LONG_TEXT = (
    "The history of the city begins long before the first written records. Farmers settled on "
    "the banks of the river, traded grain and wool with their neighbours, and built a bridge "
    "that still stands today. Over the centuries the town grew into a market, then a port, and "
    "finally a capital whose museums, railways and universities drew people from every corner "
    "of the continent. "
)


# ------------------------------------------------------------------------------------ report


@dataclass(frozen=True)
class Check:
    """One row of the report: a check of one variant, its figure, threshold and verdict."""

    variant: str  # precision, e.g. "fp32"
    check: str  # one of CHECKS
    figure: str  # what was measured, human-readable
    threshold: str  # what it had to meet
    passed: bool
    detail: str = ""  # the worst prompt, the step, notes
    values: dict[str, float] = field(default_factory=dict)  # the figures as numbers


@dataclass
class VerifyReport:
    model_dir: str
    reference: str  # where the transformers model came from
    steps: int  # decode steps per prompt
    device: str
    prompts: list[dict[str, Any]]  # name and token count of each prompt
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. the long prompt was shortened
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def failed_checks(self) -> list[str]:
        """'variant/check' of every failed row, e.g. ['fp32/logits-decode']."""
        return [f"{c.variant}/{c.check}" for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["passed"] = self.passed
        doc["failed"] = self.failed_checks()
        return doc

    def summary(self) -> dict[str, Any]:
        """What the manifest keeps (`Manifest.verify`): verdicts and figures, no prompt texts."""
        return {
            "passed": self.passed, "steps": self.steps, "device": self.device,
            "reference": self.reference, "seconds": round(self.seconds, 1), "notes": self.notes,
            "checks": [{"variant": c.variant, "check": c.check, "figure": c.figure,
                        "threshold": c.threshold, "passed": c.passed, "values": c.values}
                       for c in self.checks],
        }


# ------------------------------------------------------------------------------------ prompts


@dataclass(frozen=True)
class Prompt:
    name: str
    ids: list[int]


def default_prompts(encode: Callable[[str], list[int]], n_positions: int, steps: int
                    ) -> tuple[list[Prompt], list[Prompt], list[str]]:
    """(single prompts, batch prompts, notes). The long prompt is LONG_PROMPT_TOKENS tokens,
    shortened when it would not leave room for `steps` + 1 new tokens in n_positions."""
    room = n_positions - steps - 1
    notes = []
    singles = [Prompt(text, encode(text)) for text in DEFAULT_PROMPTS]
    long_len = min(LONG_PROMPT_TOKENS, room)
    if long_len < LONG_PROMPT_TOKENS:
        notes.append(f"long prompt shortened to {long_len} tokens (n_positions {n_positions} "
                     f"minus {steps + 1} new tokens)")
    text_ids = encode(_LONG_TEXT)
    long_ids = (text_ids * (long_len // len(text_ids) + 1))[:long_len]
    singles.append(Prompt(f"long-{long_len}", long_ids))
    singles.append(Prompt("emoji-cjk", encode(EMOJI_CJK_PROMPT)))
    batch = [Prompt(text, encode(text)) for text in BATCH_PROMPTS]
    return singles, batch, notes


def file_prompts(path: Path, encode: Callable[[str], list[int]]) -> tuple[list[Prompt],
                                                                           list[Prompt]]:
    """One prompt per non-empty line; they are also the batch (with "Paris will" if alone)."""
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"--prompts {path}: no prompts (one per line)")
    return given_prompts(lines, encode)


def given_prompts(texts: Sequence[str], encode: Callable[[str], list[int]]
                  ) -> tuple[list[Prompt], list[Prompt]]:
    singles = [Prompt(t if len(t) <= 40 else t[:37] + "...", encode(t)) for t in texts]
    batch = singles if len(singles) > 1 else [*singles, Prompt(DEFAULT_PROMPTS[0],
                                                               encode(DEFAULT_PROMPTS[0]))]
    return singles, batch


def check_fit(prompts: Sequence[Prompt], n_positions: int, steps: int) -> None:
    """ValueError naming every prompt that leaves no room for `steps` + 1 new tokens."""
    room = n_positions - steps - 1
    bad = [f"{p.name!r} ({len(p.ids)} tokens)" for p in prompts if len(p.ids) > room]
    empty = [repr(p.name) for p in prompts if not p.ids]
    problems = []
    if bad:
        problems.append(f"prompts {', '.join(bad)} exceed {room} tokens (n_positions "
                        f"{n_positions} minus {steps + 1} new tokens): shorten them or use "
                        "fewer --steps")
    if empty:
        problems.append(f"prompts {', '.join(empty)} encode to no tokens")
    if problems:
        raise ValueError("; ".join(problems))


# ------------------------------------------------------------------------------------ reference


@dataclass
class RefRun:
    """What transformers gives for one prompt: computed once, shared by all variants."""

    prefill: np.ndarray  # float32 [prompt_len, vocab]: logits of every prompt position
    tokens: list[int]  # greedy tokens (steps + 1, fewer if EOS came first)
    step_logits: np.ndarray  # float32 [len(tokens), vocab]: logits each token was chosen from


def load_reference_model(manifest: Manifest, reference: Any) -> tuple[Any, str]:
    """The transformers model to compare with, and a line saying where it came from.

    reference: None (rebuild from the manifest's source), a hub id or directory, or an already
    loaded GPT2LMHeadModel (the export passes the model it just converted: no second copy).
    """
    from gpt2_onnx.export.source import load_reference, resolve_source

    if reference is not None and not isinstance(reference, (str, Path)):
        model = reference
        where = "the exported model itself, " + json.dumps(manifest.source, sort_keys=True)
    elif reference is None:
        model = load_reference(manifest.source)
        where = json.dumps(manifest.source, sort_keys=True)
    else:
        model = resolve_source(str(reference), None, 0).model
        where = reference
    _check_dims(model.config, manifest.dims, where)
    return model.eval(), where


def _check_dims(config: Any, dims: ModelDims, where: str) -> None:
    pairs = {"n_layer": dims.n_layer, "n_head": dims.n_head, "n_embd": dims.n_embd,
             "n_positions": dims.n_positions, "vocab_size": dims.vocab_size}
    bad = [f"{k} {getattr(config, k)} (model directory: {v})" for k, v in pairs.items()
           if getattr(config, k) != v]
    if bad:
        raise ValueError(f"reference {where}: not the model of this directory: {', '.join(bad)}. "
                         "Pass the checkpoint it was exported from with --reference.")


def torch_logits(model: Any, ids: Sequence[int]) -> np.ndarray:
    """float32 [len(ids), vocab]: one forward without cache."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


def reference_run(model: Any, prompt: Prompt, new_tokens: int, dims: ModelDims) -> RefRun:
    """transformers' greedy `generate` (with its KV cache) plus a full forward of the prompt."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, num_beams=1, use_cache=True,
        eos_token_id=dims.eos_token_id, pad_token_id=dims.eos_token_id,
        output_logits=True, return_dict_in_generate=True)
    ids = torch.tensor([prompt.ids], dtype=torch.long)  # [1, prompt_len]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=config)
    tokens = out.sequences[0, len(prompt.ids):].tolist()
    step_logits = torch.cat(list(out.logits), dim=0).float().numpy()  # [len(tokens), vocab]
    return RefRun(torch_logits(model, prompt.ids), tokens, step_logits)


# ------------------------------------------------------------------------------------ numerics


def abs_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max, mean) absolute difference of two equal-shape float32 arrays."""
    d = np.abs(a - b)  # float32, same shape; the difference of two fp32 logits is exact enough
    return float(d.max()), float(d.mean(dtype=np.float64))


def mean_kl(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean over rows of KL(softmax(ref) || softmax(got)); rows [..., vocab].

    float32 (a long prompt's prefill is ~50 M logits): absolute error ~1e-6, far below the
    thresholds it gates (>= 1e-3).
    """
    p_log = _log_softmax(ref)  # [..., vocab]
    diff = p_log - _log_softmax(got)  # [..., vocab]
    np.exp(p_log, out=p_log)  # now p
    kl = np.einsum("...v,...v->...", p_log, diff, dtype=np.float64)  # [...]
    return float(np.maximum(kl, 0.0).mean())


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)  # new float32 array
    e = np.exp(x)
    x -= np.log(e.sum(axis=-1, keepdims=True, dtype=np.float64)).astype(x.dtype)
    return x


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (a length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ------------------------------------------------------------------------------------ per variant


@dataclass
class _Gate:
    """How one variant is judged (the registry's thresholds merged with the manifest's)."""

    thresholds: dict[str, float]

    @property
    def exact(self) -> bool:
        return self.thresholds.get("top1_agreement_min", 0.0) >= 1.0

    @property
    def by_max_abs(self) -> bool:
        return "logits_max_abs" in self.thresholds

    def logits_ok(self, max_abs: float, kl: float) -> bool:
        if self.by_max_abs:
            return max_abs <= self.thresholds["logits_max_abs"]
        return kl <= self.thresholds["mean_kl_max"]

    def logits_threshold(self) -> str:
        if self.by_max_abs:
            return f"max abs <= {self.thresholds['logits_max_abs']:.0e}"
        return f"mean KL <= {self.thresholds['mean_kl_max']:.0e}"

    @property
    def tie_margin(self) -> float:
        """Top-2 logit gap below which a greedy choice may legitimately flip."""
        return self.thresholds.get("logits_max_abs", 0.0)


def thresholds_for(variant: Variant) -> dict[str, float]:
    """The registry's thresholds of the variant's precision, overridden by the manifest's."""
    base = variants.thresholds_for(variant.precision)  # ValueError when unknown
    return {**base, **{k: float(v) for k, v in variant.thresholds.items()}}


@dataclass
class _PromptResult:
    """The runtime's side of one prompt for one variant."""

    name: str
    prefill_abs: tuple[float, float]
    prefill_kl: float
    decode_abs: list[tuple[float, float]]  # per decode step
    decode_kl: list[float]
    top1: list[bool]  # teacher-forced argmax agreement, prefill last row + each decode step
    gaps: list[float]  # the reference's top-1 minus top-2 logit at the same steps
    cache_abs: tuple[float, float]
    cache_kl: float
    greedy_ids: list[int]


def teacher_forced(gen: Any, prompt: Prompt, ref: RefRun) -> _PromptResult:
    """Run the runtime's decoder along transformers' greedy tokens; compare every step's logits,
    then a forward over the whole sequence without cache against the last cached step."""
    dec = gen.decoder
    all_rows = dec.variant.io.logits_rows == "all"
    n = len(prompt.ids)
    m = len(ref.tokens)
    ids = np.array([prompt.ids], dtype=np.int64)  # [1, n]
    mask = np.ones((1, n), dtype=np.int64)  # [1, n]
    positions = np.arange(n, dtype=np.int64)[None, :]  # [1, n]
    cache = dec.start(1, n + m)
    logits, cache = dec.forward(cache, ids, mask, positions, all_logits=all_rows)
    if all_rows:
        got_prefill, want_prefill = logits[0], ref.prefill  # [n, vocab]
        last = logits[0, -1]  # [vocab]
    else:  # the graph returns the last row only
        got_prefill, want_prefill = logits[0], ref.prefill[-1]  # [vocab]
        last = logits[0]
    prefill_abs = abs_diff(got_prefill, want_prefill)
    prefill_kl = mean_kl(want_prefill, got_prefill)
    top1 = [int(np.argmax(last)) == int(np.argmax(ref.step_logits[0]))]
    gaps = [_top2_gap(row) for row in ref.step_logits]
    decode_abs, decode_kl = [], []
    for j in range(1, m):  # feed token j-1, get the logits token j was chosen from
        mask = np.ones((1, n + j), dtype=np.int64)  # [1, past + 1]
        step_ids = np.array([[ref.tokens[j - 1]]], dtype=np.int64)  # [1, 1]
        pos = np.array([[n + j - 1]], dtype=np.int64)  # [1, 1]
        last, cache = dec.forward(cache, step_ids, mask, pos)
        last = last[0]  # [vocab]
        want = ref.step_logits[j]  # [vocab]
        decode_abs.append(abs_diff(last, want))
        decode_kl.append(mean_kl(want, last))
        top1.append(int(np.argmax(last)) == int(np.argmax(want)))
    del cache
    # Cached vs recompute: the sequence the last cached step saw, in one forward.
    full = [*prompt.ids, *ref.tokens[:m - 1]]
    fresh = dec.start(1, len(full))
    recomputed, _ = dec.forward(fresh, np.array([full], dtype=np.int64),
                                np.ones((1, len(full)), dtype=np.int64),
                                np.arange(len(full), dtype=np.int64)[None, :])
    recomputed = recomputed[0]  # [vocab]
    cache_abs = abs_diff(last, recomputed)
    cache_kl = mean_kl(recomputed, last)
    greedy = gen.generate_ids([prompt.ids], max_new_tokens=m, greedy=True)[0].ids
    return _PromptResult(prompt.name, prefill_abs, prefill_kl, decode_abs, decode_kl, top1,
                         gaps[:len(top1)],
                         cache_abs, cache_kl, list(greedy))


def _fmt(x: float) -> str:
    return f"{x:.2e}"


def logits_checks(precision: str, gate: _Gate, results: list[_PromptResult]) -> list[Check]:
    pre = max(results, key=lambda r: r.prefill_abs[0])
    pre_max = pre.prefill_abs[0]
    pre_mean = float(np.mean([r.prefill_abs[1] for r in results]))
    pre_kl = float(np.mean([r.prefill_kl for r in results]))
    rows = [Check(
        precision, LOGITS_PREFILL,
        f"max {_fmt(pre_max)}, mean {_fmt(pre_mean)}, KL {_fmt(pre_kl)}",
        gate.logits_threshold(), gate.logits_ok(pre_max, pre_kl),
        f"worst prompt {pre.name!r}; {len(results)} prompts",
        {"max_abs": pre_max, "mean_abs": pre_mean, "mean_kl": pre_kl})]
    steps = [(r.name, j + 1, a, k) for r in results
             for j, (a, k) in enumerate(zip(r.decode_abs, r.decode_kl, strict=True))]
    if not steps:
        rows.append(Check(precision, LOGITS_DECODE, "no decode step (EOS at once)",
                          gate.logits_threshold(), True, "", {}))
        return rows
    worst = max(steps, key=lambda s: s[2][0])
    dec_max = worst[2][0]
    dec_mean = float(np.mean([s[2][1] for s in steps]))
    dec_kl = float(np.mean([s[3] for s in steps]))
    last_max = max(r.decode_abs[-1][0] for r in results if r.decode_abs)
    last_step = max(len(r.decode_abs) for r in results)
    rows.append(Check(
        precision, LOGITS_DECODE,
        f"max {_fmt(dec_max)}, mean {_fmt(dec_mean)}, KL {_fmt(dec_kl)}; "
        f"last step max {_fmt(last_max)}",
        gate.logits_threshold(), gate.logits_ok(dec_max, dec_kl),
        f"worst: prompt {worst[0]!r} decode step {worst[1]}; {len(steps)} steps over "
        f"{len(results)} prompts; last step = decode step {last_step}",
        {"max_abs": dec_max, "mean_abs": dec_mean, "mean_kl": dec_kl,
         "max_abs_last_step": last_max, "decode_steps": float(len(steps))}))
    return rows


def greedy_check(precision: str, gate: _Gate, results: list[_PromptResult],
                 refs: list[RefRun]) -> Check:
    agree = [a for r in results for a in r.top1]
    rate = float(np.mean(agree))
    divergences = []
    for r, ref in zip(results, refs, strict=True):
        at = first_divergence(r.greedy_ids, ref.tokens)
        if at is not None:
            divergences.append((r.name, at, _near_tie(ref, at, r.greedy_ids, gate.tie_margin)))
    first = min(divergences, key=lambda d: d[1]) if divergences else None
    where = f"first divergence: {first[0]!r} step {first[1]}" if first else "no divergence"
    values = {"top1_agreement": rate, "first_divergence": float(first[1]) if first else -1.0}
    total = sum(len(ref.tokens) for ref in refs)
    if gate.exact:
        real = [d for d in divergences if not d[2]]
        ties = [d for d in divergences if d[2]]
        detail = (f"{len(results)} prompts, {total} tokens"
                  + (f"; near-ties (top-2 gap < {gate.tie_margin:.0e}) at "
                     + ", ".join(f"{d[0]!r} step {d[1]}" for d in ties) if ties else ""))
        figure = "identical" if not divergences else where
        return Check(precision, GREEDY, figure, "identical to transformers", not real, detail,
                     values)
    # A flip where the reference's own top-2 gap is inside the variant's quantization noise is
    # not a disagreement: on flat distributions (random weights) most steps are such near-ties.
    need = gate.thresholds["top1_agreement_min"]
    margin = gate.thresholds.get("top1_margin", 0.0)
    decisive = [a for r in results for a, g in zip(r.top1, r.gaps, strict=True) if g >= margin]
    decisive_rate = float(np.mean(decisive)) if decisive else 1.0
    values.update(decisive_agreement=decisive_rate, decisive_steps=float(len(decisive)))
    return Check(precision, GREEDY,
                 f"top-1 agreement {rate:.1%} (all), {decisive_rate:.1%} on {len(decisive)} "
                 f"decisive steps; {where}",
                 f"decisive agreement >= {need:.0%} (top-2 gap >= {margin:g})",
                 decisive_rate >= need,
                 f"{len(agree)} teacher-forced steps over {len(results)} prompts", values)


def _top2_gap(row: np.ndarray) -> float:
    """Top-1 minus top-2 logit of one row [vocab]."""
    top2 = np.partition(row, -2)[-2:]
    return float(top2[1] - top2[0])


def _near_tie(ref: RefRun, at: int, got: Sequence[int], margin: float) -> bool:
    """True when transformers' own logits at step `at` rank the two choices within `margin`."""
    if at >= len(ref.tokens) or at >= len(got) or margin <= 0:
        return False
    row = ref.step_logits[at]
    return abs(float(row[ref.tokens[at]]) - float(row[got[at]])) < margin


def cache_check(precision: str, gate: _Gate, results: list[_PromptResult]) -> Check:
    worst = max(results, key=lambda r: r.cache_abs[0])
    kl = float(np.mean([r.cache_kl for r in results]))
    ok = gate.logits_ok(worst.cache_abs[0], kl)
    return Check(precision, CACHE, f"max {_fmt(worst.cache_abs[0])}, KL {_fmt(kl)}",
                 gate.logits_threshold(), ok,
                 f"last cached step vs one forward without cache; worst prompt {worst.name!r}",
                 {"max_abs": worst.cache_abs[0], "mean_kl": kl})


def sampling_check(precision: str, gen: Any, model: Any, prompts: Sequence[Prompt],
                   new_tokens: int, tolerance: float) -> Check:
    """The runtime's loop samples (top-k, seed); `sample_token` fed PyTorch's logits along the same
    sequence with the same seed must give the same tokens, each inside PyTorch's top-k."""
    from gpt2_onnx.runtime import sampling

    settings = sampling.SamplingSettings(top_k=SAMPLING_TOP_K)
    compared = mismatched = outside = 0
    first_bad = ""
    for prompt in prompts:
        got = gen.generate_ids([prompt.ids], max_new_tokens=new_tokens, top_k=SAMPLING_TOP_K,
                               seed=SAMPLING_SEED)[0].ids
        rows = torch_logits(model, [*prompt.ids, *got[:-1]])[len(prompt.ids) - 1:]  # [len, vocab]
        rng = np.random.default_rng(SAMPLING_SEED)
        seen = list(prompt.ids)
        for t, token in enumerate(got):
            want = sampling.sample_token(rows[t], settings, rng, np.asarray(seen, dtype=np.int64))
            kth = np.partition(rows[t], -SAMPLING_TOP_K)[-SAMPLING_TOP_K]
            in_top_k = float(rows[t][token]) >= float(kth) - tolerance
            compared += 1
            mismatched += want != token
            outside += not in_top_k
            if (want != token or not in_top_k) and not first_bad:
                first_bad = (f"first bad: {prompt.name!r} step {t}: runtime {token}, "
                             f"PyTorch logits give {want}"
                             + ("" if in_top_k else f"; {token} is outside PyTorch's top-"
                                f"{SAMPLING_TOP_K}"))
            seen.append(token)  # the sequence is the runtime's
    ok = mismatched == 0 and outside == 0
    figure = f"{compared - mismatched}/{compared} equal, {outside} outside top-{SAMPLING_TOP_K}"
    return Check(precision, SAMPLING, figure, f"all equal, all in top-{SAMPLING_TOP_K}", ok,
                 first_bad or f"seed {SAMPLING_SEED}, {len(prompts)} prompts",
                 {"compared": float(compared), "mismatched": float(mismatched),
                  "outside_top_k": float(outside)})


def batch_check(precision: str, gate: _Gate, gen: Any, batch: Sequence[Prompt],
                new_tokens: int) -> Check:
    """Greedy, one left-padded batch vs each prompt alone (the runtime on both sides)."""
    together = gen.generate_ids([p.ids for p in batch], max_new_tokens=new_tokens, greedy=True)
    agree = total = 0
    first = None
    for i, (p, row) in enumerate(zip(batch, together, strict=True)):
        alone = gen.generate_ids([p.ids], max_new_tokens=new_tokens, greedy=True)[0].ids
        at = first_divergence(row.ids, alone)
        n = max(len(row.ids), len(alone))
        total += n
        agree += sum(a == b for a, b in zip(row.ids, alone, strict=False))
        if at is not None and first is None:
            first = f"row {i} ({p.name!r}) diverges at step {at}"
    rate = agree / max(total, 1)
    lengths = ", ".join(str(len(p.ids)) for p in batch)
    detail = f"batch of {len(batch)} (prompt lengths {lengths}), {new_tokens} tokens"
    if gate.exact:
        return Check(precision, BATCH, first or "identical", "identical", first is None,
                     detail, {"agreement": rate})
    need = gate.thresholds["top1_agreement_min"]
    return Check(precision, BATCH, f"agreement {rate:.1%}" + (f"; {first}" if first else ""),
                 f"agreement >= {need:.0%}", rate >= need, detail, {"agreement": rate})


# ------------------------------------------------------------------------------------ entry points


def run_verify(
    model_dir: str | Path,
    *,
    reference: Any = None,
    prompts: Path | Sequence[str] | None = None,
    steps: int = 32,
    precisions: Sequence[str] | None = None,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Check every variant (or `precisions`) of `model_dir` against transformers.

    reference: hub id, checkpoint directory or a loaded GPT2LMHeadModel; default the
      manifest's source record.
    prompts: a file (one prompt a line) or a list of prompts; default DEFAULT_PROMPTS, a long
      prompt, an emoji/CJK prompt and a batch of different lengths.
    steps: decode steps per prompt (steps + 1 new tokens: the first comes from the prefill).
    """
    from gpt2_onnx.runtime.generator import load_tokenizer

    start = time.perf_counter()
    say = progress or (lambda _msg: None)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    root = Path(model_dir)
    manifest = read_manifest(root)
    chosen = _chosen_precisions(manifest, precisions)
    dims = manifest.dims
    tokenizer = load_tokenizer(root / manifest.tokenizer, dims.vocab_size)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    notes: list[str] = []
    if prompts is None:
        singles, batch, notes = default_prompts(encode, dims.n_positions, steps)
    elif isinstance(prompts, (str, Path)):
        singles, batch = file_prompts(Path(prompts), encode)
    else:
        singles, batch = given_prompts(list(prompts), encode)
    check_fit([*singles, *batch], dims.n_positions, steps)

    threads = 1 if dims.n_embd < SMALL_WIDTH else None  # None: the runtime's default
    with _torch_threads(threads):
        report = _verify_variants(root, manifest, chosen, reference, singles, batch, steps,
                                  device, threads, say)
    report.notes = notes + report.notes
    report.seconds = time.perf_counter() - start
    return report


def _verify_variants(root: Path, manifest: Manifest, chosen: list[str], reference: Any,
                     singles: list[Prompt], batch: list[Prompt], steps: int, device: str,
                     threads: int | None, say: Callable[[str], None]) -> VerifyReport:
    from gpt2_onnx.runtime.generator import TextGenerator

    new_tokens = steps + 1
    say("loading the transformers reference")
    model, where = load_reference_model(manifest, reference)
    _quiet_transformers()
    refs: list[RefRun] = []  # one per single prompt, same order
    for p in singles:
        say(f"transformers: {p.name!r} ({len(p.ids)} tokens, {new_tokens} new)")
        refs.append(reference_run(model, p, new_tokens, manifest.dims))

    report = VerifyReport(
        model_dir=str(root), reference=where, steps=steps, device=device,
        prompts=[{"name": p.name, "tokens": len(p.ids), "batch": False} for p in singles]
        + [{"name": p.name, "tokens": len(p.ids), "batch": True} for p in batch])
    for precision in chosen:
        say(f"{precision}: loading the ONNX session")
        gen = TextGenerator.load(root, device=device, precision=precision, threads=threads)
        gate = _Gate(thresholds_for(gen.decoder.variant))
        results = []
        for p, ref in zip(singles, refs, strict=True):
            say(f"{precision}: runtime on {p.name!r}")
            results.append(teacher_forced(gen, p, ref))
        report.checks.extend(logits_checks(precision, gate, results))
        report.checks.append(greedy_check(precision, gate, results, refs))
        if gate.exact:
            say(f"{precision}: top-k sampling")
            report.checks.append(sampling_check(precision, gen, model, singles, new_tokens,
                                                gate.thresholds.get("logits_max_abs", 0.0)))
        report.checks.append(cache_check(precision, gate, results))
        say(f"{precision}: batch vs single")
        report.checks.append(batch_check(precision, gate, gen, batch, new_tokens))
        del gen  # one onnxruntime session at a time
    return report


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` (None: unchanged) for the block."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _chosen_precisions(manifest: Manifest, precisions: Sequence[str] | None) -> list[str]:
    if not precisions:
        return list(manifest.variants)
    names = [p.strip() for item in precisions for p in item.split(",") if p.strip()]
    unknown = [p for p in names if p not in manifest.variants]
    if unknown:
        raise ValueError(f"precision {', '.join(unknown)}: this model directory has "
                         f"{', '.join(manifest.variants)}")
    return list(dict.fromkeys(names))


def _quiet_transformers() -> None:
    """generate() logs advice about its settings; verify sets them on purpose."""
    from transformers.utils import logging

    logging.set_verbosity_error()


def record_summary(model_dir: str | Path, report: VerifyReport) -> None:
    """Write the report's summary into the manifest's `verify` field (the file list is unchanged:
    the manifest itself is not among its `files`)."""
    manifest = read_manifest(model_dir)
    replace(manifest, verify=report.summary()).write(Path(model_dir))


def report_table(report: VerifyReport) -> Any:
    """A rich Table of the report: check, variant, figure, threshold, result."""
    from rich.table import Table

    status = "[green]passed[/]" if report.passed else "[bold red]FAILED[/]"
    caption = [f"{status} in {report.seconds:.1f} s; reference {report.reference}; "
               f"{report.steps} decode steps"] + report.notes
    table = Table(title=f"verify {report.model_dir}", caption="\n".join(caption))
    for col in ("check", "variant", "figure", "threshold", "result"):
        table.add_column(col)
    for c in report.checks:
        table.add_row(c.check, c.variant, c.figure, c.threshold,
                      "[green]pass[/]" if c.passed else "[bold red]FAIL[/]")
    return table


def verify_command(
    model_dir: str | Path,
    *,
    reference: Any = None,
    prompts: Path | None = None,
    steps: int = 32,
    precisions: Sequence[str] | None = None,
    device: str = "cpu",
    report_path: Path | None = None,
    console: Any = None,
) -> VerifyReport:
    """`gpt2-onnx verify`: run_verify with a status line, print the table to `console`
    (a rich Console; none prints nothing) and write the JSON report when `report_path` is given."""
    if console is None:
        report = run_verify(model_dir, reference=reference, prompts=prompts, steps=steps,
                            precisions=precisions, device=device)
    else:
        with console.status("verify") as status:
            report = run_verify(model_dir, reference=reference, prompts=prompts, steps=steps,
                                precisions=precisions, device=device,
                                progress=lambda msg: status.update(f"verify: {msg}"))
        console.print(report_table(report))
    if report_path is not None:
        Path(report_path).write_text(json.dumps(report.to_json(), indent=2,
                                                ensure_ascii=False) + "\n", encoding="utf-8")
    return report
