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
5. batch-vs-single: a left-padded greedy batch gives each row's tokens alone;
6. onnxruntime-genai (when installed and the directory has a genai_config.json): onnxruntime-genai
   runs the variant the config names; its greedy tokens must equal the runtime's on the same graph
   (each prompt alone and the batch) and, for exact variants, transformers' (near-ties aside).

Each check yields one row per variant (the worst prompt named in `detail`). Memory: the reference
model plus one onnxruntime session at a time (variants are loaded one after another).

Limits come from the package (runtime/variants.py), never from the model directory: a manifest
records the limits its export used, and a manifest value looser than the registry's is reported
in the notes and ignored. A check that could not run (no decode step, no decisive step) is
reported "not run" and is never a pass: a variant whose essential checks did not run fails.
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
from gpt2_onnx.runtime.sampling import log_softmax
from gpt2_onnx.runtime.validation import check_int, check_output_file

LOGITS_PREFILL = "logits-prefill"
LOGITS_DECODE = "logits-decode"
GREEDY = "greedy-tokens"
SAMPLING = "top-k-sampling"
CACHE = "cache-vs-recompute"
BATCH = "batch-vs-single"
GENAI = "onnxruntime-genai"
CHECKS = (LOGITS_PREFILL, LOGITS_DECODE, GREEDY, SAMPLING, CACHE, BATCH, GENAI)

# Limits per precision live in the variant registry (runtime/variants.py, numbers in
# runtime/thresholds.json, derived from bench/results by bench/derive_thresholds.py). The export
# copies them into each variant's manifest entry as a record; verify applies the registry's,
# whatever the manifest says. An unknown precision is an error, never another variant's limits.
THRESHOLDS: dict[str, dict[str, float]] = variants.THRESHOLDS
# Which way a limit loosens: True when a larger value lets more through.
LOOSER_WHEN_LARGER = {"logits_max_abs": True, "mean_kl_max": True, "top1_margin": True,
                      "top1_agreement_min": False}

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
    passed: bool  # False whenever the check did not run
    detail: str = ""  # the worst prompt, the step, notes
    values: dict[str, float] = field(default_factory=dict)  # the figures as numbers
    ran: bool = True  # False: nothing was measured ("not run"), never a pass
    # False only for a check that does not apply to this variant (top-k sampling equality of an
    # inexact variant): its "not run" does not fail the variant. Every other check must run.
    essential: bool = True

    @property
    def status(self) -> str:
        """"pass", "FAIL" or "not run"."""
        if not self.ran:
            return "not run"
        return "pass" if self.passed else "FAIL"

    @property
    def counts(self) -> bool:
        """Whether this row decides the verdict (all but a non-essential check not run)."""
        return self.ran or self.essential


