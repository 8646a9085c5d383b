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
(bench/GPU.md); a runtime that knows it binds it at prefill (runtime/decoder.py). Runtimes that do
not know it never bind it.

onnxruntime's float16 converter does the conversion (onnxruntime.transformers.float16); this
module only chooses what stays fp32 and tidies the casts it inserts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from gpt2_onnx.runtime import variants
from gpt2_onnx.runtime.manifest import Variant, VariantIO

FP16_GRAPH = variants.get("fp16").graph  # "model-fp16.onnx"
FP16_DATA = f"{FP16_GRAPH}.data"
LAST_LOGITS = "logits_last"  # extra output: logits of the last position, [batch, vocab] float32
# Op types that stay fp32 (besides onnxruntime's default list of ops without fp16 kernels).
BLOCKED_OPS = ("LayerNormalization", "SkipLayerNormalization", "Softmax")
# Above this many bytes of weights the graph stores them in FP16_DATA: protobuf refuses a single
# file over 2 GB, and gpt2-large in fp16 (1.7 GB) is already close to that.
EXTERNAL_DATA_BYTES = 1 << 30


def build_fp16_variant(model_dir: Path, fp32: Variant | None = None) -> Variant:
    """Convert the fp32 graph in `model_dir` to FP16_GRAPH (+ FP16_DATA when large) beside it.

    fp32: the directory's fp32 Variant (optimum's graph); default model.onnx with optimum's names.
    Returns the fp16 Variant (same tensor names, KV dtype float16, logits float32). Raises
    ValueError when the graph is not one this conversion understands (no LayerNormalization op,
    i.e. LayerNorm decomposed by an opset < 17 export).
    """
    import onnx
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model_dir = Path(model_dir)
    fp32 = fp32 or Variant("fp32", "model.onnx", (), "float32", VariantIO())
    src = model_dir / fp32.graph
    io = fp32.io
    structure = onnx.load(str(src), load_external_data=False)  # nodes only: cheap at any size
    keep_fp32 = fp32_node_names(structure)
    del structure
    # A path (not a proto) lets the converter run shape inference on graphs over 2 GB.
    model = float16.convert_float_to_float16(
        str(src), keep_io_types=[io.logits],
        op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, *BLOCKED_OPS],
        node_block_list=keep_fp32)
    OnnxModel(model).topological_sort()  # the converter appends its Cast nodes at the end
    drop_cast_round_trips(model.graph)
    add_last_logits_output(model.graph, io.logits, LAST_LOGITS)
    data = _save(model, model_dir)
    variant = Variant(precision="fp16", graph=FP16_GRAPH, data=data, dtype="float16",
                      io=replace(io, logits_last=LAST_LOGITS),
                      thresholds=dict(fp32.thresholds))
    check_fp16_io(model_dir / FP16_GRAPH, variant)
    return variant


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


def add_last_logits_output(graph: Any, logits: str = "logits", name: str = LAST_LOGITS) -> None:
    """Add output `name` = logits[:, -1, :] ([batch, vocab], same dtype as `logits`)."""
    from onnx import TensorProto, helper

    src = next(o for o in graph.output if o.name == logits)
    index = f"{name}_index"
    graph.initializer.append(helper.make_tensor(index, TensorProto.INT64, [], [-1]))
    graph.node.append(helper.make_node("Gather", [logits, index], [name], axis=1,
                                       name=f"/{name}/Gather"))
    graph.output.append(helper.make_tensor_value_info(
        name, src.type.tensor_type.elem_type, ["batch_size", "vocab_size"]))


def _save(model: Any, model_dir: Path) -> tuple[str, ...]:
    """Write FP16_GRAPH (and FP16_DATA when the weights are large); returns the data files."""
    import onnx

    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    graph = model_dir / FP16_GRAPH
    if weight_bytes <= EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(graph))
        return ()
    (model_dir / FP16_DATA).unlink(missing_ok=True)  # save appends to an existing data file
    onnx.save_model(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=FP16_DATA, size_threshold=1024)
    return (FP16_DATA,)


def check_fp16_io(graph: Path, variant: Variant) -> None:
    """ValueError unless the saved graph's I/O is typed as the variant says: KV float16,
    logits float32, integer inputs int64."""
    import onnx
    from onnx import TensorProto

    proto = onnx.load(str(graph), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*proto.graph.input, *proto.graph.output]}
    io = variant.io
    n_layer = sum(1 for name in types if name.startswith(io.past_key.split("{i}")[0])
                  and name.endswith(io.past_key.split("{i}")[1]))
    want = {io.logits: TensorProto.FLOAT, LAST_LOGITS: TensorProto.FLOAT,
            io.input_ids: TensorProto.INT64, io.attention_mask: TensorProto.INT64}
    for name in [*io.kv_inputs(n_layer), *io.kv_outputs(n_layer)]:
        want[name] = TensorProto.FLOAT16
    bad = [f"{n}: {TensorProto.DataType.Name(types[n]) if n in types else 'missing'}, "
           f"expected {TensorProto.DataType.Name(t)}"
           for n, t in want.items() if types.get(n) != t]
    if n_layer == 0 or bad:
        raise ValueError(f"{graph}: fp16 conversion gave unexpected I/O: "
                         f"{'; '.join(bad) or 'no KV inputs'}")


def add_fp16_variant(model_dir: Path) -> Path:
    """Add the fp16 variant to an existing model directory (fp32 exported) and rewrite its
    manifest; returns the manifest path. For directories exported without `--precision fp16`."""
    from gpt2_onnx.export.pipeline import refresh_file_entries
    from gpt2_onnx.runtime.manifest import read_manifest

    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    if "fp32" not in manifest.variants:
        raise ValueError(f"{model_dir}: no fp32 variant to convert")
    variant = build_fp16_variant(model_dir, manifest.variants["fp32"])
    manifest = replace(manifest, variants={**manifest.variants, "fp16": variant})
    return refresh_file_entries(model_dir, manifest).write(model_dir)
