"""The variant registry: one entry per precision a model directory can hold.

Every choice that depends on the variant reads its entry here: export (which builder, which file
name, how many bytes per parameter), the runtime (which variant a device prefers, whether fast
load applies), verify (its thresholds), bench and the CLI help (the names). Adding a variant is
one `register(VariantSpec(...))` plus its builder (`gpt2_onnx.export.builders.register_builder`).
An unknown name is a ValueError everywhere (`get`).

Torch-free on purpose: the runtime reads it, and the export package builds on it.

Verify thresholds (keys; all compare a variant with PyTorch fp32 on the same input):
  logits_max_abs      exact variants: max |logit difference| (gates logits and cache checks)
  top1_agreement_min  share of teacher-forced steps whose argmax equals fp32's; 1.0 = greedy
                      tokens must be identical. For inexact variants it counts only decisive
                      steps, where fp32's top-2 gap is >= top1_margin (nats)
  top1_margin         see above
  mean_kl_max         mean KL(fp32 || variant) over positions, nats
  ppl_change_max      |perplexity / fp32 perplexity - 1| on the same text (bench/quality.py)
Random-init weights give nearly flat distributions, on which quantization looks harmless; the
limits come from a trained model instead: bench/train_yardstick.py trains it, bench/quality.py
measures each variant against PyTorch fp32 on held-out text (bench/results/quality.md). The
export copies an entry's thresholds into the manifest's variant. Re-run both scripts when a
variant's recipe changes and update the figures quoted beside each entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FAMILIES = ("optimum", "fused")  # optimum's exported graph; our GroupQueryAttention graph
KV_LAYOUTS = ("concat", "shared")  # see manifest.KV_LAYOUTS


@dataclass(frozen=True)
class VariantSpec:
    """What the project knows about one variant, whatever model it is exported from."""

    name: str  # the precision as users write it: "fp32", "fp32-fused", "int8", ...
    family: str  # "optimum" (optimum's graph) or "fused" (export/fused.py's graph)
    kv_layout: str  # "concat" or "shared" (manifest.KV_LAYOUTS)
    weight_dtype: str  # "float32", "float16", "int8", "int4": how the matmul weights are stored
    bytes_per_param: float  # disk bytes per parameter (export's free-space estimate)
    graph: str  # file name of its .onnx graph in a model directory
    thresholds: dict[str, float] = field(default_factory=dict, hash=False)  # verify's limits
    # Devices it suits -> rank (0 is tried first). TextGenerator.load picks, when no precision is
    # named, the present variant of lowest rank for the device; a device not listed never gets
    # this variant by default (it can still be named).
    preference: dict[str, int] = field(default_factory=dict, hash=False)
    fast_load: bool = False  # runs well without prepacked weights (plain float MatMuls only)
    description: str = ""  # one line for the CLI help

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"variant {self.name!r}: family {self.family!r} not in {FAMILIES}")
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"variant {self.name!r}: kv_layout {self.kv_layout!r} not in "
                             f"{KV_LAYOUTS}")
        if "logits_max_abs" not in self.thresholds and "mean_kl_max" not in self.thresholds:
            raise ValueError(f"variant {self.name!r}: thresholds need logits_max_abs (exact) "
                             "or mean_kl_max (inexact)")


_EXACT = {"logits_max_abs": 1e-3, "top1_agreement_min": 1.0}

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


def thresholds_for(name: str) -> dict[str, float]:
    """A copy of the verify thresholds of variant `name` (ValueError when unknown)."""
    return dict(get(name).thresholds)


# Exact variants: the same fp32 arithmetic in another order. Measured max abs logit diff vs
# PyTorch: 1.0e-5 on random gpt2-large (prefill, 512-token prompt), 3e-5 on tiny (logits of
# +-30); one damaged weight moves them by > 1e-2. Greedy tokens must be identical.
register(VariantSpec(
    name="fp32", family="optimum", kv_layout="concat", weight_dtype="float32",
    bytes_per_param=4.0, graph="model.onnx", thresholds=dict(_EXACT),
    preference={"cpu": 1, "cuda": 1}, fast_load=True,
    description="optimum's graph, float32 (verify's reference path)"))
# Same numbers as fp32, faster on CPU (shared KV buffer, last-row logits). Directories exported
# before this registry hold it as "model-fp32.onnx"; their manifests name that file and load.
register(VariantSpec(
    name="fp32-fused", family="fused", kv_layout="shared", weight_dtype="float32",
    bytes_per_param=4.0, graph="model-fp32-fused.onnx", thresholds=dict(_EXACT),
    preference={"cpu": 0, "cuda": 2}, fast_load=True,
    description="fused GroupQueryAttention graph, float32 (fastest exact CPU variant)"))
# Quantized / half precision: gated on mean KL(fp32 || variant) and on top-1 agreement at
# decisive positions (fp32's top-2 gap >= top1_margin nats; a flip inside the quantization
# noise is not a disagreement). From bench/results/quality.md (yardstick: 7.3 M parameters,
# 354 steps / 12 min, held-out perplexity 90.7; 16,320 held-out positions):
# int8 (MatMulNBits 8-bit, block 32, 8-bit shared token table): mean KL 2.9e-5, top-1 0.9941
# (1.0000 on the 88 % decisive positions), perplexity +0.012 %. Limits: KL x 10, decisive
# top-1 - 0.01, perplexity change x 8.
register(VariantSpec(
    name="int8", family="fused", kv_layout="shared", weight_dtype="int8",
    bytes_per_param=1.1, graph="model-int8.onnx",
    thresholds={"mean_kl_max": 3e-4, "top1_agreement_min": 0.99, "top1_margin": 0.1,
                "ppl_change_max": 1e-3},
    preference={"cpu": 2, "cuda": 3},
    description="fused graph, 8-bit weights (MatMulNBits)"))
# int4 (MatMulNBits 4-bit, block 32, 8-bit shared token table): mean KL 1.26e-4, top-1
# 0.9918 (1.0000 on the 76 % decisive positions), perplexity +0.028 %. Same margins.
register(VariantSpec(
    name="int4", family="fused", kv_layout="shared", weight_dtype="int4",
    bytes_per_param=0.6, graph="model-int4.onnx",
    thresholds={"mean_kl_max": 1.5e-3, "top1_agreement_min": 0.98, "top1_margin": 0.3,
                "ppl_change_max": 3e-3},
    preference={"cpu": 3},
    description="fused graph, 4-bit weights (MatMulNBits)"))
# PLACEHOLDER thresholds (not measured): to be derived from a GPU quality run of fp16.
register(VariantSpec(
    name="fp16", family="optimum", kv_layout="concat", weight_dtype="float16",
    bytes_per_param=2.0, graph="model-fp16.onnx",
    thresholds={"mean_kl_max": 1e-3, "top1_agreement_min": 0.97, "top1_margin": 0.1,
                "ppl_change_max": 0.01},
    preference={"cuda": 0, "cpu": 4}, fast_load=True,
    description="optimum's graph in float16 (for CUDA)"))
