"""One forward step of the ONNX graph, with the KV cache as an explicit value.

A `Decoder` wraps one onnxruntime session of one variant. `start()` returns an empty cache owned
by the caller; `forward()` takes the cache and returns logits and the next cache. Nothing about a
generation is stored on the decoder, so one decoder serves many threads at once.

Two KV layouts exist (see variants.KV_LAYOUTS): "concat" (optimum's graph: present = past + new,
a new tensor every step) here, and "shared" (a preallocated buffer written in place) in
shared_kv.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from gpt2_onnx.runtime.device import CPU, Device
from gpt2_onnx.runtime.manifest import ModelDims, Variant

if TYPE_CHECKING:  # onnxruntime is imported where a graph runs: the base install lacks it
    import onnxruntime as ort


class Decoder(Protocol):
    """What the generation loop needs from a graph."""

    dims: ModelDims
    variant: Variant

    def start(self, batch: int, max_len: int) -> object:
        """An empty cache for `batch` rows that will grow to at most `max_len` positions."""

    def forward(
        self,
        cache: object,
        input_ids: np.ndarray,  # int64 [batch, seq]
        attention_mask: np.ndarray,  # int64 [batch, past + seq]; 0 marks left padding
        position_ids: np.ndarray,  # int64 [batch, seq]
        *,
        all_logits: bool = False,
    ) -> tuple[np.ndarray, object]:
        """Run one step. Returns (logits, next cache).

        logits: float32 [batch, seq, vocab] when `all_logits`, else [batch, vocab] (last position).
        The cache passed in must not be used again after this call.
        """


@dataclass(frozen=True)
class ConcatCache:
    """KV cache of a "concat" graph: one OrtValue per past input name, [batch, n_head, past, hd]."""

    values: dict[str, ort.OrtValue]  # past input name -> OrtValue of that layer's key or value
    length: int  # past positions held (same for every row; padding included)


class DecoderBase:
    """What both decoders set up alike: the session, dims, variant, device, KV names and dtype."""

    def __init__(self, session: ort.InferenceSession, dims: ModelDims, variant: Variant,
                 device: Device = CPU) -> None:
        self.session = session
        self.dims = dims
        self.variant = variant
        self.device = device  # where the cache lives (device.ort_device, device.id)
        io = variant.io
        self._past = io.kv_inputs(dims.n_layer)
        self._present = io.kv_outputs(dims.n_layer)
        self._np_dtype = np.float16 if variant.dtype == "float16" else np.float32
        graph_inputs = {i.name for i in session.get_inputs()}
        self._feeds_position_ids = io.position_ids in graph_inputs


class ConcatDecoder(DecoderBase):
    """Runs optimum's text-generation-with-past graph with IOBinding.

    present.{i} of one step becomes past_key_values.{i} of the next without leaving the device:
    the OrtValues onnxruntime allocated for the outputs are bound as the next step's inputs. Only
    the logits come to the host (the last row unless `all_logits`).
    """

    def __init__(self, session: ort.InferenceSession, dims: ModelDims, variant: Variant,
                 device: Device = CPU) -> None:
        super().__init__(session, dims, variant, device)
        io = variant.io
        graph_outputs = {o.name for o in session.get_outputs()}
        # The last-row output, when the graph has one: [batch, vocab] comes down at prefill.
        self._last_logits = io.logits_last if io.logits_last in graph_outputs else ""

    def start(self, batch: int, max_len: int) -> ConcatCache:
        # Zero-length past tensors [b, h, 0, d]: onnxruntime accepts them from numpy on CPU. On
        # CUDA an empty allocation has a null data pointer (docs/facts.md), so the cache starts as
        # host-side empties there too; the first step's presents then live on the device.
        import onnxruntime as ort

        shape = (batch, self.dims.n_head, 0, self.dims.head_dim)
        empty = np.zeros(shape, dtype=self._np_dtype)
        values = {n: ort.OrtValue.ortvalue_from_numpy(empty) for n in self._past}
        return ConcatCache(values, 0)

    def forward(self, cache: ConcatCache, input_ids: np.ndarray, attention_mask: np.ndarray,
                position_ids: np.ndarray, *, all_logits: bool = False
                ) -> tuple[np.ndarray, ConcatCache]:
        io = self.variant.io
        binding = self.session.io_binding()
        # The small integer inputs go up each step (a few bytes per row at decode).
        binding.bind_cpu_input(io.input_ids, np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input(io.attention_mask,
                               np.ascontiguousarray(attention_mask, dtype=np.int64))
        if self._feeds_position_ids:
            binding.bind_cpu_input(io.position_ids,
                                   np.ascontiguousarray(position_ids, dtype=np.int64))
        for name in self._past:
            binding.bind_ortvalue_input(name, cache.values[name])
        # Logits to the host (only the last row when the graph offers it); presents stay where
        # the session runs.
        use_last = bool(self._last_logits) and not all_logits
        binding.bind_output(self._last_logits if use_last else io.logits, "cpu")
        for name in self._present:
            binding.bind_output(name, self.device.ort_device, self.device.id)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # in binding order, not graph order (docs/facts.md)
        logits_ov, presents = outputs[0], outputs[1:]
        logits = logits_ov.numpy()  # [batch, vocab] if use_last, else [batch, seq, vocab]
        if logits.dtype != np.float32:
            logits = logits.astype(np.float32)
        if not all_logits and not use_last:
            # A copy, not a view: a view would keep the whole [batch, seq, vocab] prefill array
            # (180 MB for 900 tokens) alive until the next step.
            logits = logits[:, -1, :].copy()  # [batch, vocab]
        seq = input_ids.shape[1]
        nxt = ConcatCache(dict(zip(self._past, presents, strict=True)), cache.length + seq)
        return logits, nxt

