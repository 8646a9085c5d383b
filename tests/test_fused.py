"""The fused GroupQueryAttention graph (export/fused.py) and its decoder (runtime/shared_kv.py)
against transformers on tiny random GPT-2 models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from gpt2_onnx.export import fused, graph_edit  # noqa: E402
from gpt2_onnx.runtime.manifest import ModelDims  # noqa: E402
from gpt2_onnx.runtime.shared_kv import SharedKVDecoder  # noqa: E402

VOCAB = 50257
SHAPES = {"tiny": (2, 4, 64), "odd": (3, 6, 96)}  # n_layer, n_head, n_embd
STEPS = 32


def _model(shape: str) -> transformers.GPT2LMHeadModel:
    n_layer, n_head, n_embd = SHAPES[shape]
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                     n_positions=128, vocab_size=VOCAB)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def models() -> dict[str, transformers.GPT2LMHeadModel]:
    return {name: _model(name) for name in SHAPES}


@pytest.fixture(scope="module")
def decoders(models, tmp_path_factory) -> dict[tuple[str, str], SharedKVDecoder]:
    """(shape, precision) -> decoder over a freshly exported graph."""
    out = {}
    for shape, model in models.items():
        for precision in fused.PRECISIONS:
            model_dir = tmp_path_factory.mktemp(f"{shape}-{precision}")
            out[shape, precision] = _decoder(model, model_dir, precision)
    return out


def _decoder(model, model_dir: Path, precision: str) -> SharedKVDecoder:
    variant = fused.build_fused_graph(model, model_dir, precision)
    session = ort.InferenceSession(str(model_dir / variant.graph),
                                   providers=["CPUExecutionProvider"])
    c = model.config
    dims = ModelDims(c.n_layer, c.n_head, c.n_embd // c.n_head, c.n_embd, c.n_positions,
                     c.vocab_size, c.bos_token_id, c.eos_token_id)
    return SharedKVDecoder(session, dims, variant)


def _prompts(lengths: list[int], seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n) for n in lengths]


def _left_pad(prompts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, mask, position_ids [batch, longest] as the generation loop builds them."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


def _greedy(decoder: SharedKVDecoder, prompts: list[np.ndarray], steps: int) -> np.ndarray:
    """Greedy tokens [batch, steps] through the Decoder protocol, left-padded like the loop."""
    ids, mask, positions = _left_pad(prompts)
    cache = decoder.start(len(prompts), ids.shape[1] + steps)
    logits, cache = decoder.forward(cache, ids, mask, positions)
    out = []
    for _ in range(steps):
        token = logits.argmax(axis=-1)  # [batch]
        out.append(token)
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        logits, cache = decoder.forward(cache, token[:, None], mask, positions)
    return np.stack(out, axis=1)


def _hf_greedy(model, prompt: np.ndarray, steps: int) -> np.ndarray:
    ids = torch.from_numpy(prompt[None])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0)
    return out[0, len(prompt):].numpy()


def _hf_logits(model, prompt: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(prompt[None])).logits[0].numpy()  # [seq, vocab]


@pytest.mark.parametrize("shape", SHAPES)
def test_prefill_logits_match_transformers(models, decoders, shape):
    decoder, prompts = decoders[shape, "fp32"], _prompts([11, 4, 7])
    ids, mask, positions = _left_pad(prompts)
    last, _ = decoder.forward(decoder.start(3, 16), ids, mask, positions)
    full, _ = decoder.forward(decoder.start(3, 16), ids, mask, positions, all_logits=True)
    assert last.shape == (3, VOCAB) and full.shape == (3, 11, VOCAB)
    for row, p in enumerate(prompts):
        ref = _hf_logits(models[shape], p)  # [len, vocab]
        np.testing.assert_allclose(last[row], ref[-1], atol=1e-4, rtol=0)
        np.testing.assert_allclose(full[row, 11 - len(p):], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_matches_generate_and_batch_matches_single(models, decoders, shape):
    decoder, prompts = decoders[shape, "fp32"], _prompts([9, 3, 14])
    batch = _greedy(decoder, prompts, STEPS)
    for row, p in enumerate(prompts):
        expected = _hf_greedy(models[shape], p, STEPS)
        np.testing.assert_array_equal(_greedy(decoder, [p], STEPS)[0], expected)
        np.testing.assert_array_equal(batch[row], expected)


def test_several_new_tokens_after_prefill(models, decoders):
    """seq > 1 over a past (fed one token at a time inside) gives transformers' logits."""
    decoder, (p,) = decoders["tiny", "fp32"], _prompts([10])
    cache = decoder.start(1, 16)
    _, cache = decoder.forward(cache, p[None, :6], np.ones((1, 6), np.int64), np.arange(6)[None])
    logits, cache = decoder.forward(cache, p[None, 6:], np.ones((1, 10), np.int64),
                                    np.arange(6, 10)[None], all_logits=True)
    np.testing.assert_allclose(logits[0], _hf_logits(models["tiny"], p)[6:], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(cache.lengths, [10])


# Teacher-forced top-1 agreement with transformers over 8 x 40 positions, measured on these two
# random models (tiny / odd): int8 0.98 / 1.0, int4 0.92 / 0.91; max |logit diff| int8 0.011 /
# 0.014, int4 0.08 / 0.13. Random weights give near-flat logits, so these are loose floors.
MIN_TOP1 = {"int8": 0.95, "int4": 0.85}
MAX_DIFF = {"int8": 0.05, "int4": 0.3}


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantized_variants_track_transformers(models, decoders, shape, precision):
    decoder = decoders[shape, precision]
    ids = np.stack(_prompts([40] * 8, seed=2))  # [8, 40]
    logits, _ = decoder.forward(decoder.start(8, 40), ids, np.ones_like(ids),
                                np.tile(np.arange(40), (8, 1)), all_logits=True)
    with torch.no_grad():
        ref = models[shape](torch.from_numpy(ids)).logits.numpy()  # [8, 40, vocab]
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= MIN_TOP1[precision]
    assert np.abs(logits - ref).max() <= MAX_DIFF[precision]
    # and greedy decoding runs, batched == single
    prompts = _prompts([5, 12])
    batch = _greedy(decoder, prompts, 8)
    for row, p in enumerate(prompts):
        np.testing.assert_array_equal(batch[row], _greedy(decoder, [p], 8)[0])


def test_external_data_file(models, tmp_path, monkeypatch):
    """Large models stream their weights into model-<precision>.onnx.data; same logits."""
    monkeypatch.setattr(graph_edit, "EXTERNAL_DATA_BYTES", 0)
    decoder = _decoder(models["tiny"], tmp_path, "fp32")
    assert decoder.variant.data == ("model-fp32.onnx.data",)
    assert (tmp_path / "model-fp32.onnx").stat().st_size < 100_000
    (p,) = _prompts([6])
    logits, _ = decoder.forward(decoder.start(1, 8), p[None], np.ones((1, 6), np.int64),
                                np.arange(6)[None])
    np.testing.assert_allclose(logits[0], _hf_logits(models["tiny"], p)[-1], atol=1e-4, rtol=0)


def test_limits_and_bad_input_raise(decoders):
    decoder = decoders["tiny", "fp32"]
    with pytest.raises(ValueError, match="max_len"):
        decoder.start(1, 129)
    cache = decoder.start(1, 4)
    with pytest.raises(ValueError, match="max_len 4"):
        decoder.forward(cache, np.zeros((1, 5), np.int64), np.ones((1, 5), np.int64),
                        np.arange(5)[None])
    with pytest.raises(ValueError, match="left padding"):
        decoder.forward(decoder.start(1, 8), np.zeros((1, 3), np.int64),
                        np.array([[1, 0, 1]]), np.arange(3)[None])
    cache = decoder.start(1, 8)
    _, cache = decoder.forward(cache, np.zeros((1, 3), np.int64), np.ones((1, 3), np.int64),
                               np.arange(3)[None])
    with pytest.raises(ValueError, match="does not match the cache"):
        decoder.forward(cache, np.zeros((1, 1), np.int64), np.ones((1, 5), np.int64),
                        np.array([[3]]))
    with pytest.raises(ValueError, match="precision"):
        fused.build_fused_graph(None, Path("/nonexistent"), "int3")


# --------------------------------------------------------------------------- fp16-fused


@pytest.fixture(scope="module")
def half_decoders(models, tmp_path_factory) -> dict[str, tuple[SharedKVDecoder, Path]]:
    """shape -> (decoder, graph file) of the fp16-fused graph (onnxruntime's CPU provider runs
    it: ops it has no fp16 kernel for run in fp32 between inserted casts)."""
    out = {}
    for shape, model in models.items():
        model_dir = tmp_path_factory.mktemp(f"{shape}-fp16-fused")
        variant = fused.build_fp16_fused_variant(model, model_dir)
        session = ort.InferenceSession(str(model_dir / variant.graph),
                                       providers=["CPUExecutionProvider"])
        c = model.config
        dims = ModelDims(c.n_layer, c.n_head, c.n_embd // c.n_head, c.n_embd, c.n_positions,
                         c.vocab_size, c.bos_token_id, c.eos_token_id)
        out[shape] = SharedKVDecoder(session, dims, variant), model_dir / variant.graph
    return out


def test_fp16_fused_graph_keeps_layernorm_and_residuals_fp32(half_decoders):
    import onnx
    from onnx import TensorProto

    decoder, path = half_decoders["odd"]
    variant = decoder.variant
    assert (variant.precision, variant.dtype, variant.io.kv_layout) == ("fp16-fused", "float16",
                                                                       "shared")
    proto = onnx.load(str(path))
    g = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    n_layer = SHAPES["odd"][0]
    for name in [*variant.io.kv_inputs(n_layer), *variant.io.kv_outputs(n_layer)]:
        assert types[name] == TensorProto.FLOAT16, name
    assert types["logits"] == TensorProto.FLOAT
    nodes = list(g.node)
    by_output = {o: n for n in nodes for o in n.output}
    gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == n_layer
    assert all(types[n.input[i]] == TensorProto.FLOAT16 for n in gqa for i in range(5))
    lns = [n for n in nodes if n.op_type == "LayerNormalization"]
    assert len(lns) == 2 * n_layer + 1
    for n in lns:  # fp32 in, straight from a residual Add (no fp16 round trip)
        assert types[n.input[0]] == TensorProto.FLOAT and by_output[n.input[0]].op_type == "Add"
        assert types[n.output[0]] == TensorProto.FLOAT
    for n in (by_output[ln.input[0]] for ln in lns):
        assert all(types[x] == TensorProto.FLOAT for x in [*n.input, *n.output]), n.name
    weights = [n.input[1] for n in nodes if n.op_type == "MatMul" and n.input[1] in types
               and any(t.name == n.input[1] for t in g.initializer)]
    assert weights and all(types[w] == TensorProto.FLOAT16 for w in weights)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp16_fused_tracks_transformers(models, half_decoders, shape):
    """Prefill logits within fp16 rounding of transformers fp32, >= 97 % top-1 over 8 x 40
    positions, finite everywhere; a left-padded batch decodes as each prompt alone."""
    decoder, _ = half_decoders[shape]
    ids = np.stack(_prompts([40] * 8, seed=2))  # [8, 40]
    logits, _ = decoder.forward(decoder.start(8, 40), ids, np.ones_like(ids),
                                np.tile(np.arange(40), (8, 1)), all_logits=True)
    with torch.no_grad():
        ref = models[shape](torch.from_numpy(ids)).logits.numpy()  # [8, 40, vocab]
    assert np.isfinite(logits).all()
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.97
    assert np.abs(logits - ref).max() <= 0.1
    prompts = _prompts([5, 12])
    batch = _greedy(decoder, prompts, 8)
    for row, p in enumerate(prompts):
        np.testing.assert_array_equal(batch[row], _greedy(decoder, [p], 8)[0])


def test_fp16_fused_export_passes_verify_on_cpu(tmp_path):
    """`export --precision fp32,fp16-fused` runs the real verify (on CPU) and it passes."""
    from conftest import export_dir

    from gpt2_onnx.runtime.manifest import read_manifest

    out = export_dir(tmp_path / "tiny", random_init="tiny", precisions=("fp32", "fp16-fused"),
                     verify=True)
    manifest = read_manifest(out)
    assert manifest.verify["passed"] is True
    rows = [r for r in manifest.verify["checks"] if r["variant"] == "fp16-fused"]
    assert {r["check"] for r in rows if r["status"] == "pass"} == {
        "logits-prefill", "logits-decode", "greedy-tokens", "cache-vs-recompute",
        "batch-vs-single"}
    assert not list(out.glob(".fp16-fused-src*"))  # the fp32 scratch graph is gone


# ------------------------------------------------------------------------- quantization recipes


def test_mixed_recipe_picks_llama_cpp_q4_k_m_layers():
    """8-bit attention-output and MLP-down weights in the first and last eighth of the layers
    and every third layer (hand-listed for 36 layers); every other weight 4-bit."""
    recipe = fused.QuantRecipe(bits=4, mixed=True)
    eight = {i for i in range(36) if recipe.bits_of(i, 36, "mlp.c_proj") == 8}
    assert eight == {0, 1, 2, 3, 32, 33, 34, 35, 5, 8, 11, 14, 17, 20, 23, 26, 29}
    assert all(recipe.bits_of(i, 36, "attn.c_proj") == (8 if i in eight else 4)
               for i in range(36))
    assert {recipe.bits_of(i, 36, k) for i in range(36) for k in ("attn.c_attn", "mlp.c_fc")} \
        == {4}
    assert fused.QuantRecipe(bits=4).bits_of(0, 36, "mlp.c_proj") == 4


def _nbits_nodes(model_dir: Path, graph: str) -> dict[str, tuple[int, int]]:
    """MatMulNBits node name -> (bits, number of inputs) of a written graph."""
    import onnx

    proto = onnx.load(str(model_dir / graph), load_external_data=False)
    return {n.name: ({a.name: a.i for a in n.attribute}["bits"], len(n.input))
            for n in proto.graph.node if n.op_type == "MatMulNBits"}


PLAIN_INT4 = fused.QuantRecipe(bits=4)  # block 32, symmetric, round to nearest: the old int4


@pytest.mark.parametrize("recipe", [fused.QuantRecipe(bits=4, mixed=True),
                                    fused.QuantRecipe(bits=4, symmetric=False),
                                    fused.QuantRecipe(bits=4, method="hqq"),
                                    fused.RECIPES["int4"]],
                         ids=["mixed", "asymmetric", "hqq", "default"])
def test_recipes_build_what_they_say_and_track_transformers(models, tmp_path, recipe):
    """On the 3-layer shape: the mixed recipe writes 8-bit c_proj weights in layers 0 and 2 only
    (edge layers; 2 is also a third layer), keep_8bit adds its kinds in every layer, asymmetric
    and HQQ recipes feed zero points; all stay within int4's bounds against transformers, and
    those that spend more bits or optimise their scales are closer than plain block-32 int4."""
    model = models["odd"]
    variant = fused.build_fused_graph(model, tmp_path, "int4", recipe=recipe)
    nodes = _nbits_nodes(tmp_path, variant.graph)
    zero_points = not recipe.symmetric or recipe.method == "hqq"
    for name, (bits, n_inputs) in nodes.items():
        layer = int(name.split(".")[1]) if name.startswith("h.") else None
        want = 8 if name == "lm_head/MatMulNBits" else recipe.bits_of(
            layer, 3, name.split(".", 2)[2].split("/")[0])
        assert bits == want, name
        # zero points: an input beside data and scales (the 8-bit table stays symmetric)
        assert n_inputs == (4 if zero_points and not name.startswith("lm_head") else 3), name
    eight = {n for n, (b, _) in nodes.items() if b == 8 and n.startswith("h.")}
    if recipe.mixed:
        assert {"h.0.attn.c_proj/MatMulNBits", "h.0.mlp.c_proj/MatMulNBits",
                "h.2.attn.c_proj/MatMulNBits", "h.2.mlp.c_proj/MatMulNBits"} <= eight
        assert "h.1.mlp.c_proj/MatMulNBits" not in eight
    assert ("h.1.attn.c_proj/MatMulNBits" in eight) == ("attn.c_proj" in recipe.keep_8bit)
    c = model.config
    dims = ModelDims(c.n_layer, c.n_head, c.n_embd // c.n_head, c.n_embd, c.n_positions,
                     c.vocab_size, c.bos_token_id, c.eos_token_id)
    ids = np.stack(_prompts([40] * 8, seed=2))  # [8, 40]

    def logits_of(folder: Path, built: fused.Variant) -> np.ndarray:
        session = ort.InferenceSession(str(folder / built.graph),
                                       providers=["CPUExecutionProvider"])
        dec = SharedKVDecoder(session, dims, built)
        out, _ = dec.forward(dec.start(8, 40), ids, np.ones_like(ids),
                             np.tile(np.arange(40), (8, 1)), all_logits=True)
        return out

    got = logits_of(tmp_path, variant)
    plain_dir = tmp_path / "plain"
    plain = logits_of(plain_dir, fused.build_fused_graph(model, plain_dir, "int4",
                                                         recipe=PLAIN_INT4))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()  # [8, 40, vocab]
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= MIN_TOP1["int4"]
    assert np.abs(got - ref).max() <= MAX_DIFF["int4"]
    if recipe.mixed or recipe.method == "hqq":
        assert np.abs(got - ref).mean() < np.abs(plain - ref).mean()


def test_recipe_settings_are_checked():
    with pytest.raises(ValueError, match="unknown linear kind"):
        fused.QuantRecipe(bits=4, keep_8bit=("mlp.c_up",))
    with pytest.raises(ValueError, match="method"):
        fused.QuantRecipe(bits=4, method="gptq")


def test_fp32_takes_no_recipe(models, tmp_path):
    with pytest.raises(ValueError, match="recipe"):
        fused.build_fused_graph(models["tiny"], tmp_path, "fp32", recipe=fused.RECIPES["int4"])
