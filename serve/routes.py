"""The API routes, built from a `ServerState` so any ASGI host can mount them.

`build_router(state)` returns a FastAPI APIRouter; `gpt2_onnx.serve.app.create_app(state)` wraps
it with the error handlers and the body limit. A host other than `gpt2-onnx serve` (a Ray Serve
deployment, a test) builds a ServerState around its own started Engine and mounts the same app.

The routes adapt HTTP to the engine and add nothing to generation: each choice is one
`Engine.submit`, its tokens are the engine's TokenEvents, so a choice equals
`TextGenerator.generate` with the same settings and seed (choice j of a request samples with
seed + j, so choice 0 equals a lone run with that seed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from gpt2_onnx.runtime.engine import (
    DoneEvent,
    Engine,
    EngineClosedError,
    QueueFullError,
    TokenEvent,
)
from gpt2_onnx.runtime.errors import ContextLengthError
from gpt2_onnx.runtime.generator import TextGenerator
from gpt2_onnx.runtime.scoring import batch_logits, log_softmax_top
from gpt2_onnx.serve.metrics import Metrics
from gpt2_onnx.serve.schemas import (
    ApiError,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

log = logging.getLogger("gpt2_onnx.serve")
RETRY_AFTER_S = 1  # Retry-After of a 429 (queue full) and of a 503 (draining)
PHASES = ("loading", "ready", "draining", "failed")


@dataclass
class ServerState:
    """What the routes serve: the model, its engine, the settings of the server, its metrics.

    phase: "loading" (no engine yet; 503), "ready", "draining" (503 to new work, in-flight
    requests finish), "failed" (loading failed; 503).
    """

    model_id: str  # the id /v1/models lists and requests may name
    api_key: str | None = None  # None: no authentication
    log_prompts: bool = False  # log prompt text (off: only counts and timings are logged)
    generator: TextGenerator | None = None
    engine: Engine | None = None
    phase: str = "loading"
    failure: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(init=False)
    _active: dict[str, list[Any]] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.engine.stats() if self.engine else None)

    @classmethod
    def for_engine(cls, engine: Engine, model_id: str, **kwargs: Any) -> ServerState:
        """A ready state around a started engine (for hosts that load the model themselves)."""
        state = cls(model_id=model_id, **kwargs)
        state.set_ready(engine)
        return state

    def set_ready(self, engine: Engine) -> None:
        self.generator = engine.generator
        self.engine = engine
        self.phase = "ready"

    @property
    def in_flight(self) -> int:
        """Completion requests accepted and not yet answered."""
        with self._lock:
            return len(self._active)

    def cancel_all(self) -> int:
        """Cancel every request in flight (the drain's grace ran out); how many."""
        with self._lock:
            reqs = [r for group in self._active.values() for r in group]
        for r in reqs:
            r.cancel()
        return len(reqs)

    def _track(self, rid: str, reqs: list[Any]) -> None:
        with self._lock:
            self._active[rid] = reqs
        self.metrics.in_flight.set(len(self._active))

    def _untrack(self, rid: str) -> None:
        with self._lock:
            self._active.pop(rid, None)
        self.metrics.in_flight.set(len(self._active))


# ------------------------------------------------------------------------------ the router


def build_router(state: ServerState) -> APIRouter:
    """All routes over `state`. Everything but /health needs the API key when one is set."""

    async def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"),
            state.api_key.encode("utf-8", "surrogateescape"))
        if not ok:
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    public = APIRouter()
    router = APIRouter(dependencies=[Depends(check_key)])

    @public.get("/health")
    async def health() -> JSONResponse:
        if state.phase != "ready":  # answered here: health probes are not counted as requests
            err = _unavailable(state)
            return JSONResponse(err.body(), status_code=err.status, headers=err.headers)
        stats = state.engine.stats() if state.engine else None
        return JSONResponse({"status": "ok", "model": state.model_id,
                             "busy_slots": stats.busy_slots if stats else 0,
                             "queue_length": stats.waiting if stats else 0})

    @router.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        if model_id != state.model_id:
            raise _model_not_found(model_id, state)
        return JSONResponse(_model_card(state))

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _completions(state, body, request)

    @router.api_route("/v1/chat/completions", methods=["POST", "GET"])
    async def chat() -> None:
        raise ApiError(404, "GPT-2 is not a chat model: this server has no "
                       "/v1/chat/completions. Send plain text to POST /v1/completions "
                       "(prompt, max_tokens, ...) instead.", code="chat_not_supported")

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        gen = _ready(state).generator
        assert gen is not None
        _check_model(body.model, state)
        if (body.content is None) == (body.prompt is None):
            raise ApiError(400, "give exactly one of 'content' (llama.cpp) or 'prompt' (vLLM)",
                           param="content")
        text = body.content if body.content is not None else body.prompt
        assert text is not None
        try:
            ids = gen.encode(text)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="content") from exc
        return JSONResponse({"tokens": ids, "count": len(ids),
                             "max_model_len": gen.manifest.dims.n_positions})

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        gen = _ready(state).generator
        assert gen is not None
        _check_model(body.model, state)
        _check_token_ids(body.tokens, gen, "tokens")
        text = gen.decode(body.tokens, skip_special_tokens=False)
        return JSONResponse({"content": text, "prompt": text})

    @router.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        gen = _ready(state).generator
        assert gen is not None
        return JSONResponse(_tokenizer_info(gen))

    public.include_router(router)
    return public


