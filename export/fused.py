"""GPT-2 written directly as an ONNX graph around com.microsoft.GroupQueryAttention.

The graph reads and writes one preallocated KV buffer per layer in place (kv_layout "shared"): the
runtime binds the same OrtValue as past_key.{i} and present_key.{i}, so a decode step copies no
cache. Only the rows named by `logits_index` reach the lm_head (the last position while
generating), so a long prefill does not pay for [seq, vocab] logits.

Weights are streamed: each tensor is converted, optionally block-quantized (onnxruntime's own
MatMulNBits quantizer, one tensor at a time) and appended to the external data file, so the
export holds the transformers model plus one tensor, never a second full copy.

Graph inputs (int64 unless noted):
  input_ids [batch, seq], position_ids [batch, seq]       -- right-padded rows (see shared_kv.py)
  seqlens_k int32 [batch]                                  -- per row: total length - 1
  total_sequence_length int32 []                           -- longest row's total length
  logits_index [batch, rows]                               -- positions in `seq` to compute logits
  past_key.{i} / past_value.{i} f32 [batch, n_head, max_len, head_dim]
Graph outputs: logits f32 [batch, rows, vocab]; present_key.{i} / present_value.{i} (the buffers).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpt2_onnx.export import graph_edit
from gpt2_onnx.runtime import variants
from gpt2_onnx.runtime.manifest import Variant, VariantIO

PRECISIONS = ("fp32", "int8", "int4")
OPSET = 17  # LayerNormalization
IR_VERSION = 8  # what onnxruntime 1.20+ loads; the graph uses no newer types
# Parameters above graph_edit.EXTERNAL_DATA_BYTES go to `<graph>.data` (protobuf: 2 GB); tensors
# under graph_edit.INLINE_MAX_BYTES stay in the .onnx file even then (read at call time).

LINEAR_KINDS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass(frozen=True)
class QuantRecipe:
    """Weight-only quantization of the fused graph's matmuls (onnxruntime's MatMulNBits).

    Measured on random gpt2-large and the trained yardstick: bench/int4_recipes.py,
    bench/results/int4_recipes.md.
    """

    bits: int  # 4 or 8: every linear layer, except what `mixed` keeps in 8 bits
    block_size: int = 32  # weights per scale (smaller: finer, larger file)
    symmetric: bool = True  # False stores a zero point per block as well
    # "rtn": round to nearest (onnxruntime's default quantizer); "hqq": onnxruntime's HQQ
    # quantizer (half-quadratic optimised scale and float zero point per block; asymmetric)
    method: str = "rtn"
    accuracy_level: int = 4  # 4: int8 activations on VNNI/AMX kernels; 0: fp32 activations
    table_bits: int = 8  # the shared token table (embedding + lm_head): 8-bit even for int4
    # llama.cpp Q4_K_M's rule: 8-bit attention output and MLP down projections in the first and
    # last eighth of the layers and in every third layer.
    mixed: bool = False
    # linear kinds kept in 8 bits in every layer (of attn.c_attn, attn.c_proj, mlp.c_fc,
    # mlp.c_proj)
    keep_8bit: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in ("rtn", "hqq"):
            raise ValueError(f"method {self.method!r}: choose rtn or hqq")
        unknown = set(self.keep_8bit) - set(LINEAR_KINDS)
        if unknown:
            raise ValueError(f"keep_8bit: unknown linear kind(s) {sorted(unknown)}; "
                             f"choose from {', '.join(LINEAR_KINDS)}")

    def bits_of(self, layer: int, n_layer: int, kind: str) -> int:
        """Bits of one linear layer's weights; kind: one of LINEAR_KINDS."""
        if kind in self.keep_8bit:
            return 8
        if not self.mixed or kind not in ("attn.c_proj", "mlp.c_proj"):
            return self.bits
        edge = max(1, n_layer // 8)
        return 8 if layer < edge or layer >= n_layer - edge or layer % 3 == 2 else self.bits


# The recipe each quantized weight precision gets by default (chosen by measurement: see
# QuantRecipe). fp32 weights take none. int4: the smallest recipe measured that keeps random
# gpt2-large within 4-bit's quality bar (mean KL <= 0.01 nats, i.e. <= 1 % perplexity; plain
# block-32 round-to-nearest measures 0.018 there): 4-bit weights in blocks of 16 with a zero
# point each, 8-bit attention output projections in every layer, and llama.cpp Q4_K_M's 8-bit
# MLP down projections (`mixed`).
RECIPES = {
    "int8": QuantRecipe(bits=8),
    "int4": QuantRecipe(bits=4, block_size=16, symmetric=False, mixed=True,
                        keep_8bit=("attn.c_proj",)),
}

FUSED_IO = VariantIO(
    input_ids="input_ids",
    attention_mask="",  # the graph takes no mask: row lengths arrive as seqlens_k
    position_ids="position_ids",
    logits="logits",
    past_key="past_key.{i}",
    past_value="past_value.{i}",
    present_key="present_key.{i}",
    present_value="present_value.{i}",
    kv_layout="shared",
    logits_rows="last",
    extra_inputs={
        "seqlens_k": "seqlens_k",
        "total_sequence_length": "total_sequence_length",
        "logits_index": "logits_index",
    },
)


@dataclass
class _Graph:
    """Nodes and initializers of the graph being built, with weights streamed to `data_path`."""

    precision: str
    data_path: Path | None  # None: initializers stay inside the .onnx file
    recipe: QuantRecipe | None = None  # None: float32 weights
    n_layer: int = 0
    nodes: list[Any] = field(default_factory=list)
    initializers: list[Any] = field(default_factory=list)
    _data: Any = None  # open file handle of the external data file
    _offset: int = 0

    def __enter__(self) -> _Graph:
        if self.data_path is not None:
            self._data = open(self.data_path, "wb")  # closed in __exit__
        return self

    def __exit__(self, *exc: object) -> None:
        if self._data is not None:
            self._data.close()

    def node(self, op: str, inputs: list[str], outputs: list[str] | str, name: str,
             domain: str = "", **attrs: Any) -> str:
        """Append one node; returns its (first) output name."""
        from onnx import helper

        outs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0]

    def weight(self, name: str, array: np.ndarray) -> str:
        """Store `array` as an initializer (appended to the data file when external)."""
        from onnx import TensorProto, numpy_helper

        array = np.ascontiguousarray(array)
        # Shape constants stay inline: onnxruntime's shape inference cannot read external ones.
        if self._data is None or array.nbytes < graph_edit.INLINE_MAX_BYTES:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = _onnx_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        pad = -self._offset % 64  # align each tensor so onnxruntime can map it directly
        self._data.write(b"\0" * pad)
        self._offset += pad
        self._data.write(array.data)  # no copy: contiguous
        for key, val in (("location", self.data_path.name), ("offset", str(self._offset)),
                         ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, val
        self._offset += array.nbytes
        self.initializers.append(tensor)
        return name

    def const(self, name: str, values: list[int]) -> str:
        return self.weight(name, np.asarray(values, dtype=np.int64))


def _onnx_dtype(dtype: np.dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _numpy(tensor: Any) -> np.ndarray:
    """A torch parameter as float32 numpy (shares memory when already float32 and contiguous)."""
    import torch

    return tensor.detach().to(torch.float32).contiguous().numpy()


def _linear(g: _Graph, x: str, w: np.ndarray, b: np.ndarray | None, name: str) -> str:
    """x @ w (+ b); w is [in, out] (GPT-2's Conv1D layout); name "h.{i}.<kind>". Block-quantized
    per the recipe unless the weights are float32."""
    if g.recipe is None:
        y = g.node("MatMul", [x, g.weight(f"{name}.weight", w)], f"{name}/mm", f"{name}/MatMul")
    else:
        _, layer, kind = name.split(".", 2)
        bits = g.recipe.bits_of(int(layer), g.n_layer, kind)
        y = _matmul_nbits(g, x, _quantize(g, w, f"{name}.weight", bits), name)
    if b is None:
        return y
    return g.node("Add", [y, g.weight(f"{name}.bias", b)], f"{name}/out", f"{name}/Add")


@dataclass(frozen=True)
class _Quantized:
    """Names of a block-quantized weight [K, N] stored as MatMulNBits wants it."""

    data: str  # uint8 [N, K / block, block * bits / 8]
    scales: str  # float32 [N, K / block]
    zero_points: str | None  # uint8, packed; None when symmetric (implicit 2^(bits-1))
    k: int
    n: int
    bits: int


def _quantize(g: _Graph, w: np.ndarray, name: str, bits: int,
              symmetric: bool | None = None) -> _Quantized:
    """Block-quantize w [K, N] with onnxruntime's own MatMulNBits quantizer (one tensor);
    symmetric: None follows the recipe."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    recipe = g.recipe
    assert recipe is not None  # only quantized graphs call this
    if recipe.method == "hqq" and symmetric is None:
        return _quantize_hqq(g, w, name, bits)
    symmetric = recipe.symmetric if symmetric is None else symmetric
    config = DefaultWeightOnlyQuantConfig(block_size=recipe.block_size,
                                          is_symmetric=symmetric,
                                          accuracy_level=recipe.accuracy_level, bits=bits)
    # The C++ kernel reads the buffer as C order whatever the strides: pass a contiguous array.
    packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(w))
    k, n = w.shape
    zp = None if symmetric else g.weight(f"{name}_zp", zero_points)
    return _Quantized(g.weight(f"{name}_Q{bits}", packed), g.weight(f"{name}_scales", scales),
                      zp, k, n, bits)


def _quantize_hqq(g: _Graph, w: np.ndarray, name: str, bits: int) -> _Quantized:
    """Block-quantize w [K, N] with onnxruntime's HQQ quantizer: per block a scale and a float
    zero point chosen by half-quadratic optimisation (needs torch, as export does)."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        HQQWeightOnlyQuantConfig,
        HQQWeightOnlyQuantizer,
    )

    assert g.recipe is not None
    block = g.recipe.block_size
    k, n = w.shape
    if k % block:
        raise ValueError(f"{name}: K={k} is not a multiple of block_size {block}")
    quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block, bits=bits))
    q, scales, zeros = quantizer.quantize_internal(torch.from_numpy(np.ascontiguousarray(w)).T,
                                                   bits=bits, group_size=block)  # q [N, K]
    per_byte = 8 // bits
    packed = torch.zeros((n, k // per_byte), dtype=torch.uint8)
    quantizer.pack_on_row_fast_248bit(packed, q.contiguous(), bits)
    packed = packed.numpy().reshape(n, k // block, block // per_byte)  # [N, K/block, blob]
    scales = scales.numpy().astype(np.float32).reshape(-1)  # [N * K / block]
    zeros = zeros.numpy().astype(np.float32).reshape(-1)
    return _Quantized(g.weight(f"{name}_Q{bits}", packed), g.weight(f"{name}_scales", scales),
                      g.weight(f"{name}_zp", zeros), k, n, bits)


def _matmul_nbits(g: _Graph, x: str, q: _Quantized, name: str) -> str:
    assert g.recipe is not None
    inputs = [x, q.data, q.scales] + ([q.zero_points] if q.zero_points else [])
    return g.node("MatMulNBits", inputs, f"{name}/mm", f"{name}/MatMulNBits",
                  domain="com.microsoft", K=q.k, N=q.n, bits=q.bits,
                  block_size=g.recipe.block_size, accuracy_level=g.recipe.accuracy_level)


def _layer_norm(g: _Graph, x: str, ln: Any, eps: float, name: str) -> str:
    return g.node("LayerNormalization",
                  [x, g.weight(f"{name}.weight", _numpy(ln.weight)),
                   g.weight(f"{name}.bias", _numpy(ln.bias))],
                  f"{name}/out", f"{name}/LayerNorm", axis=-1, epsilon=eps)


def _activation(g: _Graph, x: str, function: str, name: str) -> str:
    """GPT-2's MLP activation: gelu_new (tanh approximation) -> FastGelu; exact gelu -> Gelu."""
    if function in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return g.node("FastGelu", [x], f"{name}/out", f"{name}/FastGelu", domain="com.microsoft")
    if function == "gelu":
        return g.node("Gelu", [x], f"{name}/out", f"{name}/Gelu", domain="com.microsoft")
    if function == "relu":
        return g.node("Relu", [x], f"{name}/out", f"{name}/Relu")
    raise ValueError(f"activation_function {function!r} is not supported by the fused graph "
                     "(supported: gelu_new, gelu_pytorch_tanh, gelu_fast, gelu, relu)")


def _attention_scale(config: Any, layer: int) -> float:
    head_dim = config.n_embd // config.n_head
    scale = 1.0 / math.sqrt(head_dim) if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scale /= layer + 1
    return scale


def _block(g: _Graph, x: str, block: Any, config: Any, i: int) -> str:
    """One transformer block; x is the residual stream [batch, seq, n_embd]."""
    eps, p = config.layer_norm_epsilon, f"h.{i}"
    h = _layer_norm(g, x, block.ln_1, eps, f"{p}.ln_1")
    qkv = _linear(g, h, _numpy(block.attn.c_attn.weight), _numpy(block.attn.c_attn.bias),
                  f"{p}.attn.c_attn")
    q, k, v = (f"{p}.attn/{t}" for t in "qkv")
    g.node("Split", [qkv, g.const(f"{p}.attn.split", [config.n_embd] * 3)], [q, k, v],
           f"{p}.attn/Split", axis=-1)
    attn = g.node(
        "GroupQueryAttention",
        [q, k, v, f"past_key.{i}", f"past_value.{i}", "seqlens_k", "total_sequence_length"],
        [f"{p}.attn/out", f"present_key.{i}", f"present_value.{i}"],
        f"{p}.attn/GroupQueryAttention", domain="com.microsoft",
        num_heads=config.n_head, kv_num_heads=config.n_head, scale=_attention_scale(config, i),
    )
    attn = _linear(g, attn, _numpy(block.attn.c_proj.weight), _numpy(block.attn.c_proj.bias),
                   f"{p}.attn.c_proj")
    x = g.node("Add", [x, attn], f"{p}/res1", f"{p}/Add1")
    h = _layer_norm(g, x, block.ln_2, eps, f"{p}.ln_2")
    h = _linear(g, h, _numpy(block.mlp.c_fc.weight), _numpy(block.mlp.c_fc.bias),
                f"{p}.mlp.c_fc")
    h = _activation(g, h, config.activation_function, f"{p}.mlp.act")
    h = _linear(g, h, _numpy(block.mlp.c_proj.weight), _numpy(block.mlp.c_proj.bias),
                f"{p}.mlp.c_proj")
    return g.node("Add", [x, h], f"{p}/res2", f"{p}/Add2")


def _embed_tokens(g: _Graph, wte: np.ndarray) -> _Quantized | None:
    """Token embeddings [batch, seq, n_embd] -> "embed/tok"; returns the quantized table if any.

    wte is stored once and shared with the lm_head. fp32: a plain Gather (the lm_head reads the
    same initializer). Quantized: wte [V, E] is already MatMulNBits'
    [N, K] layout, so its quantized bytes serve both the lm_head's MatMulNBits and, reshaped to
    [V, E * bits / 8], a GatherBlockQuantized for the embedding.
    """
    if g.recipe is None:
        g.node("Gather", [g.weight("wte", wte), "input_ids"], "embed/tok", "embed/GatherTok",
               axis=0)
        return None
    # Symmetric whatever the recipe: GatherBlockQuantized then needs no zero points.
    q = _quantize(g, wte.T, "wte", g.recipe.table_bits, symmetric=True)
    rows = g.node("Reshape", [q.data, g.const("wte.row_shape", [q.n, -1])], "wte/rows",
                  "embed/Rows")
    g.node("GatherBlockQuantized", [rows, "input_ids", q.scales], "embed/tok",
           "embed/GatherBlockQuantized", domain="com.microsoft", gather_axis=0, quantize_axis=1,
           block_size=g.recipe.block_size, bits=q.bits)
    return q


def _lm_head(g: _Graph, h: str, wte_q: _Quantized | None) -> str:
    """Logits [batch, rows, vocab] of the gathered rows h [batch, rows, n_embd].

    float32: MatMul(h, Transpose(wte)) over the embedding's own initializer. onnxruntime folds the
    Transpose at load, and the folded copy replaces the prepacked one Gemm(transB=1) would make:
    same RSS, one table in the file, and faster (measured on gpt2-large: 3.9 vs 3.3 tok/s).
    """
    if wte_q is not None:
        return g.node("Identity", [_matmul_nbits(g, h, wte_q, "lm_head")], "logits",
                      "lm_head/Identity")
    wte_t = g.node("Transpose", ["wte"], "wte/T", "lm_head/Transpose", perm=[1, 0])
    return g.node("MatMul", [h, wte_t], "logits", "lm_head/MatMul")


def _graph_io(config: Any) -> tuple[list[Any], list[Any]]:
    from onnx import TensorProto, helper

    hd = config.n_embd // config.n_head
    kv = ["batch", config.n_head, "max_len", hd]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["batch", "rows"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch", "rows", config.vocab_size])]
    for i in range(config.n_layer):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", TensorProto.FLOAT, kv))
            outputs.append(
                helper.make_tensor_value_info(f"present_{kind}.{i}", TensorProto.FLOAT, kv))
    return inputs, outputs


def _build_nodes(g: _Graph, model: Any) -> None:
    config, tr = model.config, model.transformer
    wte_q = _embed_tokens(g, _numpy(tr.wte.weight))  # wte [vocab, n_embd]
    g.weight("wpe", _numpy(tr.wpe.weight))  # [n_positions, n_embd]
    pos = g.node("Gather", ["wpe", "position_ids"], "embed/pos", "embed/GatherPos", axis=0)
    x = g.node("Add", ["embed/tok", pos], "embed/out", "embed/Add")
    for i, block in enumerate(tr.h):
        x = _block(g, x, block, config, i)
    x = _layer_norm(g, x, tr.ln_f, config.layer_norm_epsilon, "ln_f")
    # Only the requested positions go on: [batch, seq, E] -> [batch, rows, E].
    index = g.node("Unsqueeze", ["logits_index", g.const("gather.axes", [-1])], "gather/index",
                   "gather/Unsqueeze")
    x = g.node("GatherND", [x, index], "gather/out", "gather/GatherND", batch_dims=1)
    _lm_head(g, x, wte_q)


def _check_model(model: Any, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS} for the fused graph")
    config = model.config
    if getattr(config, "model_type", None) != "gpt2":
        raise ValueError(f"model_type {getattr(config, 'model_type', None)!r}: the fused graph "
                         "builds GPT-2 only")
    if config.n_embd % config.n_head:
        raise ValueError(f"n_embd {config.n_embd} is not a multiple of n_head {config.n_head}")
    if config.add_cross_attention:
        raise ValueError("add_cross_attention=True is not supported by the fused graph")
    if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
        raise ValueError("lm_head is not tied to the token embedding (tie_word_embeddings=False); "
                         "the fused graph shares one table for both")
    if model.training:
        raise ValueError("model is in training mode; call model.eval() before export")


def weights_external(model: Any) -> bool:
    """Whether the fused graph of `model` keeps its weights in a `<graph>.data` file (its fp32
    parameters exceed graph_edit.EXTERNAL_DATA_BYTES) rather than inside the .onnx file."""
    return sum(p.numel() * 4 for p in model.parameters()) > graph_edit.EXTERNAL_DATA_BYTES


def build_fused_graph(model: Any, out_dir: Path, precision: str,
                      graph_name: str | None = None,
                      recipe: QuantRecipe | None = None) -> Variant:
    """Write `graph_name` (default `model-<precision>.onnx`; + `.onnx.data` when large) into
    out_dir; return its Variant.

    model: a transformers GPT2LMHeadModel in eval mode. precision: the weights, fp32, int8 or int4
    (weight-only MatMulNBits per `recipe`, default RECIPES[precision]; LayerNorm, attention and
    the KV cache stay float32). The registry entry's name is the caller's (export/builders.py).
    """
    import onnx
    import torch
    from onnx import helper

    _check_model(model, precision)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    graph_name = graph_name or f"model-{precision}.onnx"
    external = weights_external(model)
    data_path = out_dir / f"{graph_name}.data" if external else None
    tmp_graph = out_dir / f"{graph_name}.tmp"
    if precision != "fp32":
        recipe = recipe or RECIPES[precision]
    elif recipe is not None:
        raise ValueError("recipe: fp32 weights take no quantization recipe")
    with torch.no_grad(), _Graph(precision, data_path, recipe, model.config.n_layer) as g:
        _build_nodes(g, model)
    inputs, outputs = _graph_io(model.config)
    graph = helper.make_graph(g.nodes, f"gpt2-fused-{precision}", inputs, outputs,
                              initializer=g.initializers)
    proto = helper.make_model(
        graph, producer_name="gpt2-onnx",
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
    )
    proto.ir_version = IR_VERSION
    onnx.save(proto, tmp_graph)
    # By path, so the checker finds the external data; contrib ops are not schema-checked.
    onnx.checker.check_model(str(tmp_graph))
    os.replace(tmp_graph, out_dir / graph_name)
    return Variant(
        precision=precision,
        graph=graph_name,
        data=(data_path.name,) if data_path is not None else (),
        dtype="float32",
        io=FUSED_IO,
    )


FP16_FUSED_GRAPH = variants.get("fp16-fused").graph  # "model-fp16-fused.onnx"


def build_fp16_fused_variant(model: Any, out_dir: Path,
                             graph_name: str = FP16_FUSED_GRAPH) -> Variant:
    """The fused graph in float16 (`fp16-fused`): the CUDA path, since GroupQueryAttention's CUDA
    kernel takes fp16/bf16 only (fp32-fused, int8 and int4 cannot run it there).

    The fp32 fused graph is built in a scratch folder, then converted as the fp16 variant is
    (export/fp16.py): weights, activations, attention and the shared KV buffers in float16;
    LayerNorm and the residual stream in float32; logits computed in fp16 and returned float32.
    Softmax lives inside GroupQueryAttention, whose kernels accumulate it in float32.
    """
    import shutil

    from gpt2_onnx.export.fp16 import check_fp16_io, convert_to_fp16

    out_dir = Path(out_dir)
    scratch = out_dir / ".fp16-fused-src"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        src = build_fused_graph(model, scratch, "fp32")
        _annotate_types(scratch / src.graph)
        proto = convert_to_fp16(scratch / src.graph, [src.io.logits])
        proto.graph.name = "gpt2-fused-fp16"
        data = graph_edit.save_graph(proto, out_dir, graph_name, f"{graph_name}.data")
        del proto
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    variant = Variant(precision="fp16-fused", graph=graph_name, data=data,
                      dtype="float16", io=FUSED_IO)
    check_fp16_io(out_dir / graph_name, variant)
    return variant


# Contrib ops whose output has the type of their first input (ONNX shape inference skips them).
_SAME_TYPE_OPS = ("GroupQueryAttention", "FastGelu", "Gelu")


def _annotate_types(graph_path: Path) -> None:
    """Record every value's element type in the graph's value_info (weights untouched).

    ONNX shape inference does not type contrib-op outputs, and the float16 converter inserts a
    Cast in front of an fp32-kept node only where it knows the input is float16: without these
    types a residual Add would receive fp16 from attention (a type error at load).
    """
    import onnx
    from onnx import helper

    proto = onnx.load(str(graph_path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(proto)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    for node in g.node:
        for name in node.output:
            if not types.get(name) and node.op_type in _SAME_TYPE_OPS:
                types[name] = types[node.input[0]]
    known = {v.name for v in [*proto.graph.input, *proto.graph.output]}
    del proto.graph.value_info[:]
    for node in proto.graph.node:
        for name in node.output:
            if name not in known and types.get(name):
                proto.graph.value_info.append(helper.make_tensor_value_info(name, types[name],
                                                                            None))
    onnx.save(proto, str(graph_path))
