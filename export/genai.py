"""onnxruntime-genai interop: `genai_config.json`, and for a fused variant a graph genai can feed.

onnxruntime-genai (C, C++, C#, Java, Objective-C and Python bindings) loads a model directory
described by `genai_config.json`: the graph file, its input/output names, the model's shape and
the search defaults. Its generic "decoder" type drives any graph whose inputs are `input_ids`,
`attention_mask`, `position_ids` and a past/present KV pair per layer.

optimum's fp32 graph (`model.onnx`) fits as it is. The fused GroupQueryAttention graphs do not:
our runtime feeds them `seqlens_k`, `total_sequence_length` and `logits_index`, while
onnxruntime-genai feeds only an attention mask. So for a fused variant the export writes a
genai-facing graph beside it (`<graph stem>-genai.onnx`): the same nodes and the same weights
(the same external data file when there is one), with a few integer ops in front that derive
what the fused graph takes from the mask, as onnxruntime-genai's own model builder does
(`seqlens_k = ReduceSum(mask) - 1`, total length = the mask's width; logits for each row's last
real token). onnxruntime-genai 0.18 right-pads a batch (its `encode_batch` does, and trailing pad
tokens are what it reads as padding), which is the layout GroupQueryAttention and our runtime
use: each row's tokens start at KV position 0. Our runtime keeps its own graph, so its speed is
unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt2_onnx.runtime import variants as registry
from gpt2_onnx.runtime.manifest import ModelDims, Variant

GENAI_CONFIG_NAME = "genai_config.json"
GENAI_GRAPH_SUFFIX = "-genai.onnx"


def genai_preference() -> tuple[str, ...]:
    """Variants onnxruntime-genai runs, fastest first: the registry's `genai_rank`, measured
    through onnxruntime-genai 0.18 on random gpt2 (int4 > int8 > fp32-fused > fp32; docs/interop.md
    "Other languages"). With verify on, every exported variant has passed it (export fails
    otherwise), so the default, the first one exported, is the fastest that passes verify."""
    return registry.genai_preferred()


class GenaiError(ValueError):
    """A `--genai-variant` that cannot be honoured (not exported, or not runnable by genai)."""


@dataclass(frozen=True)
class GenaiFiles:
    """What the export wrote for onnxruntime-genai (recorded in the manifest's `genai`)."""

    variant: str  # precision whose graph genai runs
    config: str  # GENAI_CONFIG_NAME
    graph: str  # the graph file the config names

    def to_json(self) -> dict[str, str]:
        return {"variant": self.variant, "config": self.config, "graph": self.graph}


def choose_genai_variant(exported: Sequence[str], requested: str | None = None) -> str:
    """The variant genai_config.json points at: `requested`, else the fastest exported one."""
    preference = genai_preference()
    runnable = [p for p in preference if p in exported]
    if requested is not None:
        if requested not in preference:
            raise GenaiError(f"genai_variant {requested!r}: onnxruntime-genai runs "
                             f"{', '.join(preference)} (fp16 is for CUDA)")
        if requested not in exported:
            raise GenaiError(f"genai_variant {requested!r} is not exported; add it to "
                             f"--precision (exported: {', '.join(exported)})")
        return requested
    if not runnable:
        raise GenaiError(f"none of the exported variants ({', '.join(exported)}) runs in "
                         "onnxruntime-genai; export fp32 beside them")
    return runnable[0]


def write_genai_files(model_dir: Path, dims: ModelDims, variant: Variant) -> GenaiFiles:
    """Write genai_config.json for `variant` (and its genai-facing graph when it is fused).

    Reads the search defaults from model_dir/generation_config.json, so call it after that file
    is written.
    """
    model_dir = Path(model_dir)
    if variant.io.kv_layout == "shared":  # the graph takes seqlens_k etc.: needs the prelude
        graph = write_genai_graph(model_dir, variant)
        share_buffer = True  # GroupQueryAttention writes into the bound buffer in place
    else:
        graph = variant.graph
        share_buffer = False  # optimum's graph returns past + new as a new tensor
    generation = _read_json(model_dir / "generation_config.json")
    config = genai_config(dims, variant, graph, generation, share_buffer)
    (model_dir / GENAI_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n",
                                               encoding="utf-8")
    return GenaiFiles(variant.precision, GENAI_CONFIG_NAME, graph)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def genai_config(dims: ModelDims, variant: Variant, graph: str, generation: Mapping[str, Any],
                 share_buffer: bool) -> dict[str, Any]:
    """The genai_config.json document (onnxruntime-genai's "decoder" model type).

    generation: generation_config.json's content; its sampling settings become the search
    defaults (transformers' defaults where absent: greedy, top_k 50, top_p 1, temperature 1).
    """
    io = variant.io
    pad = generation.get("pad_token_id")
    eos = generation.get("eos_token_id", dims.eos_token_id)
    return {
        "model": {
            "bos_token_id": generation.get("bos_token_id", dims.bos_token_id),
            "context_length": dims.n_positions,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": graph,
                "head_size": dims.head_dim,
                "hidden_size": dims.n_embd,
                "inputs": {
                    "input_ids": io.input_ids,
                    "attention_mask": "attention_mask",
                    "position_ids": io.position_ids,
                    "past_key_names": io.past_key.replace("{i}", "%d"),
                    "past_value_names": io.past_value.replace("{i}", "%d"),
                },
                "outputs": {
                    "logits": io.logits,
                    "present_key_names": io.present_key.replace("{i}", "%d"),
                    "present_value_names": io.present_value.replace("{i}", "%d"),
                },
                "num_attention_heads": dims.n_head,
                "num_hidden_layers": dims.n_layer,
                "num_key_value_heads": dims.n_head,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else dims.eos_token_id,
            "type": "decoder",
            "vocab_size": dims.vocab_size,
        },
        "search": {
            "diversity_penalty": float(generation.get("diversity_penalty", 0.0)),
            "do_sample": bool(generation.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": float(generation.get("length_penalty", 1.0)),
            "max_length": dims.n_positions,
            "min_length": 0,
            "no_repeat_ngram_size": int(generation.get("no_repeat_ngram_size", 0)),
            "num_beams": int(generation.get("num_beams", 1)),
            "num_return_sequences": int(generation.get("num_return_sequences", 1)),
            "past_present_share_buffer": share_buffer,
            "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
            "temperature": float(generation.get("temperature", 1.0)),
            "top_k": int(generation.get("top_k", 50)),
            "top_p": float(generation.get("top_p", 1.0)),
        },
    }


# ------------------------------------------------------------------------ genai-facing graph


def genai_graph_name(variant: Variant) -> str:
    return variant.graph.removesuffix(".onnx") + GENAI_GRAPH_SUFFIX


def write_genai_graph(model_dir: Path, variant: Variant) -> str:
    """Write the genai-facing copy of a fused variant's graph; returns its file name.

    The nodes and initializers are the fused graph's; external weights are referenced, not
    copied (the same data file), so the copy costs the .onnx file only when the weights are
    external. Inputs seqlens_k, total_sequence_length and logits_index are replaced by
    attention_mask [batch, total] (int64), from which a few integer ops derive them.
    """
    import onnx

    src = model_dir / variant.graph
    proto = onnx.load(str(src), load_external_data=False)  # weights stay where they are
    _mask_driven(proto.graph, variant)
    name = genai_graph_name(variant)
    onnx.save(proto, str(model_dir / name))
    onnx.checker.check_model(str(model_dir / name))  # by path: finds the external data
    return name


def _mask_driven(graph: Any, variant: Variant) -> None:
    """Rewrite a fused graph in place to take attention_mask instead of the length inputs."""
    from onnx import TensorProto, helper, numpy_helper

    io = variant.io
    by_role = {role: name for name, role in io.extra_inputs.items()}
    ids = io.input_ids
    # What the fused nodes read -> what the prelude computes.
    renamed = {by_role["seqlens_k"]: "genai/seqlens_k",
               by_role["total_sequence_length"]: "genai/total_sequence_length",
               by_role["logits_index"]: "genai/logits_index"}
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
    kept = [i for i in graph.input if i.name not in by_role.values()]
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])
    del graph.input[:]
    graph.input.extend([kept[0], mask, *kept[1:]])
    consts = {"genai/one": [1], "genai/axis1": [1], "genai/end": [np.iinfo(np.int64).max]}
    graph.initializer.extend(numpy_helper.from_array(np.asarray(v, dtype=np.int64), k)
                             for k, v in consts.items())

    def n(op: str, inputs: list[str], output: str, **attrs: Any) -> Any:
        return helper.make_node(op, inputs, [output], name=output, **attrs)

    i32 = TensorProto.INT32
    prelude = [
        # logits_index [batch, 1]: each row's last real token among this step's columns (rows
        # arrive right-padded, as onnxruntime-genai pads a batch; a decode step has one column).
        n("Shape", [ids], "genai/seq", start=1, end=2),
        n("Neg", ["genai/seq"], "genai/minus_seq"),
        n("Slice", ["attention_mask", "genai/minus_seq", "genai/end", "genai/axis1"],
          "genai/window"),
        n("ReduceSum", ["genai/window", "genai/axis1"], "genai/count", keepdims=1),
        n("Sub", ["genai/count", "genai/one"], "genai/logits_index"),
        # GroupQueryAttention's lengths, as onnxruntime-genai's model builder derives them.
        n("ReduceSum", ["attention_mask", "genai/axis1"], "genai/total_per_row", keepdims=0),
        n("Sub", ["genai/total_per_row", "genai/one"], "genai/seqlens_k64"),
        n("Cast", ["genai/seqlens_k64"], "genai/seqlens_k", to=i32),
        n("Shape", ["attention_mask"], "genai/width", start=1, end=2),
        n("Squeeze", ["genai/width"], "genai/width_scalar"),
        n("Cast", ["genai/width_scalar"], "genai/total_sequence_length", to=i32),
    ]
    nodes = prelude + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


