"""TextGenerator: load a model directory and run the explicit token loop.

prefill once -> pick a token per row -> feed it back with the KV cache -> repeat. The cache and
the random generators belong to one call, so one loaded TextGenerator serves many threads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer

from gpt2_onnx.runtime import variants
from gpt2_onnx.runtime.batch import static_batch
from gpt2_onnx.runtime.config import DEFAULTS
from gpt2_onnx.runtime.device import (
    Device,
    check_variant_on_device,
    import_onnxruntime,
    resolve_device,
)
from gpt2_onnx.runtime.engine import Engine
from gpt2_onnx.runtime.errors import GenerationError, ModelDirError
from gpt2_onnx.runtime.manifest import Manifest, Variant, check_graph_io, read_manifest
from gpt2_onnx.runtime.params import GenerationParams, resolve, takes_generation_keywords
from gpt2_onnx.runtime.results import Candidate as Candidate  # re-exported (older imports)
from gpt2_onnx.runtime.results import DoneEvent, GenerationResult, TokenEvent
from gpt2_onnx.runtime.results import StepRecord as StepRecord
from gpt2_onnx.runtime.results import Timings as Timings
from gpt2_onnx.runtime.scoring import TextScore, score_texts
from gpt2_onnx.runtime.validation import check_bool, check_threads, check_token_ids

if TYPE_CHECKING:
    from gpt2_onnx.runtime.decoder import Decoder
    from gpt2_onnx.runtime.request import Request

# TextGenerator's own engine (shared-KV variants): its slots, prefill chunk and budget are the
# engine's defaults (config.DEFAULTS); these two are its own.
ENGINE_IDLE_STOP = 5.0  # seconds idle before its thread and buffers go away
ENGINE_MAX_QUEUE = 1 << 20  # generate() queues any number of prompts


class TextGenerator:
    """A loaded model directory: tokenizer + one variant's session + the generation front ends.

    Shared-KV variants generate on one continuous-batching Engine per TextGenerator (so calls
    from several threads share its batch); optimum's concat-KV graph runs static batches
    (batch.py). Both use the same per-row output step (`output.Sequence`).
    """

    # Settings of `engine()`, read when it is first created. engine_slots = 0: no engine, every
    # call runs its own static batch in the caller's thread (the behaviour before the engine).
    engine_slots: int = DEFAULTS.slots
    engine_prefill_chunk: int = DEFAULTS.prefill_chunk
    engine_prefill_budget: float | None = DEFAULTS.prefill_budget

    def __init__(self, manifest: Manifest, tokenizer: Tokenizer, decoder: Decoder,
                 device: Device, model_dir: Path) -> None:
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.device = device
        self.model_dir = model_dir
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model_dir: str | Path, device: str | Device = "auto",
             precision: str | None = None, threads: int | None = None,
             fast_load: bool = False, tf32: bool = False, *,
             manifest: Manifest | None = None) -> TextGenerator:
        """Read the manifest, the tokenizer and one variant's graph.

        device: "auto" (CUDA when onnxruntime-gpu can use it, else CPU), "cpu", "cuda",
          "cuda:1" (a GPU by id), or a Device (runtime/device.py; e.g. with provider options).
        precision: a variant listed in the manifest; default the device's preferred one present
          (runtime/variants.py).
        threads: intra-op threads; default the physical cores.
        fast_load: skip weight prepacking (fp32 variants only): random gpt2-large fp32-fused
          loads in 0.5 s instead of 4.5 s and peaks at its weights' size, decoding ~6 % slower.
        tf32: allow TF32 matmuls on CUDA (faster fp32, no longer PyTorch's fp32 numbers); off
          by default (runtime/device.py DEFAULT_OPTIONS), no effect on CPU.
        manifest: the directory's manifest when the caller already read it (read_manifest of
          the same directory: a server checks it before listening), so it is not read again.
        """
        threads = check_threads(threads)
        fast_load = check_bool("fast_load", fast_load)
        root = Path(model_dir)
        if manifest is None:
            manifest = read_manifest(root)
        resolved = resolve_device(device)
        variant = pick_variant(manifest, precision, resolved)
        check_variant_on_device(variant, resolved)
        if tf32 and resolved.name == "cuda":
            resolved = resolved.with_options(use_tf32="1")
        if fast_load and not variants.get(variant.precision).fast_load:
            allowed = [n for n in variants.names() if variants.get(n).fast_load]
            raise ValueError(
                f"fast_load: only for {', '.join(allowed)} variants; "
                f"{variant.precision} needs its weights prepacked (it would decode ~30x slower)")
        import_onnxruntime()  # MissingExtraError naming the extra, before any other work
        from gpt2_onnx.runtime.session import create_session

        tokenizer = load_tokenizer(root / manifest.tokenizer, manifest.dims.vocab_size)
        session = create_session(root / variant.graph, resolved, threads,
                                 prepack=not fast_load)
        check_graph_io(root / variant.graph, manifest.dims, variant,
                       [(i.name, i.shape, i.type) for i in session.get_inputs()],
                       [(o.name, o.shape, o.type) for o in session.get_outputs()])
        decoder = make_decoder(session, manifest, variant, resolved)
        return cls(manifest, tokenizer, decoder, resolved, root)

    @property
    def precision(self) -> str:
        return self.decoder.variant.precision

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special handling: "<|endoftext|>" maps to its id)."""
        return encode_text(self.tokenizer, text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.check_ids(ids, "ids")
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def check_ids(self, ids: Sequence[int], what: str) -> None:
        """ValueError naming `what` unless `ids` is a list of this model's token ids."""
        check_token_ids(what, ids, self.manifest.dims.vocab_size)

    # ------------------------------------------------------------------ public API
    @takes_generation_keywords()
    def generate(self, prompt_or_prompts: str | Sequence[str], *,
                 params: GenerationParams | None = None, **keywords: Any
                 ) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (returns a result) or a list (returns a list, same order).

        Settings: the generation keywords (max_new_tokens, greedy, top_k, top_p, temperature,
        repetition_penalty, seed, stop, show_top, sampling: see
        `GenerationParams.from_keywords`), or one `params=GenerationParams(...)`.
        Each prompt gets the tokens it would get alone (greedy exactly; sampling too, each
        drawing from its own generator seeded `seed`). One prompt on a shared-KV variant runs on
        this generator's engine, in one batch with whatever other threads ask at the same time;
        a list of prompts (and any call on optimum's concat-KV graph) runs as one static,
        left-padded batch.
        """
        single = isinstance(prompt_or_prompts, str)
        prompts = _prompt_list(prompt_or_prompts)
        ids = [self.encode(p) for p in prompts]
        params = resolve("generate", self.manifest.dims, params, keywords)
        results = self._generate_rows(ids, prompts, params)
        return results[0] if single else results

    @takes_generation_keywords()
    def validate(self, prompt_or_prompts: str | Sequence[str], *,
                 params: GenerationParams | None = None, **keywords: Any) -> None:
        """Raise the error `generate` would raise for these prompts and settings, without
        running the model: a caller streaming several prompts checks them all before printing
        anything. Prompts are named by their index in the list ("prompt 1" is the second)."""
        params = resolve("validate", self.manifest.dims, params, keywords)
        for i, prompt in enumerate(_prompt_list(prompt_or_prompts)):
            ids = encode_text(self.tokenizer, prompt, f"prompt {i}")
            params.check_prompt(ids, self.manifest.dims, f"prompt {i}")

    @takes_generation_keywords(exclude=("show_top",))
    def stream(self, prompt: str, *, params: GenerationParams | None = None,
               **keywords: Any) -> Iterator[str]:
        """Yield the new text piece by piece as tokens are produced (the settings: `generate`'s
        less show_top; `stream_events` carries the candidates).

        A multi-byte character is never split, text that may begin a stop string is held back
        until it is known not to, and the pieces join to exactly `generate(...).text`.
        """
        if not isinstance(prompt, str):
            raise ValueError("prompt: stream takes one string")
        params = resolve("stream", self.manifest.dims, params, keywords, exclude=("show_top",))
        prompt_ids = self.encode(prompt)
        # Validated (and, on the engine, submitted) here, when stream() is called, not at the
        # first next(): a caller (the CLI) learns about a bad setting before it prints anything.
        params.check_prompt(prompt_ids, self.manifest.dims, "prompt 0")
        return _text_pieces(self._events(prompt, prompt_ids, params))

    def stream_events(self, prompt_ids: Sequence[int], params: GenerationParams, *,
                      prompt: str | None = None) -> Iterator[TokenEvent | DoneEvent]:
        """One request's events: a TokenEvent per new token (id, text delta, logprob, top-N
        candidates), then a DoneEvent (finish reason, counts, timings). Validated here, before
        the first event; on the engine when this variant has one, else a static batch of one."""
        self.check_ids(prompt_ids, "prompt")
        ids = [int(t) for t in prompt_ids]
        params.validate(self.manifest.dims)
        params.check_prompt(ids, self.manifest.dims)
        return self._events(prompt if prompt is not None else self.decode(ids), ids, params)

    def _events(self, prompt: str, prompt_ids: list[int], params: GenerationParams
                ) -> Iterator[TokenEvent | DoneEvent]:
        if self.uses_engine:
            return _request_events(self.engine().submit(prompt_ids, params, prompt=prompt))
        return self._static_events(prompt, prompt_ids, params)

    def _static_events(self, prompt: str, prompt_ids: list[int], params: GenerationParams
                       ) -> Iterator[TokenEvent | DoneEvent]:
        for out in self._static_batch([prompt_ids], [prompt], params):
            (ev,) = out
            if isinstance(ev, TokenEvent):
                yield ev
            elif isinstance(ev, GenerationResult):  # the last yield: the result
                yield DoneEvent(finish_reason=ev.finish_reason, prompt_tokens=len(prompt_ids),
                                completion_tokens=len(ev.ids), timings=ev.timings,
                                text=ev.text, ids=ev.ids)

    @takes_generation_keywords()
    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], *,
                     prompts: Sequence[str] | None = None,
                     params: GenerationParams | None = None,
                     **keywords: Any) -> list[GenerationResult]:
        """`generate` from token ids (one list per prompt); ids outside the vocab are refused."""
        params = resolve("generate_ids", self.manifest.dims, params, keywords)
        return self._generate_rows(prompt_ids, prompts, params)

    def _generate_rows(self, prompt_ids: Sequence[Sequence[int]],
                       prompts: Sequence[str] | None, params: GenerationParams
                       ) -> list[GenerationResult]:
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids or not all(
                isinstance(p, (list, tuple)) for p in prompt_ids):
            raise ValueError("prompt_ids: give a non-empty list of token-id lists (one per prompt)")
        rows = []
        for i, ids in enumerate(prompt_ids):
            self.check_ids(ids, f"prompt {i}")
            params.check_prompt(ids, self.manifest.dims, f"prompt {i}")
            rows.append([int(t) for t in ids])
        texts = list(prompts) if prompts is not None else [self.decode(p) for p in rows]
        # One prompt: on the engine (calls from several threads share its batch). A list that
        # starts together: one static batch, which is faster for it today (random gpt2-large
        # int4, 8 prompts x 48 tokens: 70-80 tok/s static against 38-43 on the engine).
        if self.uses_engine and len(rows) == 1:
            return self._generate_on_engine(rows, texts, params)
        results: list[GenerationResult] = []
        for results in self._static_batch(rows, texts, params):  # noqa: B007
            pass
        return results  # the last yield: the finished results

    @takes_generation_keywords()
    def params(self, **keywords: Any) -> GenerationParams:
        """The generation keywords (see `GenerationParams.from_keywords`) as one GenerationParams
        validated for this model: ParameterError naming every bad setting."""
        return resolve("params", self.manifest.dims, None, keywords)

    def score(
        self,
        texts: str | Sequence[str],
        *,
        batch_size: int = 8,
        add_bos: bool = True,
        stride: int | None = None,
    ) -> TextScore | list[TextScore]:
        """Log-probabilities of each text under the model: one TextScore per text (or one for
        a string) with per-token log-probs (natural log), total, token count and perplexity.

        <|endoftext|> is put before each text so every token is scored (= transformers' loss on
        [bos] + ids); add_bos=False scores from the second token on. Texts longer than
        n_positions are scored in windows starting every `stride` tokens (default half the
        context). Aggregate with `gpt2_onnx.runtime.scoring.perplexity(scores)`.
        """
        single = isinstance(texts, str)
        scores = score_texts(self, [texts] if single else texts, batch_size=batch_size,
                             add_bos=add_bos, stride=stride)
        return scores[0] if single else scores

    # ------------------------------------------------------------------ the engine
    @property
    def uses_engine(self) -> bool:
        """True when generation runs on the continuous-batching engine (shared-KV variants);
        False for optimum's concat-KV graph, which runs static batches."""
        return self.engine_slots > 0 and self.decoder.variant.shared_kv

    def engine(self) -> Engine:
        """This generator's own engine (created on first use, shared by every thread calling
        generate/stream; its thread and KV buffers go away after ENGINE_IDLE_STOP idle seconds
        and come back on the next call). Settings: the engine_* attributes."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = Engine(self, slots=self.engine_slots, max_queue=ENGINE_MAX_QUEUE,
                                      prefill_chunk=self.engine_prefill_chunk,
                                      prefill_budget=self.engine_prefill_budget,
                                      idle_stop=ENGINE_IDLE_STOP).start()
            return self._engine

    def _generate_on_engine(self, rows: list[list[int]], texts: list[str],
                            params: GenerationParams) -> list[GenerationResult]:
        engine = self.engine()
        requests = []
        try:
            for ids, text in zip(rows, texts, strict=True):
                requests.append(engine.submit(ids, params, prompt=text))
            return [r.result() for r in requests]
        finally:  # an interrupted caller (Ctrl-C, an exception) frees its slots
            for r in requests:
                if not r.done:
                    r.cancel()

    # ------------------------------------------------------------------ static batches
    def _static_batch(self, rows: list[list[int]], texts: list[str], params: GenerationParams
                      ) -> Iterator[list]:
        """Rows as one static batch on this generator's decoder (batch.static_batch: each
        step's events, then the results)."""
        return static_batch(self.decoder, self.tokenizer, self.manifest.dims, rows, texts,
                            params)

    def close(self) -> None:
        """Stop this generator's engine thread now (it also stops by itself when idle)."""
        with self._engine_lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()


# ---------------------------------------------------------------------- helpers


def pick_variant(manifest: Manifest, precision: str | None, device: Device) -> Variant:
    """The variant to run: the one asked for, else the device's preferred one present (the
    registry's ranks), else the manifest's first. ValueError for an unknown precision."""
    available = list(manifest.variants)
    for name in available:
        variants.get(name)  # an unknown variant in the manifest is an error, not skipped
    if precision is not None:
        variants.get(precision)
        if precision not in manifest.variants:
            raise ValueError(f"precision {precision!r}: this model directory has "
                             f"{', '.join(available)}")
        return manifest.variants[precision]
    for p in variants.preferred(device.name):
        if p in manifest.variants:
            return manifest.variants[p]
    return manifest.variants[available[0]]


def make_decoder(session: object, manifest: Manifest, variant: Variant,
                 device: Device) -> Decoder:
    """The decoder of the variant's KV layout (Variant.shared_kv)."""
    from gpt2_onnx.runtime.decoder import ConcatDecoder

    if variant.shared_kv:
        from gpt2_onnx.runtime.shared_kv import SharedKVDecoder

        return SharedKVDecoder(session, manifest.dims, variant, device)
    return ConcatDecoder(session, manifest.dims, variant, device)


def load_tokenizer(path: Path, vocab_size: int) -> Tokenizer:
    """Load tokenizer.json; ModelDirError naming the file when it is missing, unreadable, not a
    tokenizer, or not the model's (see `vocab_fits`)."""
    if not path.is_file():
        raise ModelDirError(f"{path}: missing. Copy the model directory again or re-export.")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ModelDirError(f"{path}: cannot be read ({exc.strerror or exc}). Check its "
                            "permissions or copy the model directory again.") from exc
    except UnicodeDecodeError as exc:
        raise ModelDirError(f"{path}: not a valid tokenizers file (not UTF-8 text). Copy it "
                            "again or re-export the model.") from exc
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise ModelDirError(
            f"{path}: not a valid tokenizers file ({str(exc)[:200]}). Copy it again or "
            "re-export the model."
        ) from exc
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if not vocab_fits(size, vocab_size):
        raise ModelDirError(
            f"{path}: {size} tokens but the model has {vocab_size} logits (allowed: "
            f"{size} up to {_padded(size)}, the tokenizer's size padded to a multiple of "
            f"{VOCAB_PADDING}); the tokenizer belongs to another model. Re-export.")
    return tokenizer


# The model's vocabulary may exceed the tokenizer's only by padding up to a multiple of this
# (nanoGPT-style checkpoints pad GPT-2's 50257 to 50304); any other difference means ids the
# tokenizer cannot decode would be generated, or tokens the model has no logit for.
VOCAB_PADDING = 128


def _padded(size: int) -> int:
    return -(-size // VOCAB_PADDING) * VOCAB_PADDING


def vocab_fits(tokenizer_size: int, vocab_size: int) -> bool:
    """True when a tokenizer of `tokenizer_size` tokens belongs to a model of `vocab_size`
    logits: equal, or the model padded up to the next multiple of VOCAB_PADDING."""
    return tokenizer_size <= vocab_size <= _padded(tokenizer_size)


def encode_text(tokenizer: Tokenizer, text: str, what: str = "prompt") -> list[int]:
    """Token ids of `text`; ValueError naming `what` for a non-string or a string that is not
    valid Unicode (lone surrogates: what Python makes of invalid UTF-8 bytes in argv)."""
    if not isinstance(text, str):
        raise ValueError(f"{what}: expected a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        origin = f"a lone surrogate (U+{code:04X})" + (
            f": the byte 0x{code - 0xDC00:02X} of invalid UTF-8 input"
            if 0xDC80 <= code <= 0xDCFF else "")
        raise ValueError(
            f"{what}: character {exc.start} is {origin}, not valid Unicode text; fix the "
            "input's encoding (the prompt must be UTF-8)"
        ) from exc
    return tokenizer.encode(text, add_special_tokens=False).ids


def _prompt_list(prompt_or_prompts: object) -> list[str]:
    """One prompt or a non-empty list/tuple of them, as a list; ValueError otherwise."""
    if isinstance(prompt_or_prompts, str):
        return [prompt_or_prompts]
    if not isinstance(prompt_or_prompts, (list, tuple)):
        raise ValueError("prompt: give a string or a non-empty list of strings, got "
                         f"{type(prompt_or_prompts).__name__}")
    prompts = list(prompt_or_prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt: give a string or a non-empty list of strings")
    return prompts


def _request_events(request: Request) -> Iterator[TokenEvent | DoneEvent]:
    """An engine request's events; cancels it when the consumer stops early."""
    try:
        yield from request.events()
    finally:
        if not request.done:
            request.cancel()


def _text_pieces(events: Iterator[TokenEvent | DoneEvent]) -> Iterator[str]:
    """The non-empty text deltas of a request's events (GenerationError if it failed)."""
    try:
        for ev in events:
            if isinstance(ev, DoneEvent):
                if ev.tail:
                    yield ev.tail
                if ev.finish_reason == "error":
                    raise GenerationError(f"generation failed: {ev.error}")
            elif ev.text:
                yield ev.text
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
