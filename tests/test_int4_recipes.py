"""bench/int4_recipes.py's figures on hand-made logits (no model): KL, decisive top-1,
perplexity change; and its candidate list holds the default int4 recipe exactly once."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import int4_recipes  # noqa: E402

from gpt2_onnx.export.fused import RECIPES  # noqa: E402


def test_compare_matches_hand_computed_kl_top1_and_perplexity() -> None:
    # one chunk of 3 tokens over a 2-token vocabulary; positions 0 and 1 predict tokens 1 and 2
    ref = np.log(np.array([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))  # [1, 3, 2]
    got = np.log(np.array([[[0.5, 0.5], [0.6, 0.4], [0.7, 0.3]]]))
    chunks = np.array([[0, 0, 1]])
    f = int4_recipes.compare(ref, got, chunks, margin=1.0)
    kl = [0.0, 0.9 * np.log(0.9 / 0.6) + 0.1 * np.log(0.1 / 0.4),
          0.2 * np.log(0.2 / 0.7) + 0.8 * np.log(0.8 / 0.3)]
    assert f["mean_kl"] == pytest.approx(np.mean(kl))
    assert f["max_kl"] == pytest.approx(max(kl))
    # argmax: position 0 ties (both pick 0), 1 agrees, 2 flips
    assert f["top1"] == pytest.approx(2 / 3)
    # decisive (top-2 gap >= 1 nat): positions 1 (ln 9 = 2.2) and 2 (ln 4 = 1.39); 1 of 2 agree
    assert f["decisive_share"] == pytest.approx(2 / 3)
    assert f["top1_decisive"] == pytest.approx(0.5)
    # perplexity over the predicted tokens: p(0 | pos 0) and p(1 | pos 1)
    assert f["ppl_ref"] == pytest.approx(np.exp(-(np.log(0.5) + np.log(0.1)) / 2))
    assert f["perplexity"] == pytest.approx(np.exp(-(np.log(0.5) + np.log(0.4)) / 2))
    assert f["ppl_change"] == pytest.approx(f["perplexity"] / f["ppl_ref"] - 1)
    same = int4_recipes.compare(ref, ref, chunks, margin=1.0)
    assert same["mean_kl"] == 0.0 and same["top1"] == 1.0 and same["ppl_change"] == 0.0


def test_the_default_int4_recipe_is_a_candidate_once() -> None:
    assert [n for n, r in int4_recipes.CANDIDATES.items() if r == RECIPES["int4"]] == [
        "b16-asym-mixed-attn8"]
    assert int4_recipes.CANDIDATES["int8"] == RECIPES["int8"]
