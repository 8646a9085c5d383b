"""Derive verify's per-variant limits from the measurements in bench/results.

    python bench/derive_thresholds.py            write runtime/thresholds.json
    python bench/derive_thresholds.py --check    exit 1 if the committed file differs

Sources (each a file in bench/results; the output records which figure each limit came from):
  quality.json               the trained yardstick (bench/quality.py): mean KL and decisive top-1
                             of int8 / int4 on 16,320 held-out positions
  verify-gpt2-large.json     `gpt2-onnx verify` of random-init gpt2-large (fp32, fp32-fused, int8,
                             int4; CPU, 64 steps): max abs logit difference and decisive top-1
  verify-gpt2-fp16.json      `gpt2-onnx verify` of random-init gpt2 (fp32, fp16, fp16-fused; CPU)
  verify-tiny-fp16.json      the same on the tiny preset (wider weights: logits of +-30)

Rules (a margin over the worst figure measured; limits rounded up to 2 significant digits):
  exact (fp32, fp32-fused)   one limit for both (the same fp32 arithmetic in another order):
                             logits_max_abs = 100 x the worst max abs diff of either on the
                             GPT-2 shapes (gpt2-large, gpt2; not the tiny preset, whose weights
                             are 15 x wider and logits +-30); greedy tokens identical
  int8                       mean_kl_max = 10 x the yardstick's mean KL (the trained model sets
                             it); logits_max_abs = 2 x the worst max abs diff of the verify reports
  int4                       mean_kl_max = a stated quality bar, not a measurement (QUALITY_BARS):
                             4-bit may raise the cross-entropy of text the fp32 model would write
                             by at most 0.01 nats a token, i.e. cost at most 1 % perplexity
                             (e^0.01 - 1 = 1.005 %); KL(fp32 || variant) is exactly that expected
                             rise. For scale: llama.cpp's recommended 4-bit, Q4_K_M, measures a
                             KL of 0.013-0.031 on LLaMA 2/3 (its perplexity README). The script
                             fails if the yardstick's own measurement breaks the bar.
                             logits_max_abs = 2 x the worst max abs diff of the verify reports
  half (fp16, fp16-fused)    mean_kl_max = 10 x and logits_max_abs = 10 x the worst of the fp16
                             verify reports. Measured on CPU, where onnxruntime runs the fp16
                             ops it has no fp16 kernel for in fp32 (inserted casts): CUDA's
                             figures will be higher, hence 10 x on both; re-derive from a GPU run
  every inexact variant      top1_agreement_min = min(0.99, worst decisive top-1 - 0.01, floored
                             to 2 decimals); top1_margin is part of the recipe (MARGINS)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OUTPUT = ROOT / "runtime" / "thresholds.json"
YARDSTICK = "quality.json"
VERIFY_REPORTS = ("verify-gpt2-large.json", "verify-gpt2-fp16.json", "verify-tiny-fp16.json")
GPT2_SHAPED = ("verify-gpt2-large.json", "verify-gpt2-fp16.json")  # the exact variants' sources
EXACT = ("fp32", "fp32-fused")
QUANTIZED = ("int8", "int4")
HALF = ("fp16", "fp16-fused")
# top-2 gap (nats) below which a flipped argmax is not counted: the size of each recipe's noise.
MARGINS = {"int8": 0.1, "int4": 0.3, "fp16": 0.1, "fp16-fused": 0.1}
KL_FACTOR, TOP1_SLACK = 10.0, 0.01
# Mean-KL limits that state what quality users accept, instead of a multiple of a measurement.
QUALITY_BARS = {
    "int4": (0.01, "quality bar: at most 1 % perplexity (mean KL 0.01 nats = the expected rise in "
                   "cross-entropy on the fp32 model's own text; e^0.01 - 1 = 1.005 %)"),
}
MAX_ABS_FACTOR = {**{v: 100.0 for v in EXACT}, **{v: 2.0 for v in QUANTIZED},
                  **{v: 10.0 for v in HALF}}
LOGIT_CHECKS = ("logits-prefill", "logits-decode", "cache-vs-recompute")


def ceil_sig(x: float, digits: int = 2) -> float:
    """x rounded up to `digits` significant digits (0.00102 -> 0.0011)."""
    if x <= 0:
        raise ValueError(f"cannot derive a limit from {x!r}: nothing was measured")
    exp = math.floor(math.log10(x)) - digits + 1
    scaled = x / 10 ** exp
    # a figure already on the grid (e.g. 0.19 read back as 0.18999999999999998) stays put
    up = math.ceil(round(scaled, 9))
    return float(f"{up}e{exp}")


def floor_2dp(x: float) -> float:
    return math.floor(round(x * 100, 9)) / 100


def _verify_figures(results: Path, variants: tuple[str, ...], reports: tuple[str, ...]
                    ) -> dict[str, list[tuple[str, float]]]:
    """Figures of `variants` in the verify `reports`: max_abs, mean_kl, decisive, each a list
    of (source, value)."""
    out: dict[str, list[tuple[str, float]]] = {"max_abs": [], "mean_kl": [], "decisive": []}
    for name in reports:
        path = results / name
        if not path.is_file():
            continue
        for c in json.loads(path.read_text())["checks"]:
            if c["variant"] not in variants or not c["values"]:
                continue
            where = f"{name} {c['variant']} {c['check']}"
            if c["check"] in LOGIT_CHECKS:
                out["max_abs"].append((where, c["values"]["max_abs"]))
                out["mean_kl"].append((where, c["values"]["mean_kl"]))
            if "decisive_agreement" in c["values"]:
                out["decisive"].append((where, c["values"]["decisive_agreement"]))
    return out


def _yardstick(results: Path, variant: str) -> dict[str, Any] | None:
    doc = json.loads((results / YARDSTICK).read_text())
    return next((v for v in doc["variants"] if v["name"] == variant), None)


def _worst(pairs: list[tuple[str, float]], what: str, variant: str, high: bool = True
           ) -> tuple[str, float]:
    if not pairs:
        raise ValueError(f"{variant}: no {what} figure in bench/results "
                         f"({', '.join(VERIFY_REPORTS)})")
    return max(pairs, key=lambda p: p[1]) if high else min(pairs, key=lambda p: p[1])


def derive(results: Path = RESULTS) -> dict[str, Any]:
    """The content of runtime/thresholds.json, computed from the files in `results`."""
    variants: dict[str, Any] = {}
    for variant in (*EXACT, *QUANTIZED, *HALF):
        figs = (_verify_figures(results, EXACT, GPT2_SHAPED) if variant in EXACT
                else _verify_figures(results, (variant,), VERIFY_REPORTS))
        src, max_abs = _worst(figs["max_abs"], "max abs", variant)
        factor = MAX_ABS_FACTOR[variant]
        limits = {"logits_max_abs": ceil_sig(factor * max_abs)}
        came_from = {"logits_max_abs": {"measured": max_abs, "source": src,
                                        "rule": f"{factor:g} x measured, rounded up to 2 "
                                                "significant digits"}}
        if variant in EXACT:
            limits["top1_agreement_min"] = 1.0
            came_from["top1_agreement_min"] = {"rule": "exact: greedy tokens identical"}
            variants[variant] = {"limits": limits, "from": came_from}
            continue
        if variant in QUANTIZED:
            yard = _yardstick(results, variant)
            if yard is None:
                raise ValueError(f"{variant}: missing from {YARDSTICK}")
            kl_src, kl = f"{YARDSTICK} mean_kl (trained yardstick)", yard["mean_kl"]
            decisive = [*figs["decisive"], (f"{YARDSTICK} top1_decisive", yard["top1_decisive"])]
        else:
            kl_src, kl = _worst(figs["mean_kl"], "mean KL", variant)
            decisive = figs["decisive"]
        if variant in QUALITY_BARS:
            bar, why = QUALITY_BARS[variant]
            if kl > bar:
                raise ValueError(f"{variant}: {kl_src} is {kl:.3g}, above its quality bar {bar}")
            limits["mean_kl_max"] = bar
            came_from["mean_kl_max"] = {"measured": kl, "source": kl_src, "rule": why}
        else:
            limits["mean_kl_max"] = ceil_sig(KL_FACTOR * kl)
            came_from["mean_kl_max"] = {"measured": kl, "source": kl_src,
                                        "rule": f"{KL_FACTOR:g} x measured, rounded up to 2 "
                                                "significant digits"}
        d_src, d = _worst(decisive, "decisive top-1", variant, high=False)
        limits["top1_agreement_min"] = min(0.99, floor_2dp(d - TOP1_SLACK))
        came_from["top1_agreement_min"] = {"measured": d, "source": d_src,
                                           "rule": f"min(0.99, measured - {TOP1_SLACK:g}), "
                                                   "floored to 2 decimals"}
        limits["top1_margin"] = MARGINS[variant]
        came_from["top1_margin"] = {"rule": "recipe constant (bench/derive_thresholds.py "
                                            "MARGINS)"}
        variants[variant] = {"limits": limits, "from": came_from}
    return {"generated_by": "bench/derive_thresholds.py",
            "sources": [YARDSTICK, *[n for n in VERIFY_REPORTS if (results / n).is_file()]],
            "variants": variants}


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="compare with the committed file instead of writing it")
    args = ap.parse_args(argv)
    text = render(derive())
    if args.check:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} differs from what bench/results gives; run "
                  "python bench/derive_thresholds.py", file=sys.stderr)
            return 1
        print(f"{OUTPUT}: up to date")
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
