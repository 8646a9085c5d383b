"""The variant registry: one entry per precision a model directory can hold.

Every choice that depends on the variant reads its entry here: export (which builder, which file
name, how many bytes per parameter), the runtime (which variant a device prefers, whether fast
load applies), verify (its thresholds), bench and the CLI help (the names). Adding a variant is
one `register(VariantSpec(...))` plus its builder (`gpt2_onnx.export.builders.register_builder`).
An unknown name is a ValueError everywhere (`get`).

Torch-free on purpose: the runtime reads it, and the export package builds on it.

Verify thresholds (keys; all compare a variant with PyTorch fp32 on the same input):
  logits_max_abs      max |logit difference| at prefill, every decode step and cached vs
                      recomputed (every variant)
  mean_kl_max         inexact variants: mean KL(fp32 || variant), nats
  top1_agreement_min  1.0 = exact: greedy tokens must be identical. Inexact variants: the share
                      of teacher-forced steps whose argmax equals fp32's, counting only decisive
                      steps (fp32's top-2 gap >= top1_margin nats: a flip inside the noise is
                      not a disagreement); also the batch-vs-single agreement
  top1_margin         inexact variants: see above
The numbers live in thresholds.json beside this module (THRESHOLDS), written by
bench/derive_thresholds.py from the measurements in bench/results (the trained yardstick's
quality table and `gpt2-onnx verify` reports), each limit with the figure and rule it came from;
tests/test_verify.py checks the committed file equals the script's output. The export copies an
entry's thresholds into the manifest as a record; verify applies the registry's, whatever the
manifest says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

FAMILIES = ("optimum", "fused")  # optimum's exported graph; our GroupQueryAttention graph
# How a variant's graph takes and returns the KV cache (the manifest's io.kv_layout records it).
#   "concat": past_key_values.{i}.key/value [batch, n_head, past_seq, head_dim] in, present.{i}
#             [batch, n_head, past_seq + seq, head_dim] out (optimum's layout).
#   "shared": one preallocated buffer per layer [batch, n_head, n_positions, head_dim], bound as
#             both past and present and written in place (GroupQueryAttention graphs).
KV_LAYOUTS = ("concat", "shared")


@dataclass(frozen=True)
class VariantSpec:
    """What the project knows about one variant, whatever model it is exported from."""

    name: str  # the precision as users write it: "fp32", "fp32-fused", "int8", ...
    family: str  # "optimum" (optimum's graph) or "fused" (export/fused.py's graph)
    kv_layout: str  # "concat" or "shared" (KV_LAYOUTS): what export writes into the manifest's
    # io (the runtime then asks the loaded variant: manifest.Variant.shared_kv)
    weight_dtype: str  # "float32", "float16", "int8", "int4": how the matmul weights are stored
    bytes_per_param: float  # disk bytes per parameter (export's free-space estimate)
    graph: str  # file name of its .onnx graph in a model directory
    thresholds: dict[str, float] = field(default_factory=dict, hash=False)  # verify's limits
    # Devices it suits -> rank (0 is tried first). TextGenerator.load picks, when no precision is
    # named, the present variant of lowest rank for the device; a device not listed never gets
    # this variant by default (it can still be named).
    preference: dict[str, int] = field(default_factory=dict, hash=False)
    fast_load: bool = False  # runs well without prepacked weights (plain float MatMuls only)
    # Rank for onnxruntime-genai (0 first): export points genai_config.json at the exported
    # variant of lowest rank (measured through genai itself: docs/interop.md); None:
    # genai gets no config for it.
    genai_rank: int | None = None
    description: str = ""  # one line for the CLI help

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"variant {self.name!r}: family {self.family!r} not in {FAMILIES}")
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"variant {self.name!r}: kv_layout {self.kv_layout!r} not in "
                             f"{KV_LAYOUTS}")
        want = EXACT_KEYS if self.exact else INEXACT_KEYS
        if sorted(self.thresholds) != sorted(want):
            raise ValueError(f"variant {self.name!r}: thresholds {sorted(self.thresholds)}, "
                             f"expected {sorted(want)} "
                             f"({'exact' if self.exact else 'inexact'})")

    @property
    def exact(self) -> bool:
        """The same fp32 arithmetic as PyTorch in another order: greedy tokens must be identical
        (a failed check is a defect of the export, not a quality trade-off)."""
        return self.thresholds.get("top1_agreement_min") == 1.0


THRESHOLDS_FILE = Path(__file__).with_name("thresholds.json")
EXACT_KEYS = ("logits_max_abs", "top1_agreement_min")
INEXACT_KEYS = ("logits_max_abs", "mean_kl_max", "top1_agreement_min", "top1_margin")
# variant -> verify's limits, as bench/derive_thresholds.py wrote them
THRESHOLDS: dict[str, dict[str, float]] = {
    name: {k: float(v) for k, v in entry["limits"].items()}
    for name, entry in json.loads(THRESHOLDS_FILE.read_text(encoding="utf-8"))["variants"].items()
}

REGISTRY: dict[str, VariantSpec] = {}


def register(spec: VariantSpec, *, replace: bool = False) -> VariantSpec:
    """Add `spec`; ValueError when its name is taken (unless `replace`)."""
    if spec.name in REGISTRY and not replace:
        raise ValueError(f"variant {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a variant (tests that register throwaway variants clean up with this)."""
    REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """Every registered variant name, in registration order."""
    return tuple(REGISTRY)


