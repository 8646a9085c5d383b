"""TextGenerator: load a model directory and run the explicit token loop.

prefill once -> pick a token per row -> feed it back with the KV cache -> repeat. The cache and
the random generators belong to one call, so one loaded TextGenerator serves many threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from gpt2_onnx.runtime import variants
from gpt2_onnx.runtime.device import Device, import_onnxruntime, resolve_device
from gpt2_onnx.runtime.errors import ModelDirError
from gpt2_onnx.runtime.manifest import Manifest, Variant, read_manifest
from gpt2_onnx.runtime.sampling import SamplingSettings, sample_token, softmax, top_candidates
from gpt2_onnx.runtime.scoring import TextScore, score_texts

if TYPE_CHECKING:
    from gpt2_onnx.runtime.decoder import Decoder


@dataclass(frozen=True)
class Timings:
    prefill_ms: float  # prompt -> first logits (time to first token, sampling excluded)
    decode_ms: float  # all later steps
    decode_tokens_per_s: float  # tokens of this row / decode time (0 when nothing decoded)


@dataclass(frozen=True)
class Candidate:
    id: int
    text: str
    prob: float


@dataclass(frozen=True)
class StepRecord:
    """Explain mode: what the model offered at one step and what was chosen."""

    step: int
    candidates: list[Candidate]  # top-N by probability (raw softmax of the logits)
    chosen: Candidate  # prob is its raw softmax probability


@dataclass(frozen=True)
class GenerationResult:
    prompt: str
    prompt_ids: list[int]
    ids: list[int]  # new tokens only (the EOS token included when finish_reason is "eos")
    text: str  # new text only, special tokens skipped, cut before a stop string
    finish_reason: str  # "length", "eos" or "stop"
    timings: Timings
    steps: list[StepRecord] = field(default_factory=list)  # filled when show_top > 0


@dataclass
class _Row:
    """Per-prompt state of one generation call."""

    prompt: str
    prompt_ids: list[int]
    rng: np.random.Generator
    ids: list[int] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_at: int | None = None  # character offset of the matched stop string in the text
    steps: list[StepRecord] = field(default_factory=list)


class TextGenerator:
    """A loaded model directory: tokenizer + one variant's session + the generation loop."""

    def __init__(self, manifest: Manifest, tokenizer: Tokenizer, decoder: Decoder,
                 device: Device, model_dir: Path) -> None:
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.device = device
        self.model_dir = model_dir

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model_dir: str | Path, device: str | Device = "auto",
             precision: str | None = None, threads: int | None = None,
             fast_load: bool = False) -> TextGenerator:
        """Read the manifest, the tokenizer and one variant's graph.

        device: "auto" (CUDA when onnxruntime-gpu can use it, else CPU), "cpu", "cuda",
          "cuda:1" (a GPU by id), or a Device (runtime/device.py; e.g. with provider options).
        precision: a variant listed in the manifest; default the device's preferred one present
          (runtime/variants.py).
        threads: intra-op threads; default the physical cores.
        fast_load: skip weight prepacking (fp32 variants only): random gpt2-large fp32-fused
          loads in 0.5 s instead of 4.5 s and peaks at its weights' size, decoding ~6 % slower.
        """
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        root = Path(model_dir)
        manifest = read_manifest(root)
        resolved = resolve_device(device)
        variant = pick_variant(manifest, precision, resolved)
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
        decoder = make_decoder(session, manifest, variant, resolved)
        return cls(manifest, tokenizer, decoder, resolved, root)

    @property
    def precision(self) -> str:
        return self.decoder.variant.precision

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special handling: "<|endoftext|>" maps to its id)."""
        if not isinstance(text, str):
            raise ValueError(f"prompt: expected a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"prompt: character {exc.start} is a lone surrogate "
                f"(U+{ord(text[exc.start]):04X}), not valid Unicode text; fix the input's "
                "decoding"
            ) from exc
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self._check_ids(ids, "ids")
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _check_ids(self, ids: Sequence[int], what: str) -> None:
        vocab = self.manifest.dims.vocab_size
        if not isinstance(ids, (list, tuple, np.ndarray)):
            raise ValueError(f"{what}: expected a list of token ids, got {type(ids).__name__}")
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer))
               or not 0 <= int(i) < vocab]
        if bad:
            raise ValueError(f"{what}: token ids must be integers in [0, {vocab - 1}]; "
                             f"got {bad[:5]}")

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompt_or_prompts: str | Sequence[str],
        *,
        max_new_tokens: int = 64,
        greedy: bool = False,
        top_k: int | None = 50,
        top_p: float = 1.0,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        show_top: int = 0,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (returns a result) or a list (returns a list, same order).

        Several prompts run as one left-padded batch; each row gets the tokens it would get alone
        (greedy exactly; sampling too, each row drawing from its own generator seeded `seed`).
        """
        single = isinstance(prompt_or_prompts, str)
        if not single and not isinstance(prompt_or_prompts, (list, tuple)):
            raise ValueError("prompt: give a string or a non-empty list of strings, got "
                             f"{type(prompt_or_prompts).__name__}")
        prompts = [prompt_or_prompts] if single else list(prompt_or_prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt: give a string or a non-empty list of strings")
        results = self.generate_ids(
            [self.encode(p) for p in prompts], prompts=prompts, max_new_tokens=max_new_tokens,
            greedy=greedy, top_k=top_k, top_p=top_p, temperature=temperature,
            repetition_penalty=repetition_penalty, seed=seed, stop=stop, show_top=show_top)
        return results[0] if single else results

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        greedy: bool = False,
        top_k: int | None = 50,
        top_p: float = 1.0,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> Iterator[str]:
        """Yield the new text piece by piece as tokens are produced.

        A multi-byte character is never split, text that may begin a stop string is held back
        until it is known not to, and the pieces join to exactly `generate(...).text`.
        """
        if not isinstance(prompt, str):
            raise ValueError("prompt: stream takes one string")
        stops = _stop_list(stop)
        settings = SamplingSettings(greedy=greedy, top_k=top_k, top_p=top_p,
                                    temperature=temperature,
                                    repetition_penalty=repetition_penalty)
        prompt_ids = self.encode(prompt)
        # Validated here, when stream() is called, not at the first next(): a caller (the CLI)
        # learns about a bad setting before it prints anything.
        self._validate([prompt_ids], max_new_tokens, settings, 0, seed)
        return self._stream(prompt, prompt_ids, max_new_tokens, settings, seed, stops)

    def _stream(self, prompt: str, prompt_ids: list[int], max_new_tokens: int,
                settings: SamplingSettings, seed: int | None, stops: list[str]
                ) -> Iterator[str]:
        emitted = 0
        pieces: list[str] = []

        def on_token(text: str, final: bool) -> None:
            nonlocal emitted
            safe = len(text) if final else _stable_length(text, stops)
            if safe > emitted:
                pieces.append(text[emitted:safe])
                emitted = safe

        loop = self._loop([prompt_ids], [prompt], max_new_tokens=max_new_tokens,
                          settings=settings, seed=seed, stops=stops, show_top=0,
                          on_text=on_token)
        for _ in loop:
            yield from pieces
            pieces.clear()
        yield from pieces

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        prompts: Sequence[str] | None = None,
        max_new_tokens: int = 64,
        greedy: bool = False,
        top_k: int | None = 50,
        top_p: float = 1.0,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        show_top: int = 0,
    ) -> list[GenerationResult]:
        """`generate` from token ids (one list per prompt); ids outside the vocab are refused."""
        settings = SamplingSettings(greedy=greedy, top_k=top_k, top_p=top_p,
                                    temperature=temperature,
                                    repetition_penalty=repetition_penalty)
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids or not all(
                isinstance(p, (list, tuple)) for p in prompt_ids):
            raise ValueError("prompt_ids: give a non-empty list of token-id lists (one per prompt)")
        for i, ids in enumerate(prompt_ids):
            self._check_ids(ids, f"prompt {i}")
        texts = list(prompts) if prompts is not None else [self.decode(p) for p in prompt_ids]
        loop = self._loop([list(p) for p in prompt_ids], texts, max_new_tokens=max_new_tokens,
                          settings=settings, seed=seed, stops=_stop_list(stop),
                          show_top=show_top, on_text=None)
        results: list[GenerationResult] = []
        for results in loop:  # noqa: B007 - the last yield holds the finished results
            pass
        return results

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
        scores = score_texts(self, [texts] if single else list(texts), batch_size=batch_size,
                             add_bos=add_bos, stride=stride)
        return scores[0] if single else scores

    # ------------------------------------------------------------------ the loop
    def _validate(self, prompt_ids: list[list[int]], max_new_tokens: int,
                  settings: SamplingSettings, show_top: int, seed: int | None) -> None:
        dims = self.manifest.dims
        settings.validate(dims.vocab_size)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                                 or seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not isinstance(show_top, int) or not 0 <= show_top <= dims.vocab_size:
            raise ValueError(f"show_top must be in [0, {dims.vocab_size}], got {show_top!r}")
        for i, ids in enumerate(prompt_ids):
            self._check_ids(ids, f"prompt {i}")
            if len(ids) > dims.n_positions:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens, more than n_positions="
                    f"{dims.n_positions} the model allows; shorten it"
                )
            room = dims.n_positions - max(len(ids), 1)
            if max_new_tokens > room:
                raise ValueError(
                    f"max_new_tokens={max_new_tokens} with a prompt of {max(len(ids), 1)} tokens "
                    f"exceeds n_positions={dims.n_positions}: allowed range is [0, {room}] for "
                    "this prompt (shorten the prompt or ask for fewer tokens)"
                )

    def _loop(
        self,
        prompt_ids: list[list[int]],
        prompts: list[str],
        *,
        max_new_tokens: int,
        settings: SamplingSettings,
        seed: int | None,
        stops: list[str],
        show_top: int,
        on_text: Callable[[str, bool], None] | None,
    ) -> Iterator[list[GenerationResult]]:
        """The token loop. Yields after each step ([] until done, then the results)."""
        self._validate(prompt_ids, max_new_tokens, settings, show_top, seed)
        dims = self.manifest.dims
        eos = dims.eos_token_id
        rows = [
            _Row(prompt=text, prompt_ids=ids, seen=list(ids or [dims.bos_token_id]),
                 # With a seed, every row draws from the stream a lone prompt would
                 # (batch == single); without one, each row gets fresh entropy.
                 rng=np.random.default_rng(seed))
            for ids, text in zip(prompt_ids, prompts, strict=True)
        ]
        # Left-pad: an empty prompt starts from <|endoftext|>, as transformers does.
        inputs = [ids or [dims.bos_token_id] for ids in prompt_ids]
        width = max(len(x) for x in inputs)
        batch = len(inputs)
        input_ids = np.full((batch, width), eos, dtype=np.int64)  # [batch, width]
        mask = np.zeros((batch, width), dtype=np.int64)  # [batch, width]; 0 = padding
        for r, ids in enumerate(inputs):
            input_ids[r, width - len(ids):] = ids
            mask[r, width - len(ids):] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # [batch, width]

        t0 = time.perf_counter()
        prefill_ms = 0.0
        cache = self.decoder.start(batch, width + max_new_tokens)
        if max_new_tokens > 0:
            logits, cache = self.decoder.forward(cache, input_ids, mask, positions)
            prefill_ms = (time.perf_counter() - t0) * 1e3
        t_decode = time.perf_counter()
        last_pos = positions[:, -1]  # [batch]
        for step in range(max_new_tokens):
            next_ids = np.full((batch, 1), eos, dtype=np.int64)  # finished rows feed EOS
            for r, row in enumerate(rows):
                if row.finish_reason is not None:
                    continue
                token = self._pick(logits[r], row, settings, show_top, step)
                next_ids[r, 0] = token
                self._append(row, token, eos, stops, on_text)
            if all(row.finish_reason is not None for row in rows) or step == max_new_tokens - 1:
                break
            yield []
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            last_pos = last_pos + 1
            logits, cache = self.decoder.forward(cache, next_ids, mask, last_pos[:, None])
        decode_s = time.perf_counter() - t_decode
        del cache
        yield [self._result(row, prefill_ms, decode_s, on_text) for row in rows]

    def _pick(self, logits: np.ndarray, row: _Row, settings: SamplingSettings, show_top: int,
              step: int) -> int:
        """Choose the next token of one row from its logits [vocab]."""
        # The seen ids matter only to the repetition penalty: no array per step otherwise.
        seen = (np.asarray(row.seen, dtype=np.int64)
                if settings.repetition_penalty != 1.0 else None)
        token = sample_token(logits, settings, row.rng, seen)
        if show_top:
            ids, probs = top_candidates(logits, show_top)
            chosen_prob = float(softmax(logits)[token])
            row.steps.append(StepRecord(
                step=step,
                candidates=[Candidate(int(i), self._piece(int(i)), float(p))
                            for i, p in zip(ids, probs, strict=True)],
                chosen=Candidate(token, self._piece(token), chosen_prob)))
        return token

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _append(self, row: _Row, token: int, eos: int, stops: list[str],
                on_text: Callable[[str, bool], None] | None) -> None:
        row.ids.append(token)
        row.seen.append(token)
        if token == eos:
            row.finish_reason = "eos"
        if not stops and on_text is None:
            return
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        for s in stops:
            at = text.find(s)
            if at >= 0 and (row.stop_at is None or at < row.stop_at):
                row.stop_at = at
        if row.stop_at is not None:
            row.finish_reason = "stop"
            text = text[:row.stop_at]
        if on_text is not None:
            on_text(text, False)

    def _result(self, row: _Row, prefill_ms: float, decode_s: float,
                on_text: Callable[[str, bool], None] | None) -> GenerationResult:
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        if row.stop_at is not None:
            text = text[:row.stop_at]
        if on_text is not None:
            on_text(text, True)
        decoded = max(len(row.ids) - 1, 0)  # the first token comes from the prefill
        rate = decoded / decode_s if decoded and decode_s else 0.0
        return GenerationResult(
            prompt=row.prompt, prompt_ids=row.prompt_ids, ids=row.ids, text=text,
            finish_reason=row.finish_reason or "length",
            timings=Timings(prefill_ms=prefill_ms, decode_ms=decode_s * 1e3,
                            decode_tokens_per_s=rate),
            steps=row.steps)


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
    """The decoder of the variant's KV layout (the manifest's io says which)."""
    from gpt2_onnx.runtime.decoder import ConcatDecoder

    if variant.io.kv_layout == "shared":
        from gpt2_onnx.runtime.shared_kv import SharedKVDecoder

        return SharedKVDecoder(session, manifest.dims, variant, device)
    return ConcatDecoder(session, manifest.dims, variant, device)


def load_tokenizer(path: Path, vocab_size: int) -> Tokenizer:
    """Load tokenizer.json; ModelDirError naming the file when it is missing or not a tokenizer."""
    if not path.is_file():
        raise ModelDirError(f"{path}: missing. Copy the model directory again or re-export.")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise ModelDirError(
            f"{path}: not a valid tokenizers file ({str(exc)[:200]}). Copy it again or "
            "re-export the model."
        ) from exc
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise ModelDirError(f"{path}: {size} tokens but the model has {vocab_size} logits; "
                            "the tokenizer belongs to another model. Re-export.")
    return tokenizer


def _stop_list(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    if not isinstance(stop, (str, list, tuple)):
        raise ValueError("stop: give a string or a list of non-empty strings")
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError("stop: give non-empty strings")
    return stops


def _stable_length(text: str, stops: list[str]) -> int:
    """How much of `text` can be shown now: not a trailing partial character (U+FFFD from an
    incomplete byte sequence) and not a suffix that could still grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[end - k:end] == s[:k]:
                hold = max(hold, k)
                break
    return end - hold
