"""Per-precision thresholds `verify` applies, derived from the yardstick's quality table.

Random-init weights give nearly flat distributions, on which quantization looks harmless; these
limits come from a trained model instead: bench/train_yardstick.py trains it, bench/quality.py
measures each variant against PyTorch fp32 on held-out text (bench/results/quality.md). The
pipeline copies THRESHOLDS[precision] into each Variant.thresholds of the manifest.

Keys (all compare a variant with PyTorch fp32 on the same input):
  logits_max_abs      exact variants: max |logit difference| (gates logits and cache checks)
  top1_agreement_min  share of teacher-forced steps whose argmax equals fp32's; 1.0 = greedy
                      tokens must be identical. For inexact variants it counts only decisive
                      steps, where fp32's top-2 gap is >= top1_margin (nats)
  top1_margin         see above
  mean_kl_max         mean KL(fp32 || variant) over positions, nats
  ppl_change_max      |perplexity / fp32 perplexity - 1| on the same text (bench/quality.py)

Re-run bench/train_yardstick.py and bench/quality.py when a variant's recipe changes, and update
the figures quoted beside each entry. fp16 stays a placeholder until a GPU run measures it.
"""

from __future__ import annotations

THRESHOLDS: dict[str, dict[str, float]] = {
    # Exact variants: the same fp32 arithmetic in another order. Measured max abs logit diff vs
    # PyTorch: 1.0e-5 on random gpt2-large (prefill, 512-token prompt), 3e-5 on tiny (logits of
    # +-30); one damaged weight moves them by > 1e-2. Greedy tokens must be identical.
    "fp32": {"logits_max_abs": 1e-3, "top1_agreement_min": 1.0},
    "fp32-fused": {"logits_max_abs": 1e-3, "top1_agreement_min": 1.0},
    # Quantized / half precision: gated on mean KL(fp32 || variant) and on top-1 agreement at
    # decisive positions (fp32's top-2 gap >= top1_margin nats; a flip inside the quantization
    # noise is not a disagreement). From bench/results/quality.md (yardstick: 7.3 M parameters,
    # 354 steps / 12 min, held-out perplexity 90.7; 16,320 held-out positions):
    # int8 (MatMulNBits 8-bit, block 32, 8-bit shared token table): mean KL 2.9e-5, top-1 0.9941
    # (1.0000 on the 88 % decisive positions), perplexity +0.012 %. Limits: KL x 10, decisive
    # top-1 - 0.01, perplexity change x 8.
    "int8": {"mean_kl_max": 3e-4, "top1_agreement_min": 0.99, "top1_margin": 0.1,
             "ppl_change_max": 1e-3},
    # int4 (MatMulNBits 4-bit, block 32, 8-bit shared token table): mean KL 1.26e-4, top-1
    # 0.9918 (1.0000 on the 76 % decisive positions), perplexity +0.028 %. Same margins.
    "int4": {"mean_kl_max": 1.5e-3, "top1_agreement_min": 0.98, "top1_margin": 0.3,
             "ppl_change_max": 3e-3},
    # PLACEHOLDER (not measured): to be derived from a GPU quality run of the fp16 variant.
    "fp16": {"mean_kl_max": 1e-3, "top1_agreement_min": 0.97, "top1_margin": 0.1,
             "ppl_change_max": 0.01},
}


def thresholds_for(precision: str) -> dict[str, float]:
    """A copy of the thresholds of `precision`; ValueError naming the known precisions."""
    if precision not in THRESHOLDS:
        raise ValueError(f"no thresholds for precision {precision!r}; known: "
                         f"{', '.join(THRESHOLDS)}")
    return dict(THRESHOLDS[precision])
