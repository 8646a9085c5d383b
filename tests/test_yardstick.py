"""The yardstick pipeline in miniature: train for seconds, export, score, measure quality.

bench/ holds scripts, not a package: they are loaded from their files here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_script(name: str):
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCH))  # quality.py imports train_yardstick beside it
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ty():
    return load_script("train_yardstick")


@pytest.fixture(scope="module")
def short_run(ty, tmp_path_factory) -> tuple[Path, dict]:
    """A seconds-long training run: 1 layer, width 32, 64 positions, 40 corpus files."""
    cfg = ty.TrainConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64, batch=4, lr=1e-2,
                         warmup_steps=3, steps=20, eval_tokens=1024,
                         max_files=40, bf16=False, threads=2)
    out = tmp_path_factory.mktemp("yardstick") / "ckpt"
    record = ty.train(cfg, out)
    return out, record


def test_corpus_is_sorted_stdlib_without_third_party_or_tests(ty) -> None:
    root = ty.stdlib_root()
    files = ty.corpus_files(root)
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert "os.py" in rel and "json/decoder.py" in rel
    assert not any({"site-packages", "dist-packages", "test", "tests"} & set(r.split("/")[:-1])
                   for r in rel)


def test_every_20th_file_is_held_out(ty) -> None:
    files = [Path(f"f{i:03d}.py") for i in range(45)]
    train, held = ty.split_files(files)
    assert held == [Path("f019.py"), Path("f039.py")]
    assert len(train) == 43 and not set(train) & set(held)


def test_learning_rate_warms_up_then_decays_to_the_floor(ty) -> None:
    cfg = ty.TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert ty.learning_rate(cfg, 0, 0.0) == pytest.approx(1e-4)
    assert ty.learning_rate(cfg, 9, 0.0) == pytest.approx(1e-3)
    assert ty.learning_rate(cfg, 50, 0.5) == pytest.approx(0.55e-3)
    assert ty.learning_rate(cfg, 99, 1.0) == pytest.approx(1e-4)


def test_short_run_learns_and_saves_a_checkpoint(short_run) -> None:
    out, record = short_run
    h = record["heldout"]
    assert record["steps"] == 20
    # random init is close to uniform over 50257 tokens; 20 steps learn at least the unigrams
    assert h["random_init_perplexity"] > 20000
    assert h["perplexity"] < h["random_init_perplexity"] / 10
    saved = json.loads((out / "yardstick.json").read_text())
    assert saved["heldout"]["sha256"] == h["sha256"] and len(h["files"]) == 2
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.json"):
        assert (out / name).is_file(), name


def test_short_run_exports_and_scores_like_its_training_eval(ty, short_run, tmp_path_factory):
    """The ONNX export of the checkpoint gives the held-out perplexity transformers gave."""
    from conftest import export_dir

    from gpt2_onnx.runtime.generator import TextGenerator
    from gpt2_onnx.runtime.scoring import perplexity, score_ids, score_texts

    ckpt, record = short_run
    model_dir = export_dir(tmp_path_factory.mktemp("yardstick-onnx") / "m", source=str(ckpt))
    gen = TextGenerator.load(model_dir, device="cpu", precision="fp32", threads=2)
    held = ty.heldout_tokens(record["heldout"]["files"])
    assert ty.tokens_sha256(held) == record["heldout"]["sha256"]
    chunks = ty.eval_chunks(held, 64, record["config"]["eval_tokens"])
    # transformers' loss on each chunk: the chunk's first token is context (add_bos=False)
    scores = score_ids(gen.decoder, chunks.tolist(), add_bos=False)
    assert perplexity(scores) == pytest.approx(record["heldout"]["perplexity"], rel=1e-4)
    # and it is a peaked model on Python source, not on other text
    (code,) = score_texts(gen, ["import os\nimport sys\n\n\ndef main():\n    return 0\n"])
    assert math.isfinite(code.perplexity) and code.perplexity < 2000

    quality = load_script("quality")
    rec = quality.measure(model_dir, ckpt, ["fp32"], tokens=512, prompts=2, prompt_tokens=16,
                          device="cpu", threads=2, log=lambda m: None)
    torch_row, onnx_row = rec["variants"]
    assert torch_row["name"] == "pytorch-fp32" and onnx_row["name"] == "fp32"
    assert onnx_row["perplexity"] == pytest.approx(torch_row["perplexity"], rel=1e-5)
    assert abs(onnx_row["ppl_change"]) < 1e-5
    assert onnx_row["top1_heldout"] >= 0.99 and onnx_row["mean_kl"] < 1e-8
    assert rec["method"]["greedy_steps_total"] == 2 * (64 - 16)
    assert "| fp32 |" in quality.markdown(rec)
    assert np.isfinite(onnx_row["max_kl"])


def test_the_committed_yardstick_is_what_its_recorded_command_trains(ty, tmp_path) -> None:
    """Replay the first steps of the recorded command: same corpus, same seed, same losses.

    bench/results/quality.json keeps the command line, every setting and the first losses of the
    run behind the committed table; a rerun of that command must retrace them (to float rounding:
    another thread count sums in another order). Warm-up steps do not depend on the step count,
    so three steps replay the first three of the full run."""
    record = json.loads((BENCH / "results" / "quality.json").read_text())["yardstick"]
    assert record["command"].startswith("python bench/train_yardstick.py ")
    settings = dict(record["config"])
    cfg = ty.TrainConfig(**settings)
    assert cfg == ty.parse_args(record["command"].split()[2:])[0]  # the command gives them
    steps = 3
    assert cfg.warmup_steps >= steps
    replay = ty.train(ty.TrainConfig(**(settings | {"steps": steps, "eval_tokens": 256})),
                      tmp_path / "ckpt")
    if replay["train_sha256"] != record["train_sha256"]:
        pytest.skip("another Python standard library: the corpus differs from the recorded one")
    assert replay["losses"] == pytest.approx(record["first_losses"][:steps], rel=2e-4)
    # and the losses move: the replay is not comparing a constant
    assert replay["losses"][0] > replay["losses"][2]