def not_run(variant: str, check: str, threshold: str, why: str, essential: bool = True
            ) -> Check:
    """A row for a check that measured nothing: never a pass."""
    return Check(variant, check, "not run", threshold, False, why, {}, ran=False,
                 essential=essential)


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
        """True when some check ran and every row that counts passed (an essential check that
        did not run is a failure)."""
        return (any(c.ran for c in self.checks)
                and all(c.passed for c in self.checks if c.counts))

    def failed_checks(self) -> list[str]:
        """'variant/check' of every failed row, e.g. ['fp32/logits-decode'], with " (not run)"
        after an essential check that did not run."""
        return [f"{c.variant}/{c.check}" + ("" if c.ran else " (not run)")
                for c in self.checks if c.counts and not c.passed]

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        for row, check in zip(doc["checks"], self.checks, strict=True):
            row["status"] = check.status
        doc["passed"] = self.passed
        doc["failed"] = self.failed_checks()
        return doc

    def summary(self) -> dict[str, Any]:
        """What the manifest keeps (`Manifest.verify`): verdicts and figures, no prompt texts."""
        return {
            "passed": self.passed, "steps": self.steps, "device": self.device,
            "reference": self.reference, "seconds": round(self.seconds, 1), "notes": self.notes,
            "checks": [{"variant": c.variant, "check": c.check, "figure": c.figure,
                        "threshold": c.threshold, "passed": c.passed, "status": c.status,
                        "values": c.values}
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
    p_log = log_softmax(ref, dtype=np.float32)  # [..., vocab]
    diff = p_log - log_softmax(got, dtype=np.float32)  # [..., vocab]
    np.exp(p_log, out=p_log)  # now p
    kl = np.einsum("...v,...v->...", p_log, diff, dtype=np.float64)  # [...]
    return float(np.maximum(kl, 0.0).mean())


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (a length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ------------------------------------------------------------------------------------ per variant


@dataclass(frozen=True)
class _Gate:
    """How one variant is judged: the registry's limits for its precision."""

    limits: dict[str, float]

    @property
    def exact(self) -> bool:
        """Exact variants (fp32 arithmetic in another order) must give transformers' tokens."""
        return self.limits["top1_agreement_min"] >= 1.0

    def logits_ok(self, max_abs: float, kl: float) -> bool:
        """Max abs logit difference within its limit, and mean KL within its limit where the
        variant has one (inexact variants). NaN fails both."""
        ok = bool(max_abs <= self.limits["logits_max_abs"])
        if "mean_kl_max" in self.limits:
            ok = ok and bool(kl <= self.limits["mean_kl_max"])
        return ok

    def logits_threshold(self) -> str:
        text = f"max abs <= {_limit(self.limits['logits_max_abs'])}"
        if "mean_kl_max" in self.limits:
            text = f"mean KL <= {_limit(self.limits['mean_kl_max'])} and {text}"
        return text

    @property
    def tie_margin(self) -> float:
        """Top-2 logit gap below which an exact variant's greedy choice may legitimately flip."""
        return self.limits["logits_max_abs"]


def _limit(x: float) -> str:
    """A limit as written in runtime/thresholds.json (never rounded: 0.0015, not 2e-03)."""
    return repr(float(x))


def limits_for(variant: Variant) -> tuple[dict[str, float], list[str]]:
    """The registry's limits for the variant's precision, and notes on manifest values that
    differ from them. ValueError for a precision the registry does not know.

    The manifest's `thresholds` only record what its export used: a looser value there is
    reported and ignored, so a model directory cannot weaken its own verification.
    """
    limits = variants.thresholds_for(variant.precision)
    notes = []
    for key, value in sorted(variant.thresholds.items()):
        if key not in limits or value == limits[key]:
            continue  # keys verify does not use (e.g. an older export's ppl_change_max)
        ours = limits[key]
        looser = value > ours if LOOSER_WHEN_LARGER[key] else value < ours
        how = "looser than" if looser else "differs from"
        notes.append(f"{variant.precision}: the manifest's {key} {_limit(value)} {how} the "
                     f"package's {_limit(ours)}: ignored, the package's limit applies")
    return limits, notes


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
        rows.append(not_run(precision, LOGITS_DECODE, gate.logits_threshold(),
                            "no decode step: transformers stopped (EOS) right after every "
                            "prompt's prefill; use other prompts or more --steps"))
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
                  + (f"; near-ties (top-2 gap < {_limit(gate.tie_margin)}) at "
                     + ", ".join(f"{d[0]!r} step {d[1]}" for d in ties) if ties else ""))
        figure = "identical" if not divergences else where
        return Check(precision, GREEDY, figure, "identical to transformers", not real, detail,
                     values)
    # A flip where the reference's own top-2 gap is inside the variant's quantization noise is
    # not a disagreement: on flat distributions (random weights) most steps are such near-ties.
    need = gate.limits["top1_agreement_min"]
    margin = gate.limits["top1_margin"]
    threshold = f"decisive agreement >= {_limit(need)} (top-2 gap >= {_limit(margin)})"
    decisive = [a for r in results for a, g in zip(r.top1, r.gaps, strict=True) if g >= margin]
    if not decisive:
        return not_run(precision, GREEDY, threshold,
                       f"no decisive step: transformers' top-2 gap was below {_limit(margin)} "
                       f"at all {len(agree)} teacher-forced steps (all agreement {rate:.1%}); "
                       "use other prompts or more --steps")
    decisive_rate = float(np.mean(decisive))
    values.update(decisive_agreement=decisive_rate, decisive_steps=float(len(decisive)))
    return Check(precision, GREEDY,
                 f"top-1 agreement {rate:.1%} (all), {decisive_rate:.1%} on {len(decisive)} "
                 f"decisive steps; {where}", threshold, decisive_rate >= need,
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
    threshold = f"all equal, all in top-{SAMPLING_TOP_K}"
    if compared == 0:
        return not_run(precision, SAMPLING, threshold, "the runtime sampled no token")
    ok = mismatched == 0 and outside == 0
    figure = f"{compared - mismatched}/{compared} equal, {outside} outside top-{SAMPLING_TOP_K}"
    return Check(precision, SAMPLING, figure, threshold, ok,
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
    need = gate.limits["top1_agreement_min"]
    return Check(precision, BATCH, f"agreement {rate:.1%}" + (f"; {first}" if first else ""),
                 f"agreement >= {_limit(need)}", rate >= need, detail, {"agreement": rate})


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
    genai: bool = True,
) -> VerifyReport:
    """Check every variant (or `precisions`) of `model_dir` against transformers.

    reference: hub id, checkpoint directory or a loaded GPT2LMHeadModel; default the
      manifest's source record.
    prompts: a file (one prompt a line) or a list of prompts; default DEFAULT_PROMPTS, a long
      prompt, an emoji/CJK prompt and a batch of different lengths.
    steps: decode steps per prompt (steps + 1 new tokens: the first comes from the prefill).
    genai: also run onnxruntime-genai on the variant genai_config.json names, when it is installed
      and that variant is checked (a note says why when it is not run).
    """
    from gpt2_onnx.runtime.generator import load_tokenizer

    start = time.perf_counter()
    say = progress or (lambda _msg: None)
    check_int("steps", steps, 1)
    root = Path(model_dir)
    manifest = read_manifest(root)
    chosen = _chosen_precisions(manifest, precisions)
    dims = manifest.dims
    # steps + 1 new tokens after at least a 1-token prompt must fit in n_positions.
    steps = check_int("steps", steps, 1, dims.n_positions - 2,
                      hint=f" (n_positions {dims.n_positions} minus a 1-token prompt and the "
                           "first new token)")
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
    genai_variant = _genai_variant(manifest, chosen, genai, device, notes)
    with _torch_threads(threads):
        report = _verify_variants(root, manifest, chosen, reference, singles, batch, steps,
                                  device, threads, say, genai_variant)
    report.notes = notes + report.notes
    report.seconds = time.perf_counter() - start
    return report


def _verify_variants(root: Path, manifest: Manifest, chosen: list[str], reference: Any,
                     singles: list[Prompt], batch: list[Prompt], steps: int, device: str,
                     threads: int | None, say: Callable[[str], None],
                     genai_variant: str | None = None) -> VerifyReport:
    from gpt2_onnx.runtime.device import check_variant_on_device, resolve_device
    from gpt2_onnx.runtime.generator import TextGenerator

    new_tokens = steps + 1
    # Before the (slow) reference: every precision has limits, and can run on the device.
    resolved = resolve_device(device)
    gates, notes = {}, []
    for precision in chosen:
        check_variant_on_device(manifest.variants[precision], resolved)
        limits, differing = limits_for(manifest.variants[precision])
        gates[precision] = _Gate(limits)
        notes.extend(differing)
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
    report.notes.extend(notes)
    for precision in chosen:
        say(f"{precision}: loading the ONNX session")
        gen = TextGenerator.load(root, device=device, precision=precision, threads=threads)
        gate = gates[precision]
        results = []
        for p, ref in zip(singles, refs, strict=True):
            say(f"{precision}: runtime on {p.name!r}")
            results.append(teacher_forced(gen, p, ref))
        report.checks.extend(logits_checks(precision, gate, results))
        report.checks.append(greedy_check(precision, gate, results, refs))
        if gate.exact:
            say(f"{precision}: top-k sampling")
            report.checks.append(sampling_check(precision, gen, model, singles, new_tokens,
                                                gate.limits["logits_max_abs"]))
        else:
            report.checks.append(not_run(
                precision, SAMPLING, f"all equal, all in top-{SAMPLING_TOP_K}",
                "inexact variant: its logits differ from PyTorch's by design, so seeded draws "
                "may differ; checked on exact variants only", essential=False))
        report.checks.append(cache_check(precision, gate, results))
        say(f"{precision}: batch vs single")
        report.checks.append(batch_check(precision, gate, gen, batch, new_tokens))
        if precision == genai_variant:
            ours_batch = [r.ids for r in gen.generate_ids([p.ids for p in batch],
                                                          max_new_tokens=new_tokens, greedy=True)]
        del gen  # one onnxruntime session at a time
        if precision == genai_variant:
            say(f"{precision}: onnxruntime-genai")
            report.checks.append(genai_check(root, manifest, precision, gate, singles, refs,
                                             [r.greedy_ids for r in results], batch,
                                             ours_batch, new_tokens))
    return report


def _genai_variant(manifest: Manifest, chosen: list[str], enabled: bool, device: str,
                   notes: list[str]) -> str | None:
    """The variant the genai check runs on, or None (with a note saying why, when relevant)."""
    from gpt2_onnx.export.genai import genai_available

    if not enabled:
        return None
    if manifest.genai is None:
        notes.append("onnxruntime-genai: not checked (no genai_config.json in this directory)")
        return None
    if not genai_available():
        notes.append("onnxruntime-genai: not checked (not installed; pip install "
                     "onnxruntime-genai)")
        return None
    if device != "cpu":
        notes.append("onnxruntime-genai: not checked (its config runs on the CPU)")
        return None
    variant = manifest.genai["variant"]
    if variant not in chosen:
        notes.append(f"onnxruntime-genai: not checked (its variant {variant} is not among the "
                     "checked ones)")
        return None
    return variant


def genai_check(root: Path, manifest: Manifest, precision: str, gate: _Gate,
                singles: Sequence[Prompt], refs: Sequence[RefRun], ours: Sequence[list[int]],
                batch: Sequence[Prompt], ours_batch: Sequence[list[int]],
                new_tokens: int) -> Check:
    """onnxruntime-genai's greedy tokens vs the runtime's on the same graph (each single prompt,
    then the batch run together) and, for exact variants, vs transformers' (near-ties aside)."""
    from gpt2_onnx.export.genai import genai_greedy, load_genai_model

    eos = manifest.dims.eos_token_id
    model = load_genai_model(root)
    problems: list[str] = []
    ref_ties: list[str] = []
    for p, ref, mine in zip(singles, refs, ours, strict=True):
        got = genai_greedy(model, [p.ids], len(ref.tokens), pad_token_id=eos,
                           eos_token_id=eos)[0]
        at = first_divergence(got, mine)
        if at is not None:
            problems.append(f"{p.name!r} diverges from the runtime at step {at}")
        at = first_divergence(got, ref.tokens)
        if gate.exact and at is not None:
            if _near_tie(ref, at, got, gate.tie_margin):
                ref_ties.append(f"{p.name!r} step {at}")
            else:
                problems.append(f"{p.name!r} diverges from transformers at step {at}")
    together = genai_greedy(model, [p.ids for p in batch], new_tokens, pad_token_id=eos,
                            eos_token_id=eos)
    for i, (got, mine) in enumerate(zip(together, ours_batch, strict=True)):
        at = first_divergence(got, mine)
        if at is not None:
            problems.append(f"batch row {i} diverges from the runtime at step {at}")
    del model
    lengths = ", ".join(str(len(p.ids)) for p in batch)
    detail = (f"{manifest.genai['graph'] if manifest.genai else ''}; {len(singles)} prompts "
              f"alone and a batch of {len(batch)} (lengths {lengths})"
              + (f"; near-ties vs transformers at {', '.join(ref_ties)}" if ref_ties else ""))
    want = "identical to the runtime" + (" and to transformers" if gate.exact else "")
    return Check(precision, GENAI, problems[0] if problems else "identical", want,
                 not problems, detail, {"divergences": float(len(problems))})


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
    styles = {"pass": "[green]pass[/]", "FAIL": "[bold red]FAIL[/]",
              "not run": "[yellow]not run[/]"}
    for c in report.checks:
        shown = styles[c.status]
        if c.status == "not run" and c.essential:
            shown = "[bold red]not run (FAIL)[/]"
        table.add_row(c.check, c.variant, c.figure, c.threshold, shown)
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
    genai: bool = True,
) -> VerifyReport:
    """`gpt2-onnx verify`: run_verify with a status line, print the table to `console`
    (a rich Console; none prints nothing) and write the JSON report when `report_path` is given.
    The report path is checked before any work (not a directory, its folder writable)."""
    if report_path is not None:
        check_output_file("report", report_path)
    if console is None:
        report = run_verify(model_dir, reference=reference, prompts=prompts, steps=steps,
                            precisions=precisions, device=device, genai=genai)
    else:
        with console.status("verify") as status:
            report = run_verify(model_dir, reference=reference, prompts=prompts, steps=steps,
                                precisions=precisions, device=device, genai=genai,
                                progress=lambda msg: status.update(f"verify: {msg}"))
        console.print(report_table(report))
    if report_path is not None:
        Path(report_path).write_text(json.dumps(report.to_json(), indent=2,
                                                ensure_ascii=False) + "\n", encoding="utf-8")
    return report