def get(name: str) -> VariantSpec:
    """The entry of `name`; ValueError naming the known variants when there is none."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"precision {name!r}: unknown variant; known: "
                         f"{', '.join(REGISTRY)}") from None


def preferred(device: str) -> tuple[str, ...]:
    """Variant names suited to `device` ("cpu", "cuda"), best first."""
    ranked = [(s.preference[device], s.name) for s in REGISTRY.values() if device in s.preference]
    return tuple(n for _, n in sorted(ranked))


def shared_kv_names() -> tuple[str, ...]:
    """The registered shared-KV variants, in registration order (help texts and hints; a
    model directory's own variant answers with manifest.Variant.shared_kv)."""
    return tuple(n for n, s in REGISTRY.items() if s.kv_layout == "shared")


def genai_preferred() -> tuple[str, ...]:
    """Variant names onnxruntime-genai runs, fastest first (`genai_rank`)."""
    ranked = [(s.genai_rank, s.name) for s in REGISTRY.values() if s.genai_rank is not None]
    return tuple(n for _, n in sorted(ranked))


def thresholds_for(name: str) -> dict[str, float]:
    """A copy of the verify thresholds of variant `name` (ValueError when unknown)."""
    return dict(get(name).thresholds)


# Thresholds: see thresholds.json (each limit with the measurement and rule it came from).
# Exact variants: the same fp32 arithmetic in another order; greedy tokens must be identical.
register(VariantSpec(
    name="fp32", family="optimum", kv_layout="concat", weight_dtype="float32",
    bytes_per_param=4.0, graph="model.onnx", thresholds=dict(THRESHOLDS["fp32"]),
    preference={"cpu": 1, "cuda": 2}, fast_load=True, genai_rank=3,
    description="optimum's graph, float32 (verify's reference path)"))
# Same numbers as fp32, faster on CPU (shared KV buffer, last-row logits). Directories exported
# before this registry hold it as "model-fp32.onnx"; their manifests name that file and load.
register(VariantSpec(
    name="fp32-fused", family="fused", kv_layout="shared", weight_dtype="float32",
    bytes_per_param=4.0, graph="model-fp32-fused.onnx", thresholds=dict(THRESHOLDS["fp32-fused"]),
    preference={"cpu": 0}, fast_load=True, genai_rank=2,
    description="fused GroupQueryAttention graph, float32 (fastest exact CPU variant)"))
# Quantized / half precision: gated on max abs logit difference, mean KL(fp32 || variant) and
# top-1 agreement at decisive positions. The fused graphs run GroupQueryAttention, whose CUDA
# kernel is fp16/bf16 only: fp32-fused, int8 and int4 are refused on CUDA
# (device.check_variant_on_device), so they have no "cuda" preference.
# genai_rank (onnxruntime-genai 0.18, random gpt2, 2 threads, batch 1, tok/s at context 8 / 256;
# bench/results/genai-gpt2): int4 29.5 / 31.0, int8 19.6 / 25.0, fp32-fused 12.7 / 13.5,
# fp32 11.0 / 10.6. fp16 and fp16-fused (CUDA variants) get none.
# int8: MatMulNBits 8-bit, block 32, 8-bit shared token table.
register(VariantSpec(
    name="int8", family="fused", kv_layout="shared", weight_dtype="int8",
    bytes_per_param=1.1, graph="model-int8.onnx", thresholds=dict(THRESHOLDS["int8"]),
    preference={"cpu": 2}, genai_rank=1,
    description="fused graph, 8-bit weights (MatMulNBits)"))
# int4: MatMulNBits 4-bit, block 32, 8-bit shared token table.
register(VariantSpec(
    name="int4", family="fused", kv_layout="shared", weight_dtype="int4",
    bytes_per_param=0.6, graph="model-int4.onnx", thresholds=dict(THRESHOLDS["int4"]),
    preference={"cpu": 3}, genai_rank=0,
    description="fused graph, 4-bit weights (MatMulNBits)"))
# fp16 limits were measured on CPU (re-derive them from a GPU run: bench/GPU.md).
register(VariantSpec(
    name="fp16", family="optimum", kv_layout="concat", weight_dtype="float16",
    bytes_per_param=2.0, graph="model-fp16.onnx", thresholds=dict(THRESHOLDS["fp16"]),
    preference={"cuda": 1, "cpu": 4}, fast_load=True,
    description="optimum's graph in float16 (for CUDA)"))
# The fused graph in float16 with the shared KV buffer: the fast CUDA path. Its export builds
# the fp32 fused graph in a scratch folder (4 bytes/param, removed) before converting (2).
register(VariantSpec(
    name="fp16-fused", family="fused", kv_layout="shared", weight_dtype="float16",
    bytes_per_param=6.0, graph="model-fp16-fused.onnx", thresholds=dict(THRESHOLDS["fp16-fused"]),
    preference={"cuda": 0, "cpu": 5}, fast_load=True,
    description="fused graph in float16 (fastest on CUDA)"))
