"""Small ONNX graph edits and saves shared by the export's builders and its pipeline.

The lowest module of the export package: it imports nothing else from it (onnx inside its
functions), so optimum's fp32 graph (pipeline.py), the fp16 conversion (fp16.py) and the fused
graphs (fused.py) use one copy of each edit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LAST_LOGITS = "logits_last"  # extra output: logits of the last position, [batch, vocab] float32
# Above this many bytes of weights a graph stores them in an external data file beside it:
# protobuf refuses a single file over 2 GB (gpt2-large in fp32 is 3.1 GB, in fp16 1.7 GB).
EXTERNAL_DATA_BYTES = 1 << 30
# Tensors smaller than this stay inside the .onnx file even when the weights are external
# (shape constants: onnxruntime's shape inference cannot read external ones).
INLINE_MAX_BYTES = 1024


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


def add_last_logits(graph: Path, logits: str = "logits") -> None:
    """Give the graph file at `graph` the last-row output LAST_LOGITS ([batch, vocab]): prefill
    then brings one row per prompt to the host, not [batch, seq, vocab] (on CUDA a
    device-to-host copy of 1.45 GB at batch 8 and 900 tokens). The weights (external data) are
    not touched."""
    import onnx

    proto = onnx.load(str(graph), load_external_data=False)
    add_last_logits_output(proto.graph, logits, LAST_LOGITS)
    onnx.save(proto, str(graph))


def save_graph(model: Any, model_dir: Path, graph_name: str, data_name: str
               ) -> tuple[str, ...]:
    """Write `graph_name` (and `data_name` when the weights are large); returns the data files."""
    import onnx

    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    graph = model_dir / graph_name
    if weight_bytes <= EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(graph))
        return ()
    (model_dir / data_name).unlink(missing_ok=True)  # save appends to an existing data file
    onnx.save_model(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=INLINE_MAX_BYTES)
    return (data_name,)
