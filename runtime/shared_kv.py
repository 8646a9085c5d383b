"""The Decoder for "shared" KV graphs (GroupQueryAttention over a preallocated buffer).

Each layer's key and value live in one buffer [batch, n_head, max_len, head_dim], allocated once
by `start()` and bound as both past and present every step: the graph writes the new positions in
place, so a decode step moves no cache. The SAME OrtValue must be bound every step (docs/facts.md:
re-creating it from numpy gave garbage).

GroupQueryAttention takes no attention mask, only each row's length (`seqlens_k` = length - 1).
So rows are kept ragged and left-aligned in the buffer: a left-padded prefill batch is shifted to
right padding (each row's tokens start at position 0), the graph attends only to a row's own
positions, and each decode step writes row b at its own length. Logits come back for the rows'
last real tokens only (`logits_index`), mapped back to the caller's left-padded layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from gpt2_onnx.runtime.decoder import DecoderBase
from gpt2_onnx.runtime.device import CPU, Device
from gpt2_onnx.runtime.errors import DecoderInputError
from gpt2_onnx.runtime.manifest import ModelDims, Variant

# Roles of VariantIO.extra_inputs a "shared" graph declares (name -> role).
ROLE_SEQLENS_K = "seqlens_k"  # int32 [batch]: each row's total length - 1 (after this step)
ROLE_TOTAL_LENGTH = "total_sequence_length"  # int32 scalar: the longest row's total length
ROLE_LOGITS_INDEX = "logits_index"  # int64 [batch, rows]: input positions whose logits to return
ROLES = (ROLE_SEQLENS_K, ROLE_TOTAL_LENGTH, ROLE_LOGITS_INDEX)


@dataclass(frozen=True)
class SharedKVCache:
    """KV cache of a "shared" graph.

    The buffers are written in place by every step, so an older SharedKVCache describes stale
    lengths of the same memory: only the latest one may be passed on.
    """

    buffers: dict[str, ort.OrtValue]  # past input name -> [batch, n_head, max_len, head_dim]
    lengths: np.ndarray  # int64 [batch]: real (unpadded) positions each row holds
    max_len: int  # positions the buffers hold


@dataclass(frozen=True)
class SlotCache:
    """KV buffers of a fixed set of slots, for the engine (one request per slot).

    Per layer one buffer [slots, n_head, max_len, head_dim]; slot b is one contiguous block, so
    a range of slots [first, first + n) is bound as a batch of n rows by pointer (no copy). On CPU
    the buffers are numpy zeros: pages are committed only as positions are written, so RSS grows
    with the tokens actually held, not with slots x max_len. The lengths each slot holds are the
    caller's (the engine's) business: the decoder is told them every call.
    """

    owners: dict[str, object]  # past input name -> the array / OrtValue that owns the memory
    pointers: dict[str, int]  # past input name -> address of slot 0
    slots: int
    max_len: int  # positions per slot
    slot_bytes: int  # bytes of one slot in one buffer
    device: str  # onnxruntime's name of where the buffers live ("cpu", "cuda")
    device_id: int = 0
    dtype: type = field(default=np.float32)


class SharedKVDecoder(DecoderBase):
    """Runs a kv_layout "shared" graph with IOBinding; only the logits come to the host."""

    def __init__(self, session: ort.InferenceSession, dims: ModelDims, variant: Variant,
                 device: Device = CPU) -> None:
        io = variant.io
        if not variant.shared_kv:
            raise ValueError(f"variant {variant.precision!r} has kv_layout {io.kv_layout!r}; "
                             "SharedKVDecoder runs 'shared' graphs only (use ConcatDecoder)")
        by_role = {role: name for name, role in io.extra_inputs.items()}
        missing = [r for r in ROLES if r not in by_role]
        if missing:
            raise ValueError(f"variant {variant.precision!r}: io.extra_inputs lacks the roles "
                             f"{missing} a shared-KV graph needs; re-export the model")
        super().__init__(session, dims, variant, device)
        self._seqlens_k = by_role[ROLE_SEQLENS_K]
        self._total_length = by_role[ROLE_TOTAL_LENGTH]
        self._logits_index = by_role[ROLE_LOGITS_INDEX]

    def start(self, batch: int, max_len: int) -> SharedKVCache:
        """Allocate zeroed buffers for `batch` rows of up to `max_len` positions."""
        if not 1 <= max_len <= self.dims.n_positions:
            raise DecoderInputError(f"max_len {max_len} must be in 1..{self.dims.n_positions} "
                             "(the model's n_positions)")
        if batch < 1:
            raise DecoderInputError(f"batch {batch} must be at least 1")
        shape = (batch, self.dims.n_head, max_len, self.dims.head_dim)
        zeros = np.zeros(shape, dtype=self._np_dtype)
        buffers = {}
        for name in self._past:
            # onnxruntime owns the memory (a numpy-backed OrtValue would die with the array).
            buf = ort.OrtValue.ortvalue_from_shape_and_type(shape, self._np_dtype,
                                                            self.device.ort_device,
                                                            self.device.id)
            buf.update_inplace(zeros)
            buffers[name] = buf
        return SharedKVCache(buffers, np.zeros(batch, dtype=np.int64), max_len)

    # ------------------------------------------------------------------ slots (the engine)
    def start_slots(self, slots: int, max_len: int) -> SlotCache:
        """Buffers for `slots` independent rows of up to `max_len` positions each."""
        if not 1 <= max_len <= self.dims.n_positions:
            raise DecoderInputError(f"max_len {max_len} must be in 1..{self.dims.n_positions} "
                                    "(the model's n_positions)")
        if slots < 1:
            raise DecoderInputError(f"slots must be at least 1, got {slots}")
        shape = (slots, self.dims.n_head, max_len, self.dims.head_dim)
        owners: dict[str, object] = {}
        pointers: dict[str, int] = {}
        on_host = self.device.ort_device == "cpu"
        zeros = None if on_host else np.zeros(shape, dtype=self._np_dtype)
        for name in self._past:
            if zeros is None:
                arr = np.zeros(shape, dtype=self._np_dtype)  # lazily committed zero pages
                owners[name], pointers[name] = arr, arr.ctypes.data
            else:
                buf = ort.OrtValue.ortvalue_from_shape_and_type(shape, self._np_dtype,
                                                                self.device.ort_device,
                                                                self.device.id)
                buf.update_inplace(zeros)  # no stale NaN where a kernel masks by multiplying
                owners[name], pointers[name] = buf, buf.data_ptr()
        slot_bytes = self.dims.n_head * max_len * self.dims.head_dim \
            * np.dtype(self._np_dtype).itemsize
        return SlotCache(owners, pointers, slots, max_len, slot_bytes, self.device.ort_device,
                         self.device.id, self._np_dtype)

    def prefill_slot(self, cache: SlotCache, slot: int, ids: Sequence[int], start: int
                     ) -> np.ndarray:
        """Append `ids` to slot `slot`, which holds `start` positions; logits of the last one.

        Batch 1 (GroupQueryAttention takes several new tokens over a past only for batch 1):
        a joining prompt is loaded chunk by chunk with this call. Returns float32 [vocab].
        """
        n = len(ids)
        if n < 1 or not 0 <= start or start + n > cache.max_len:
            raise DecoderInputError(f"prefill_slot: {n} tokens at position {start} do not fit "
                                    f"a slot of {cache.max_len} positions")
        logits = self._run_slots(
            cache, slot, 1,
            input_ids=np.asarray([ids], dtype=np.int64),  # [1, n]
            position_ids=np.arange(start, start + n, dtype=np.int64)[None, :],  # [1, n]
            lengths=np.array([start + n], dtype=np.int64),
            logits_index=np.array([[n - 1]], dtype=np.int64))
        return logits[0, 0]

    def decode_slots(self, cache: SlotCache, first: int, tokens: Sequence[int],
                     held: Sequence[int]) -> np.ndarray:
        """One new token for each slot of [first, first + len(tokens)); row r holds held[r]
        positions and writes its token there. Returns float32 logits [rows, vocab]."""
        held_arr = np.asarray(held, dtype=np.int64)  # [rows]
        rows = len(tokens)
        if held_arr.shape != (rows,) or rows < 1:
            raise DecoderInputError(
                "decode_slots: one held length per token, at least one row")
        logits = self._run_slots(
            cache, first, rows,
            input_ids=np.asarray(tokens, dtype=np.int64)[:, None],  # [rows, 1]
            position_ids=held_arr[:, None],  # [rows, 1]
            lengths=held_arr + 1,
            logits_index=np.zeros((rows, 1), dtype=np.int64))
        return logits[:, 0, :]

    def _bind_step_inputs(self, input_ids: np.ndarray, position_ids: np.ndarray,
                          lengths: np.ndarray, logits_index: np.ndarray) -> ort.IOBinding:
        """A fresh IOBinding with one step's small host inputs bound (ids, positions, each row's
        total length, the rows whose logits to return); the caller binds the KV buffers."""
        io = self.variant.io
        binding = self.session.io_binding()
        binding.bind_cpu_input(io.input_ids, np.ascontiguousarray(input_ids, dtype=np.int64))
        if self._feeds_position_ids:
            binding.bind_cpu_input(io.position_ids,
                                   np.ascontiguousarray(position_ids, dtype=np.int64))
        binding.bind_cpu_input(self._seqlens_k, (lengths - 1).astype(np.int32))
        binding.bind_cpu_input(self._total_length, np.array(lengths.max(), dtype=np.int32))
        binding.bind_cpu_input(self._logits_index,
                               np.ascontiguousarray(logits_index, dtype=np.int64))
        return binding

    def _run_slots(self, cache: SlotCache, first: int, rows: int, *, input_ids: np.ndarray,
                   position_ids: np.ndarray, lengths: np.ndarray, logits_index: np.ndarray
                   ) -> np.ndarray:
        """Bind slots [first, first + rows) by address as past and present; run once."""
        if not 0 <= first or first + rows > cache.slots:
            raise DecoderInputError(
                f"slots {first}..{first + rows - 1} outside 0..{cache.slots - 1}")
        if int(lengths.max()) > cache.max_len:
            raise DecoderInputError(f"a row would hold {int(lengths.max())} positions; the "
                                    f"slots hold {cache.max_len}")
        io = self.variant.io
        binding = self._bind_step_inputs(input_ids, position_ids, lengths, logits_index)
        shape = [rows, self.dims.n_head, cache.max_len, self.dims.head_dim]
        for past, present in zip(self._past, self._present, strict=True):
            ptr = cache.pointers[past] + first * cache.slot_bytes
            binding.bind_input(past, cache.device, cache.device_id, cache.dtype, shape, ptr)
            binding.bind_output(present, cache.device, cache.device_id, cache.dtype, shape, ptr)
        binding.bind_output(io.logits, "cpu")
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[-1].numpy()  # bound last: [rows, 1, vocab]
        if logits.dtype != np.float32:
            logits = logits.astype(np.float32)
        return logits

    # ------------------------------------------------------------------ the Decoder protocol
    def forward(self, cache: SharedKVCache, input_ids: np.ndarray, attention_mask: np.ndarray,
                position_ids: np.ndarray, *, all_logits: bool = False
                ) -> tuple[np.ndarray, SharedKVCache]:
        """One step; see `Decoder.forward`. Logits of padding positions are meaningless."""
        input_ids = np.asarray(input_ids, dtype=np.int64)  # [batch, seq]
        attention_mask = np.asarray(attention_mask, dtype=np.int64)  # [batch, past + seq]
        position_ids = np.asarray(position_ids, dtype=np.int64)  # [batch, seq]
        batch, seq = input_ids.shape
        if cache.lengths.shape != (batch,):
            raise DecoderInputError(
                f"input_ids has {batch} rows, the cache {cache.lengths.shape[0]}")
        if attention_mask.shape[0] != batch or attention_mask.shape[1] < seq:
            raise DecoderInputError(f"attention_mask shape {attention_mask.shape} does not fit "
                                    f"input_ids {input_ids.shape}")
        new_mask = attention_mask[:, -seq:]  # [batch, seq]
        if not cache.lengths.any():
            return self._prefill(cache, input_ids, new_mask, position_ids, all_logits)
        if not new_mask.all():
            raise DecoderInputError("after the first step every new token must have "
                                    "attention_mask 1 (only the prompt may be left-padded)")
        if not (attention_mask.sum(axis=1) == cache.lengths + seq).all():
            raise DecoderInputError("attention_mask does not match the cache: each row's 1s "
                                    "must count the positions it holds plus the new tokens")
        # GroupQueryAttention takes several new tokens over a past for batch 1 only: feed them
        # one at a time (a rare path: the generation loop sends one token per step).
        steps = []
        for t in range(seq):
            logits, cache = self._run(cache, input_ids[:, t:t + 1], position_ids[:, t:t + 1],
                                      cache.lengths + 1, np.zeros((batch, 1), dtype=np.int64))
            steps.append(logits)  # [batch, 1, vocab]
        out = np.concatenate(steps, axis=1)  # [batch, seq, vocab]
        return (out if all_logits else out[:, -1, :]), cache

    def _prefill(self, cache: SharedKVCache, input_ids: np.ndarray, mask: np.ndarray,
                 position_ids: np.ndarray, all_logits: bool
                 ) -> tuple[np.ndarray, SharedKVCache]:
        """First step: left-padded rows -> right-padded rows starting at buffer position 0."""
        batch, seq = input_ids.shape
        lengths = mask.sum(axis=1)  # [batch] real tokens per row
        if (lengths < 1).any():
            raise DecoderInputError("every row needs at least one token with attention_mask 1")
        pads = seq - lengths  # [batch]
        cols = np.arange(seq)  # [seq]
        if not (mask == (cols[None, :] >= pads[:, None])).all():
            raise DecoderInputError(
                "attention_mask must be left padding (0s) followed by 1s per row")
        # Right-padded column j of row b holds left-padded column j + pad_b.
        src = np.minimum(cols[None, :] + pads[:, None], seq - 1)  # [batch, seq]
        valid = cols[None, :] < lengths[:, None]  # [batch, seq]
        ids = np.where(valid, np.take_along_axis(input_ids, src, axis=1), 0)
        pos = np.where(valid, np.take_along_axis(position_ids, src, axis=1), 0)
        if all_logits:  # caller's column j (j >= pad_b) is right-padded column j - pad_b
            index = np.maximum(cols[None, :] - pads[:, None], 0)  # [batch, seq]
        else:
            index = (lengths - 1)[:, None]  # [batch, 1]
        logits, cache = self._run(cache, ids, pos, lengths, index)
        return (logits if all_logits else logits[:, 0, :]), cache

    def _run(self, cache: SharedKVCache, input_ids: np.ndarray, position_ids: np.ndarray,
             lengths: np.ndarray, logits_index: np.ndarray) -> tuple[np.ndarray, SharedKVCache]:
        """Bind and run the graph once; `lengths` are the rows' totals after this step."""
        if int(lengths.max()) > cache.max_len:
            raise DecoderInputError(f"a row would hold {int(lengths.max())} positions; the cache "
                                    f"was started with max_len {cache.max_len}")
        io = self.variant.io
        binding = self._bind_step_inputs(input_ids, position_ids, lengths, logits_index)
        for past, present in zip(self._past, self._present, strict=True):
            buf = cache.buffers[past]
            binding.bind_ortvalue_input(past, buf)
            binding.bind_ortvalue_output(present, buf)  # same memory: written in place
        binding.bind_output(io.logits, "cpu")
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[-1].numpy()  # bound last: [batch, rows, vocab]
        if logits.dtype != np.float32:
            logits = logits.astype(np.float32)
        return logits, SharedKVCache(cache.buffers, lengths.astype(np.int64), cache.max_len)
