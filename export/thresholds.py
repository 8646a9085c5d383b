"""Per-precision limits `verify` applies, derived from measurements (export/thresholds.json).

The numbers live in thresholds.json beside this module, written by bench/derive_thresholds.py from
the measurement files in bench/results (each entry records the figures it came from and the rule
applied); tests/test_verify.py checks that the committed file equals what the script computes.
Re-run the measurements when a variant's recipe changes, then the script.

Keys (all compare a variant with PyTorch fp32 on the same input):
  logits_max_abs      max |logit difference| at prefill, every decode step and cached-vs-recompute
  mean_kl_max         inexact variants: mean KL(fp32 || variant), nats
  top1_agreement_min  1.0 = exact: greedy tokens must be identical. Inexact variants: the share of
                      teacher-forced steps whose argmax equals fp32's, counting only decisive steps
                      (fp32's top-2 gap >= top1_margin nats: a flip inside the noise is not a
                      disagreement); also the batch-vs-single agreement
  top1_margin         inexact variants: see above

The model directory's manifest records the limits its export used; verify applies these,
whatever the manifest says (a directory cannot loosen its own verification).
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_FILE = Path(__file__).with_name("thresholds.json")
EXACT_KEYS = ("logits_max_abs", "top1_agreement_min")
INEXACT_KEYS = ("logits_max_abs", "mean_kl_max", "top1_agreement_min", "top1_margin")


def load_thresholds(path: Path = DATA_FILE) -> dict[str, dict[str, float]]:
    """precision -> limits, read from the data file; ValueError naming a malformed entry."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    out = {}
    for precision, entry in doc["variants"].items():
        limits = {k: float(v) for k, v in entry["limits"].items()}
        exact = limits.get("top1_agreement_min") == 1.0
        want = EXACT_KEYS if exact else INEXACT_KEYS
        if sorted(limits) != sorted(want):
            raise ValueError(f"{path}: {precision} has limits {sorted(limits)}, expected "
                             f"{sorted(want)}")
        out[precision] = limits
    return out


THRESHOLDS: dict[str, dict[str, float]] = load_thresholds()


def package_thresholds(precision: str) -> dict[str, float]:
    """A copy of the limits of `precision`; ValueError naming the known precisions (an unknown
    precision never borrows another's limits)."""
    if precision not in THRESHOLDS:
        raise ValueError(f"no verify limits for precision {precision!r}; known: "
                         f"{', '.join(THRESHOLDS)}")
    return dict(THRESHOLDS[precision])


thresholds_for = package_thresholds  # the name the export pipeline uses