def _tokenizer_info(gen: TextGenerator) -> dict[str, Any]:
    """vLLM's GET /tokenizer_info: the tokenizer's config (what lm-eval's
    tokenizer_backend=remote reads). Special tokens come from the manifest's ids, the rest from
    the model directory's tokenizer_config.json where it has them; None where there is none."""
    config: dict[str, Any] = {}
    path = Path(gen.model_dir) / "tokenizer_config.json"
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(path.read_text(encoding="utf-8"))
            config = loaded if isinstance(loaded, dict) else {}
    dims = gen.manifest.dims
    tok = gen.tokenizer

    def token(value: Any) -> str | None:  # a string, or an AddedToken's {"content": ...}
        value = value.get("content") if isinstance(value, dict) else value
        return value if isinstance(value, str) else None

    pad = token(config.get("pad_token"))
    unk = token(config.get("unk_token"))
    return {
        "tokenizer_class": config.get("tokenizer_class") or "GPT2Tokenizer",
        "bos_token": tok.id_to_token(dims.bos_token_id),
        "eos_token": tok.id_to_token(dims.eos_token_id),
        "pad_token": pad,
        "unk_token": unk,
        "bos_token_id": dims.bos_token_id,
        "eos_token_id": dims.eos_token_id,
        "pad_token_id": None if pad is None else tok.token_to_id(pad),
        "model_max_length": dims.n_positions,
        "vocab_size": dims.vocab_size,
        "add_bos_token": False,  # GPT-2 prompts are encoded without a BOS
        "add_prefix_space": bool(config.get("add_prefix_space", False)),
    }


def _model_card(state: ServerState) -> dict[str, Any]:
    card: dict[str, Any] = {"id": state.model_id, "object": "model", "created": state.created,
                            "owned_by": "gpt2-onnx"}
    if state.generator is not None:
        card["max_model_len"] = state.generator.manifest.dims.n_positions
        card["precision"] = state.generator.precision
        card["device"] = str(state.generator.device)  # "cpu", "cuda" or "cuda:N"
    return card


