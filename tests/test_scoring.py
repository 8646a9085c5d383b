"""Scoring (runtime/scoring.py) against transformers' loss on the tiny random model.

The reference is transformers itself: `model(ids, labels=ids).loss` with `ids = [bos] + text`
(the convention scoring documents), per-token log-probs from torch's log_softmax, and for long
texts the sliding-window loop of transformers' "Perplexity of fixed-length models" guide.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from gpt2_onnx.runtime.generator import TextGenerator
from gpt2_onnx.runtime.scoring import batch_logits, perplexity, score_ids, score_texts

BOS = 50256
TEXTS = [
    "Paris will be the capital of the world",
    "def add(x, y):\n    return x + y\n",
    "a",
    "日本語のテキスト 🙂 and emoji",
    "The quick brown fox jumps over the lazy dog. " * 3,
]


@pytest.fixture(scope="module")
def gen(tiny_dir: Path) -> TextGenerator:
    return TextGenerator.load(tiny_dir, device="cpu", precision="fp32", threads=2)


def torch_reference(model, ids: list[int]) -> tuple[float, np.ndarray]:
    """transformers' loss with labels=input_ids, and its per-token log-probs (float64)."""
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        out = model(input_ids=x, labels=x)
        logp = torch.log_softmax(out.logits[0, :-1].double(), dim=-1)  # [n-1, vocab]
        per_token = logp.gather(1, x[0, 1:, None])[:, 0]
    return float(out.loss), per_token.numpy()


@pytest.mark.parametrize("mode", ["all", "step"])
def test_scores_equal_transformers_loss(gen, tiny_reference, mode: str) -> None:
    scores = score_texts(gen, TEXTS, mode=mode)
    total_nll, total_n = 0.0, 0
    for text, s in zip(TEXTS, scores, strict=True):
        ids = [BOS] + gen.encode(text)
        loss, per_token = torch_reference(tiny_reference, ids)
        assert s.text == text
        assert s.token_ids == ids[1:]
        assert s.n_tokens == len(ids) - 1
        np.testing.assert_allclose(s.logprobs, per_token, rtol=0, atol=1e-4)
        assert s.perplexity == pytest.approx(math.exp(loss), rel=1e-4)
        assert s.total_logprob == pytest.approx(-loss * s.n_tokens, rel=1e-5)
        total_nll += -float(per_token.sum())
        total_n += len(per_token)
    assert perplexity(scores) == pytest.approx(math.exp(total_nll / total_n), rel=1e-4)


def test_without_bos_matches_loss_on_raw_ids(gen, tiny_reference) -> None:
    text = TEXTS[1]
    ids = gen.encode(text)
    loss, per_token = torch_reference(tiny_reference, ids)
    (s,) = score_texts(gen, [text], add_bos=False)
    assert s.token_ids == ids[1:]
    np.testing.assert_allclose(s.logprobs, per_token, rtol=0, atol=1e-4)
    assert s.perplexity == pytest.approx(math.exp(loss), rel=1e-4)


def test_batched_equals_one_by_one(gen) -> None:
    batched = score_texts(gen, TEXTS, batch_size=8)
    for text, b in zip(TEXTS, batched, strict=True):
        (single,) = score_texts(gen, [text], batch_size=1)
        assert single.token_ids == b.token_ids
        np.testing.assert_allclose(b.logprobs, single.logprobs, rtol=0, atol=1e-5)
    odd_batches = score_texts(gen, TEXTS, batch_size=2)
    np.testing.assert_allclose(np.concatenate([s.logprobs for s in odd_batches]),
                               np.concatenate([s.logprobs for s in batched]), atol=1e-5)


