"""The fp16 variant (for CUDA): optimum's fp32 graph converted to float16 where that is safe.

GPT-2 in plain fp16 overflows to inf/NaN (onnxruntime issues 6328, 11384: docs/facts.md), so
the conversion keeps in fp32:
  - LayerNormalization (x² overflows fp16 once |x| > 256) and Softmax (with the attention mask
    Add in front of it, whose mask constant is float32's minimum);
  - the residual stream: every Add whose output feeds a LayerNormalization (wte+wpe, and both
    residual Adds of each block), with no fp16 round trip between those fp32 nodes;
  - the logits output (float32; computed by an fp16 MatMul and cast).
Everything else (the Gemms, attention MatMuls, GELU, embeddings) runs in fp16, and the KV cache
(past_key_values.* in, present.* out) is float16, so the manifest's dtype is "float16" while the
logits stay float32 (ConcatDecoder hands float32 logits to sampling either way).

The graph also gets an extra output, LAST_LOGITS ([batch, vocab] float32, the last position),
so a runtime can bring only that row to the host at prefill instead of [batch, seq, vocab]
(bench/GPU.md); a runtime that knows it binds it at prefill (runtime/decoder.py). Runtimes
that do not know it never bind it. optimum's fp32 graph gets the same output at export
(graph_edit.add_last_logits); an older export's graph gets it here.

onnxruntime's float16 converter does the conversion (onnxruntime.transformers.float16); this
module only chooses what stays fp32 and tidies the casts it inserts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from gpt2_onnx.export.graph_edit import LAST_LOGITS, add_last_logits_output, save_graph
from gpt2_onnx.runtime import variants
from gpt2_onnx.runtime.manifest import Variant, VariantIO

FP16_GRAPH = variants.get("fp16").graph  # "model-fp16.onnx"
FP16_DATA = f"{FP16_GRAPH}.data"  # written when the weights are large (graph_edit.save_graph)
# Op types that stay fp32 (besides onnxruntime's default list of ops without fp16 kernels).
BLOCKED_OPS = ("LayerNormalization", "SkipLayerNormalization", "Softmax")


def build_fp16_variant(model_dir: Path, fp32: Variant | None = None) -> Variant:
    """Convert the fp32 graph in `model_dir` to FP16_GRAPH (+ FP16_DATA when large) beside it.

    fp32: the directory's fp32 Variant (optimum's graph); default model.onnx with optimum's names.
    Returns the fp16 Variant (same tensor names, KV dtype float16, logits float32); the pipeline
    stamps the registry entry's name and thresholds on it (pipeline.build_extra_variant).
    Raises ValueError when the graph is not one this conversion understands (no
    LayerNormalization op, i.e. LayerNorm decomposed by an opset < 17 export).
    """
    model_dir = Path(model_dir)
    fp32 = fp32 or Variant("fp32", "model.onnx", (), "float32", VariantIO())
    io = fp32.io
    keep = [io.logits, LAST_LOGITS]  # float32 outputs (LAST_LOGITS when the graph has it)
    model = convert_to_fp16(model_dir / fp32.graph, keep)
    if LAST_LOGITS not in {o.name for o in model.graph.output}:  # an export before it existed
        add_last_logits_output(model.graph, io.logits, LAST_LOGITS)
    data = save_graph(model, model_dir, FP16_GRAPH, FP16_DATA)
    variant = Variant(precision="fp16", graph=FP16_GRAPH, data=data, dtype="float16",
                      io=replace(io, logits_last=LAST_LOGITS))
    check_fp16_io(model_dir / FP16_GRAPH, variant)
    return variant


def convert_to_fp16(src: Path, keep_io_types: list[str]) -> Any:
    """The float32 graph at `src` as a float16 ModelProto, with LayerNorm, Softmax and the
    residual stream kept float32 (see the module docstring); `keep_io_types` name the graph
    inputs/outputs that stay float32 (names the graph lacks are ignored)."""
    import onnx
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    structure = onnx.load(str(src), load_external_data=False)  # nodes only: cheap at any size
    keep_fp32 = fp32_node_names(structure)
    names = {v.name for v in [*structure.graph.input, *structure.graph.output]}
    del structure
    # A path (not a proto) lets the converter run shape inference on graphs over 2 GB.
    model = float16.convert_float_to_float16(
        str(src), keep_io_types=[n for n in keep_io_types if n in names],
        op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, *BLOCKED_OPS],
        node_block_list=keep_fp32)
    OnnxModel(model).topological_sort()  # the converter appends its Cast nodes at the end
    drop_cast_round_trips(model.graph)
    return model


def fp32_node_names(model: Any) -> list[str]:
    """Names of the Add nodes that stay fp32: residual Adds (output feeds a LayerNormalization)
    and attention-mask Adds (output feeds a Softmax). ValueError if there is no LayerNorm op."""
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    if not any(n.op_type == "LayerNormalization" for n in model.graph.node):
        raise ValueError(
            "fp16: the graph has no LayerNormalization op (LayerNorm exported decomposed, "
            "opset < 17); its x**2 would overflow in fp16. Re-export with opset >= 17."
        )
    keep = []
    for node in model.graph.node:
        if node.op_type != "Add":
            continue
        if any(c.op_type in ("LayerNormalization", "Softmax")
               for c in consumers[node.output[0]]):
            keep.append(node.name)
    return keep


def drop_cast_round_trips(graph: Any) -> int:
    """Remove fp32 -> fp16 -> fp32 Cast pairs between two fp32 nodes (returns pairs removed).

    The converter casts every blocked node's output to fp16 and casts it back before the next
    blocked node, so the residual stream (Add -> LayerNorm -> next Add) would lose precision at
    each hop; wiring the fp32 value straight through keeps that stream fp32.
    """
    from onnx import TensorProto

    def cast_to(node: Any) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    producer = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    removed = 0
    for node in list(graph.node):
        if cast_to(node) != TensorProto.FLOAT:
            continue
        up = producer.get(node.input[0])
        # Only the converter's own casts after fp32 nodes: their input is fp32 by construction.
        if up is None or cast_to(up) != TensorProto.FLOAT16 \
                or not up.name.endswith("_cast_to_fp16_node"):
            continue
        fp32_value, rounded = up.input[0], node.output[0]
        for other in graph.node:
            for i, name in enumerate(other.input):
                if name == rounded:
                    other.input[i] = fp32_value
        graph.node.remove(node)
        removed += 1
    used = {name for node in graph.node for name in node.input} | outputs
    for node in list(graph.node):
        if node.name.endswith("_cast_to_fp16_node") and node.output[0] not in used:
            graph.node.remove(node)
    return removed


def check_fp16_io(graph: Path, variant: Variant) -> None:
    """ValueError unless the saved graph's I/O is typed as the variant says: KV float16,
    logits (and the last-row logits, if any) float32, integer inputs int64."""
    import onnx
    from onnx import TensorProto

    proto = onnx.load(str(graph), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*proto.graph.input, *proto.graph.output]}
    io = variant.io
    n_layer = sum(1 for name in types if name.startswith(io.past_key.split("{i}")[0])
                  and name.endswith(io.past_key.split("{i}")[1]))
    want = {io.logits: TensorProto.FLOAT, io.logits_last: TensorProto.FLOAT,
            io.input_ids: TensorProto.INT64, io.attention_mask: TensorProto.INT64}
    want.pop("", None)  # names a graph does not have (fused: no mask, no extra last-row output)
    for name in [*io.kv_inputs(n_layer), *io.kv_outputs(n_layer)]:
        want[name] = TensorProto.FLOAT16
    bad = [f"{n}: {TensorProto.DataType.Name(types[n]) if n in types else 'missing'}, "
           f"expected {TensorProto.DataType.Name(t)}"
           for n, t in want.items() if types.get(n) != t]
    if n_layer == 0 or bad:
        raise ValueError(f"{graph}: fp16 conversion gave unexpected I/O: "
                         f"{'; '.join(bad) or 'no KV inputs'}")

