"""Per-precision thresholds `verify` applies, derived from the yardstick's quality table.

Random-init weights give nearly flat distributions, on which quantization looks harmless; these
limits come from a trained model instead: bench/train_yardstick.py trains it, bench/quality.py
measures each variant against PyTorch fp32 on held-out text (bench/results/quality.md). The
pipeline copies THRESHOLDS[precision] into each Variant.thresholds of the manifest.

Keys (all compare a variant with PyTorch fp32 on the same input):
  top1_agreement_min  fraction of steps whose argmax equals fp32's, teacher-forced along fp32's
                      greedy path (bench/quality.py "top-1 greedy path")
  mean_kl_max         mean KL(fp32 || variant) over positions, nats
  ppl_change_max      |perplexity / fp32 perplexity - 1| on the same text

STATUS: PLACEHOLDERS. The int8/int4/fp16 figures below are NOT yet derived from a quality run on
the real variants; replace them (and this note) once bench/quality.py has run on
`gpt2-onnx export <yardstick> --precision fp32,int8,int4` (and fp16 on a GPU), with a comment
giving the measured figure and the margin applied.
"""

from __future__ import annotations

PLACEHOLDER = True  # set to False when every figure below comes from a measured quality table

THRESHOLDS: dict[str, dict[str, float]] = {
    # fp32 ONNX vs PyTorch fp32 on the yardstick (bench/results/quality.md, 8160 held-out
    # positions, 896 greedy steps): top-1 1.0000 on both, mean KL 5.6e-14, perplexity change
    # 0.0000 %. Limits leave room for kernel differences on other CPUs and on CUDA.
    "fp32": {"top1_agreement_min": 0.99, "mean_kl_max": 1e-6, "ppl_change_max": 1e-4},
    # PLACEHOLDER: to be derived from the measured int8 row (measured figure, then margin).
    "int8": {"top1_agreement_min": 0.90, "mean_kl_max": 0.02, "ppl_change_max": 0.02},
    # PLACEHOLDER: to be derived from the measured int4 row.
    "int4": {"top1_agreement_min": 0.80, "mean_kl_max": 0.10, "ppl_change_max": 0.10},
    # PLACEHOLDER: to be derived from a GPU quality run of the fp16 variant.
    "fp16": {"top1_agreement_min": 0.95, "mean_kl_max": 0.01, "ppl_change_max": 0.01},
}


def thresholds_for(precision: str) -> dict[str, float]:
    """A copy of the thresholds of `precision`; ValueError naming the known precisions."""
    if precision not in THRESHOLDS:
        raise ValueError(f"no thresholds for precision {precision!r}; known: "
                         f"{', '.join(THRESHOLDS)}")
    return dict(THRESHOLDS[precision])