# ------------------------------------------------------------------------ running genai


def genai_available() -> bool:
    """Whether onnxruntime-genai can be imported (it is a test dependency, never a runtime one)."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime_genai") is not None


def load_genai_model(model_dir: str | Path) -> Any:
    """onnxruntime_genai.Model of a directory holding genai_config.json."""
    import onnxruntime_genai as og

    return og.Model(str(model_dir))


def genai_greedy(model: Any, prompts: Sequence[Sequence[int]], new_tokens: int,
                 *, pad_token_id: int, eos_token_id: int) -> list[list[int]]:
    """Greedy token ids from onnxruntime-genai for `prompts`, run as one batch.

    Rows are right-padded with `pad_token_id`, as onnxruntime-genai's own `encode_batch` pads
    them (0.18 reads trailing pad tokens as padding; left padding would be read as tokens).
    Each row is cut after its first eos (genai keeps emitting padding for finished rows).
    model: from `load_genai_model`, or a model directory.
    """
    import onnxruntime_genai as og

    if isinstance(model, (str, Path)):
        model = load_genai_model(model)
    width = max(len(p) for p in prompts)
    batch = np.full((len(prompts), width), pad_token_id, dtype=np.int32)
    for row, ids in enumerate(prompts):
        batch[row, :len(ids)] = ids
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=width + new_tokens,
                              batch_size=len(prompts))
    generator = og.Generator(model, params)
    generator.append_tokens(batch)
    out: list[list[int]] = [[] for _ in prompts]
    while not generator.is_done():
        generator.generate_next_token()
        for row, token in enumerate(generator.get_next_tokens()):
            out[row].append(int(token))
    for row, ids in enumerate(out):
        if eos_token_id in ids:
            out[row] = ids[:ids.index(eos_token_id) + 1]
    return out