def test_long_text_sliding_window_matches_guide_loop(gen, tiny_reference) -> None:
    """A text longer than n_positions (256) against the guide's strided loop in torch."""
    import torch

    text = " ".join(f"word{i % 37} and number {i}," for i in range(120))
    ids = [BOS] + gen.encode(text)
    assert len(ids) > 2 * 256
    max_length, stride = 256, 100
    ref_logp: list[float] = []
    prev_end = 0
    for begin in range(0, len(ids), stride):  # the guide's loop, token by token
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        x = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            logp = torch.log_softmax(tiny_reference(input_ids=x).logits[0].double(), dim=-1)
        for j in range(end - begin - trg_len, end - begin):
            if begin + j == 0:
                continue  # the first token (bos) has no prediction
            ref_logp.append(float(logp[j - 1, ids[begin + j]]))
        prev_end = end
        if end == len(ids):
            break
    (s,) = score_texts(gen, [text], stride=stride)
    assert s.n_tokens == len(ids) - 1 == len(ref_logp)
    np.testing.assert_allclose(s.logprobs, ref_logp, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def fused_fp32_dir(tiny_dir: Path, tiny_reference, tmp_path_factory) -> Path:
    """tiny_dir with its fp32 variant replaced by the fused GroupQueryAttention fp32 graph
    (kv_layout "shared", logits_rows "last"): the step-by-step path with exact numerics."""
    import shutil
    from dataclasses import replace

    from gpt2_onnx.export.fused import build_fused_graph
    from gpt2_onnx.export.pipeline import refresh_file_entries
    from gpt2_onnx.runtime.manifest import read_manifest

    out = tmp_path_factory.mktemp("fused") / "tiny-fused"
    shutil.copytree(tiny_dir, out)
    variant = build_fused_graph(tiny_reference, out, "fp32")
    manifest = replace(read_manifest(out), variants={"fp32": variant})
    refresh_file_entries(out, manifest).write(out)
    return out


@pytest.mark.parametrize("mode", ["auto", "step"])
def test_fused_variant_scores_equal_transformers(fused_fp32_dir: Path, tiny_reference,
                                                mode: str) -> None:
    gen_f = TextGenerator.load(fused_fp32_dir, device="cpu", precision="fp32", threads=2)
    assert gen_f.decoder.variant.io.logits_rows == "last"
    scores = score_texts(gen_f, TEXTS, batch_size=3, mode=mode)  # auto: one prefill per batch
    for text, s in zip(TEXTS, scores, strict=True):
        ids = [BOS] + gen_f.encode(text)
        loss, per_token = torch_reference(tiny_reference, ids)
        np.testing.assert_allclose(s.logprobs, per_token, rtol=0, atol=1e-4)
        assert s.perplexity == pytest.approx(math.exp(loss), rel=1e-4)


class _CountingSession:
    """Wraps an onnxruntime session and counts its runs."""

    def __init__(self, session) -> None:
        self._session = session
        self.runs = 0

    def run_with_iobinding(self, binding, *args) -> None:
        self.runs += 1
        self._session.run_with_iobinding(binding, *args)

    def __getattr__(self, name: str):
        return getattr(self._session, name)


def test_fused_variant_scores_1000_tokens_in_one_prefill_per_window(
        fused_fp32_dir: Path, gen) -> None:
    gen_f = TextGenerator.load(fused_fp32_dir, device="cpu", precision="fp32", threads=2)
    counter = _CountingSession(gen_f.decoder.session)
    gen_f.decoder.session = counter
    text = " ".join(f"word{i % 37} and number {i}," for i in range(400))
    ids = gen_f.encode(text)[:1000]
    assert len(ids) == 1000
    (fused,) = score_ids(gen_f.decoder, [ids], batch_size=1, stride=128)
    # Hand count: bos + 1000 tokens = 1001 positions, windows of 256 every 128 tokens start at
    # 0, 128, ..., 768 (768 + 256 >= 1001): 7 windows, one session run (a prefill) each.
    assert counter.runs == 7
    (reference,) = score_ids(gen.decoder, [ids], batch_size=1, stride=128)  # optimum's graph
    assert fused.n_tokens == reference.n_tokens == 1000
    np.testing.assert_allclose(fused.logprobs, reference.logprobs, rtol=0, atol=1e-4)


def test_batch_logits_rows_predict_next_token(gen, tiny_reference) -> None:
    import torch

    ids = gen.encode(TEXTS[0])
    (logits,) = batch_logits(gen.decoder, [ids])
    with torch.no_grad():
        ref = tiny_reference(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert logits.shape == (len(ids), 50257)
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-3)


def test_empty_text_and_bad_settings(gen) -> None:
    empty, short = score_texts(gen, ["", "x"])
    assert empty.n_tokens == 0 and math.isnan(empty.perplexity)
    assert short.n_tokens == 1
    with pytest.raises(ValueError, match="no scored tokens"):
        perplexity([empty])
    with pytest.raises(ValueError, match="stride"):
        score_texts(gen, ["x"], stride=256)
    with pytest.raises(ValueError, match="stride"):
        score_texts(gen, ["x"], stride=0)
    with pytest.raises(ValueError, match="batch_size"):
        score_texts(gen, ["x"], batch_size=0)
    with pytest.raises(ValueError, match="mode"):
        score_texts(gen, ["x"], mode="fast")
    with pytest.raises(ValueError, match="list of strings"):
        score_texts(gen, "not a list")
    with pytest.raises(ValueError, match="token ids"):
        score_ids(gen.decoder, [[1, 50257]])
    with pytest.raises(ValueError, match="n_positions"):
        batch_logits(gen.decoder, [[1] * 257])