def _unavailable(state: ServerState) -> ApiError:
    why = {"loading": "the model is still loading", "draining": "the server is shutting down "
           "and takes no new requests", "failed": f"the model failed to load: {state.failure}"}
    return ApiError(503, f"service unavailable: {why.get(state.phase, state.phase)}",
                    type="service_unavailable", code=state.phase,
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def _ready(state: ServerState) -> ServerState:
    if state.phase != "ready" or state.engine is None:
        raise _unavailable(state)
    return state


def _model_not_found(name: str, state: ServerState) -> ApiError:
    return ApiError(404, f"the model {name!r} does not exist; this server serves "
                    f"{state.model_id!r} (GET /v1/models)", param="model",
                    code="model_not_found")


def _check_model(name: str | None, state: ServerState) -> None:
    if name is not None and name != state.model_id:
        raise _model_not_found(name, state)


def _check_token_ids(ids: list[int], gen: TextGenerator, param: str) -> None:
    vocab = gen.manifest.dims.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ApiError(400, f"{param}: token ids must be in [0, {vocab - 1}]; got {bad[:5]}",
                       param=param)


# ------------------------------------------------------------------------------ completions


@dataclass
class _Choice:
    """One choice of a completion request: one engine request and what the route collects."""

    index: int
    prompt_index: int
    req: Any  # gpt2_onnx.runtime.engine.Request
    tokens: list[TokenEvent] = field(default_factory=list)
    done: DoneEvent | None = None
    emitted: int = 0  # characters of completion text sent so far (for text_offset)


def _parse_prompts(prompt: Any, gen: TextGenerator) -> tuple[list[list[int]], list[str | None]]:
    """OpenAI's four prompt forms -> (token ids per prompt, the text when given as text)."""
    vocab = gen.manifest.dims.vocab_size

    def is_id(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def encode(text: str) -> list[int]:
        try:
            return gen.encode(text)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="prompt") from exc

    if isinstance(prompt, str):
        return [encode(prompt)], [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "prompt: give a string, a non-empty list of strings, a list of "
                       "token ids or a non-empty list of token-id lists", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return [encode(p) for p in prompt], list(prompt)
    if all(is_id(i) for i in prompt):
        rows = [list(prompt)]
    elif all(isinstance(p, list) and all(is_id(i) for i in p) for p in prompt):
        rows = [list(p) for p in prompt]
    else:
        raise ApiError(400, "prompt: a list must hold only strings, only token ids (integers), "
                       "or only lists of token ids", param="prompt")
    for r, ids in enumerate(rows):
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            where = "" if len(rows) == 1 else f" (prompt {r})"
            raise ApiError(400, f"prompt: token ids must be in [0, {vocab - 1}]{where}; got "
                           f"{bad[:5]}", param="prompt")
    return rows, [None] * len(rows)


def _context_error(exc: ContextLengthError, where: str) -> ApiError:
    """A 413 in the API's terms (max_tokens, the model's context) from the figures of the
    runtime's one context check (GenerationParams.check_prompt)."""
    if exc.param == "prompt":
        return ApiError(413, f"prompt{where} has {exc.prompt_tokens} tokens; the model's context "
                        f"is {exc.limit} tokens", param="prompt", code="context_length_exceeded")
    return ApiError(413, f"max_tokens={exc.max_new_tokens} with a prompt of {exc.prompt_tokens} "
                    f"tokens{where} exceeds the context of {exc.limit} tokens: ask for at most "
                    f"{exc.room}", param="max_tokens", code="context_length_exceeded")


def _parameter_error(exc: ValueError) -> ApiError:
    """A 400 naming the request field from the error's `.param` (a ParameterError's data)."""
    return ApiError(400, str(exc), param=CompletionRequest.field_of(getattr(exc, "param", None)))


async def _completions(state: ServerState, body: CompletionRequest, request: Request
                       ) -> Response:
    started = time.perf_counter()
    _ready(state)
    engine, gen = state.engine, state.generator
    assert engine is not None and gen is not None
    _check_model(body.model, state)
    problem = body.neutral_fields_problem()
    if problem:
        raise ApiError(400, problem[1], param=problem[0])
    rows, texts = _parse_prompts(body.prompt, gen)
    n = body.n or 1
    capacity = engine.slots + engine.max_queue
    if len(rows) * n > capacity:
        raise ApiError(400, f"n: {len(rows)} prompt(s) x n={n} = {len(rows) * n} choices; "
                       f"this server holds at most {capacity} at once (slots + max queue)",
                       param="n")
    params = [body.to_params(j) for j in range(n)]  # choice j samples with seed + j
    for r, ids in enumerate(rows):  # every prompt fits before any choice is submitted
        try:
            params[0].check_prompt(ids, gen.manifest.dims, max_len=engine.max_len)
        except ContextLengthError as exc:
            raise _context_error(exc, "" if len(rows) == 1 else f" (prompt {r})") from exc
    choices: list[_Choice] = []
    rid = f"cmpl-{uuid.uuid4().hex}"
    try:
        for r, ids in enumerate(rows):
            for j in range(n):
                req = engine.submit(ids, params[j], prompt=texts[r])
                choices.append(_Choice(len(choices), r, req))
    except ContextLengthError as exc:  # checked above; the engine checks it again for its
        _cancel(choices)               # other callers
        raise _context_error(exc, "") from exc
    except ValueError as exc:  # a ParameterError names its setting as data (.param)
        _cancel(choices)
        raise _parameter_error(exc) from exc
    except QueueFullError as exc:
        _cancel(choices)
        raise ApiError(429, f"the server is busy: {exc}", type="rate_limit_error",
                       code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
    except EngineClosedError as exc:
        _cancel(choices)
        raise _unavailable(state) from exc
    state._track(rid, [c.req for c in choices])
    prompt_texts = [t if t is not None else gen.decode(ids, skip_special_tokens=False)
                    for ids, t in zip(rows, texts, strict=True)]
    job = _Job(state, body, rid, rows, prompt_texts, choices, started)
    if body.stream:
        return _EventStream(job)
    return await job.respond(request)


class _EventStream(StreamingResponse):
    """The SSE response of a job; whatever happens to the connection (even a client gone before
    the first byte, when the stream never starts), the job's requests end with it."""

    def __init__(self, job: _Job) -> None:
        super().__init__(job.stream(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Request-Id": job.rid})
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _cancel(self.job.choices)
            self.job._finish("cancelled")  # a no-op when the stream finished it


def _cancel(choices: list[_Choice]) -> None:
    for c in choices:
        c.req.cancel()


class _Job:
    """One accepted completion request: pumps its choices' events, answers, keeps metrics."""

    def __init__(self, state: ServerState, body: CompletionRequest, rid: str,
                 rows: list[list[int]], prompt_texts: list[str], choices: list[_Choice],
                 started: float) -> None:
        self.state = state
        self.body = body
        self.rid = rid
        self.rows = rows
        self.prompt_texts = prompt_texts
        self.choices = choices
        self.started = started
        self.created = int(time.time())
        gen = state.generator
        assert gen is not None
        self.gen = gen
        self.echo = bool(body.echo)
        self.logprobs = body.logprobs
        self._finished = False
        self._piece = lru_cache(maxsize=4096)(
            lambda t: gen.tokenizer.decode([t], skip_special_tokens=False))

    # ------------------------------------------------------------------ events
    async def _pump(self, c: _Choice, out: asyncio.Queue[tuple[_Choice, Any]]) -> None:
        """Forward one choice's events to `out`, observing TTFT and inter-token latency."""
        m = self.state.metrics
        last: float | None = None
        async for ev in c.req.aevents():
            now = time.perf_counter()
            if isinstance(ev, TokenEvent):
                if last is None:
                    m.ttft.observe(now - self.started)
                else:
                    m.itl.observe(now - last)
                last = now
            await out.put((c, ev))

    async def _events(self) -> AsyncIterator[tuple[_Choice, Any]]:
        """Every choice's events, interleaved as they come, until all are done."""
        queue: asyncio.Queue[tuple[_Choice, Any]] = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(c, queue)) for c in self.choices]
        try:
            left = len(self.choices)
            while left:
                c, ev = await queue.get()
                if isinstance(ev, DoneEvent):
                    c.done = ev
                    left -= 1
                else:
                    c.tokens.append(ev)
                yield c, ev
        finally:
            for t in tasks:
                t.cancel()

    def _finish(self, outcome: str) -> None:
        """Untrack, count, log (prompt text only when asked for). Once per job."""
        if self._finished:
            return
        self._finished = True
        state = self.state
        state._untrack(self.rid)
        state.metrics.requests.labels(outcome).inc()
        for c in self.choices:
            if c.done is not None:
                state.metrics.finish.labels(_finish_reason(c.done)).inc()
        done = [c.done for c in self.choices if c.done is not None]
        ms = (time.perf_counter() - self.started) * 1e3
        extra = f" prompt={self.prompt_texts!r}" if state.log_prompts else ""
        log.info("%s %s choices=%d prompt_tokens=%d completion_tokens=%d finish=%s %.0f ms%s",
                 self.rid, outcome, len(self.choices), sum(len(r) for r in self.rows),
                 sum(d.completion_tokens for d in done),
                 ",".join(sorted({d.finish_reason for d in done})), ms, extra)

    def _usage(self) -> dict[str, int]:
        prompt = sum(len(r) for r in self.rows)
        completion = sum(c.done.completion_tokens for c in self.choices if c.done)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    # ------------------------------------------------------------------ non-streaming
    async def respond(self, request: Request) -> Response:
        """Wait for every choice (a client that disconnects cancels them), answer JSON."""
        outcome = "error"
        collect = asyncio.ensure_future(self._collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not collect.done():
                outcome = "cancelled"
                return Response(status_code=499)  # nobody reads it
            collect.result()
            failed = [c.done for c in self.choices if c.done and c.done.finish_reason == "error"]
            if failed:
                raise ApiError(500, f"generation failed: {failed[0].error}", type="server_error")
            if any(c.done and c.done.finish_reason == "cancelled" for c in self.choices):
                outcome = "cancelled"
                raise _unavailable(self.state) if self.state.phase == "draining" else ApiError(
                    503, "the request was cancelled", type="service_unavailable")
            prompt_lp = await self._prompt_logprobs()
            choices = [self._choice_json(c, prompt_lp) for c in self.choices]
            outcome = "ok"
            return JSONResponse({"id": self.rid, "object": "text_completion",
                                 "created": self.created, "model": self.state.model_id,
                                 "choices": choices, "usage": self._usage()},
                                headers={"X-Request-Id": self.rid})
        finally:
            _cancel(self.choices)  # a no-op for finished requests
            collect.cancel()
            gone.cancel()
            self._finish(outcome)

    async def _collect(self) -> None:
        async for _ in self._events():
            pass

    def _choice_json(self, c: _Choice, prompt_lp: list[dict[str, list[Any]]] | None
                     ) -> dict[str, Any]:
        assert c.done is not None
        prefix = self.prompt_texts[c.prompt_index] if self.echo else ""
        lp = None
        if self.logprobs is not None:
            lp = _empty_logprobs()
            if prompt_lp is not None:
                _extend(lp, prompt_lp[c.prompt_index])
            offset = len(prefix)
            for ev in c.tokens:
                _extend(lp, self._token_logprobs(ev, offset))
                offset += len(ev.text)
        choice = {"index": c.index, "text": prefix + c.done.text, "logprobs": lp,
                  "finish_reason": _finish_reason(c.done)}
        self._extras(choice, list(c.done.ids), c.done)
        return choice

    # ------------------------------------------------------------------ streaming
    async def stream(self) -> AsyncIterator[str]:
        """Server-sent events: `data: {chunk}` per token, finish chunks, `data: [DONE]`.
        Cancelled (client gone) -> the engine requests are cancelled in `finally`."""
        outcome = "cancelled"
        try:
            if self.echo:
                prompt_lp = await self._prompt_logprobs()
                for c in self.choices:
                    text = self.prompt_texts[c.prompt_index]
                    c.emitted = len(text)
                    lp = None
                    if prompt_lp is not None:
                        lp = _empty_logprobs()
                        _extend(lp, prompt_lp[c.prompt_index])
                    yield self._chunk(c, text, lp, None)
            async for c, ev in self._events():
                if isinstance(ev, TokenEvent):
                    lp = None
                    if self.logprobs is not None:
                        lp = self._token_logprobs(ev, c.emitted)
                    c.emitted += len(ev.text)
                    yield self._chunk(c, ev.text, lp, None, [ev.token_id])
                elif ev.finish_reason == "error":
                    outcome = "error"
                    yield _sse({"error": {"message": f"generation failed: {ev.error}",
                                          "type": "server_error", "param": None,
                                          "code": None}})
                elif ev.finish_reason == "cancelled":
                    yield _sse({"error": {"message": "the request was cancelled: "
                                          + ("the server is shutting down"
                                             if self.state.phase == "draining" else "cancelled"),
                                          "type": "service_unavailable", "param": None,
                                          "code": "cancelled"}})
                else:
                    yield self._chunk(c, ev.tail, None, _finish_reason(ev), done=ev)
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield _sse({"id": self.rid, "object": "text_completion",
                            "created": self.created, "model": self.state.model_id,
                            "choices": [], "usage": self._usage()})
            yield "data: [DONE]\n\n"
            if outcome == "cancelled" and all(
                    c.done and c.done.finish_reason not in ("cancelled", "error")
                    for c in self.choices):
                outcome = "ok"
        finally:
            _cancel(self.choices)
            self._finish(outcome)

    def _chunk(self, c: _Choice, text: str, lp: dict[str, list[Any]] | None,
               finish: str | None, ids: list[int] | None = None,
               done: DoneEvent | None = None) -> str:
        choice: dict[str, Any] = {"index": c.index, "text": text, "logprobs": lp,
                                  "finish_reason": finish}
        self._extras(choice, ids or [], done)
        return _sse({"id": self.rid, "object": "text_completion", "created": self.created,
                     "model": self.state.model_id, "choices": [choice]})

    def _extras(self, choice: dict[str, Any], ids: list[int], done: DoneEvent | None) -> None:
        """Extensions of a choice: `token_ids` (with return_token_ids) and, once it is done,
        the engine's `timings` (ms and tokens/s, as llama.cpp's server reports them)."""
        if self.body.return_token_ids:
            choice["token_ids"] = ids
        if done is not None:
            choice["timings"] = dataclasses.asdict(done.timings)

    # ------------------------------------------------------------------ logprobs
    def _token_logprobs(self, ev: TokenEvent, offset: int) -> dict[str, list[Any]]:
        """OpenAI's legacy logprobs of one generated token (the top candidates come from the
        engine's raw softmax; the chosen token is always listed, as OpenAI does)."""
        piece = self._piece(ev.token_id)
        top = {c.text: c.logprob for c in ev.top}  # the same log-softmax row as ev.logprob
        top.setdefault(piece, ev.logprob)
        lp: dict[str, list[Any]] = {
            "tokens": [piece], "token_logprobs": [ev.logprob],
            "top_logprobs": [top if self.logprobs else {piece: ev.logprob}],
            "text_offset": [offset]}
        if self.body.return_token_ids:
            lp["top_candidates"] = [[{"id": c.id, "token": c.text, "logprob": c.logprob}
                                     for c in ev.top]]
        return lp

    async def _prompt_logprobs(self) -> list[dict[str, list[Any]]] | None:
        """echo + logprobs: each prompt token's log-prob under the model (the first has none),
        by the runtime's scoring (one forward over the prompt, off the event loop)."""
        if not (self.echo and self.logprobs is not None):
            return None
        return await run_in_threadpool(self._score_prompts)

    def _score_prompts(self) -> list[dict[str, list[Any]]]:
        out = []
        k = self.logprobs or 0
        for ids, text in zip(self.rows, self.prompt_texts, strict=True):
            lp = _empty_logprobs()
            if ids:
                # one forward returning every position's logits (the shared-KV graphs pick
                # the rows through logits_index)
                logits = batch_logits(self.gen.decoder, [ids], mode="all")[0]  # [len, vocab]
                targets = np.asarray(ids[1:], dtype=np.int64)
                # scores and tops from one float64 log-softmax per row (bit-identical at the
                # argmax: lm-eval's is_greedy compares them with ==)
                scores, top_ids, top_lps = log_softmax_top(logits[:-1], targets, k)  # [len-1](, k)
                pieces = [self._piece(int(t)) for t in ids]
                offsets = np.cumsum([0] + [len(p) for p in pieces[:-1]]).tolist()
                if "".join(pieces) != text:  # a character split across tokens: clamp
                    offsets = [min(o, len(text)) for o in offsets]
                lp["tokens"] = pieces
                lp["token_logprobs"] = [None] + [float(s) for s in scores]
                tops: list[dict[str, float] | None] = [None]
                cands: list[list[dict[str, Any]] | None] = [None]
                for tok, score, cids, clps in zip(ids[1:], scores, top_ids, top_lps,
                                                  strict=True):
                    cands.append([{"id": int(i), "token": self._piece(int(i)),
                                   "logprob": float(v)} for i, v in zip(cids, clps, strict=True)])
                    top: dict[str, float] = {self._piece(int(i)): float(v)
                                             for i, v in zip(cids, clps, strict=True)}
                    top.setdefault(self._piece(int(tok)), float(score))
                    tops.append(top)
                lp["top_logprobs"] = tops
                if self.body.return_token_ids:
                    lp["top_candidates"] = cands
                lp["text_offset"] = offsets
            out.append(lp)
        return out


def _empty_logprobs() -> dict[str, list[Any]]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def _extend(into: dict[str, list[Any]], more: dict[str, list[Any]]) -> None:
    for key, values in more.items():
        into.setdefault(key, []).extend(values)


def _finish_reason(done: DoneEvent) -> str:
    """OpenAI's finish_reason: eos and stop strings are "stop"; the engine's others as is."""
    return "stop" if done.finish_reason in ("eos", "stop") else done.finish_reason


def _sse(doc: dict[str, Any]) -> str:
    return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"


async def _disconnected(request: Request) -> None:
    """Return when the client has gone (the body was read already: only disconnect is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
