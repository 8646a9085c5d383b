"""fast_load (no weight prepacking): same tokens as a normal load; refused where it would crawl."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import export_dir

from gpt2_onnx.runtime import TextGenerator

PROMPTS = ["Paris will", "The quick brown fox jumps over the lazy dog"]


def test_fast_load_gives_the_same_greedy_tokens(tiny_dir: Path) -> None:
    normal = TextGenerator.load(tiny_dir, device="cpu", threads=1)
    fast = TextGenerator.load(tiny_dir, device="cpu", threads=1, fast_load=True)
    want = [r.ids for r in normal.generate(PROMPTS, greedy=True, max_new_tokens=24)]
    got = [r.ids for r in fast.generate(PROMPTS, greedy=True, max_new_tokens=24)]
    assert got == want


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_dir(tmp_path_factory.mktemp("q") / "tiny-q", random_init="tiny",
                      precisions=("fp32", "fp32-fused", "int8"))


def test_fast_load_works_for_fused_fp32(quantized_dir: Path) -> None:
    normal = TextGenerator.load(quantized_dir, device="cpu", precision="fp32-fused", threads=1)
    fast = TextGenerator.load(quantized_dir, device="cpu", precision="fp32-fused", threads=1,
                              fast_load=True)
    kw = dict(greedy=True, max_new_tokens=16)
    assert fast.generate(PROMPTS[0], **kw).ids == normal.generate(PROMPTS[0], **kw).ids


def test_fast_load_refused_for_quantized_variants(quantized_dir: Path) -> None:
    with pytest.raises(ValueError, match="fast_load"):
        TextGenerator.load(quantized_dir, device="cpu", precision="int8", fast_load=True)


def test_cpu_default_prefers_the_fused_fp32_graph(quantized_dir: Path) -> None:
    assert TextGenerator.load(quantized_dir, device="cpu").precision == "fp32-fused"
