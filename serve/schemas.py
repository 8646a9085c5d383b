"""Request bodies (pydantic) and OpenAI's error shape.

Bodies are strict: a wrong type is refused, never coerced ("5" is not 5, true is not 1), and an
unknown field is an error (as OpenAI answers "Unrecognized request argument"). Every error leaves
the server as `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gpt2_onnx.runtime.params import GenerationParams

# Sizes a request may ask for (OpenAI's own limits where it has one).
MAX_N = 16  # choices per prompt
MAX_LOGPROBS = 20  # top candidates per token (OpenAI: 5; vLLM: 20)
# Stop strings: more than OpenAI's 4, since lm-evaluation-harness appends the EOS string to its
# `until` list (5+ strings); vLLM and llama.cpp accept more too. Bounded in count and length.
MAX_STOP = 32  # stop strings per request
MAX_STOP_CHARS = 512  # characters in one stop string
MAX_STOP_TOTAL = 4096  # characters in all of a request's stop strings together
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    """An error answered in OpenAI's shape: HTTP status, message, type, param, code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False  # a last chunk with `usage` and no choices


class CompletionRequest(BaseModel):
    """POST /v1/completions: OpenAI's Completions, plus llama.cpp/vLLM's top_k and
    repetition_penalty."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None  # the served model's id (see GET /v1/models); None: that one
    prompt: Any  # a string, a list of strings, a list of token ids, or a list of such lists
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, ge=0)  # new tokens per choice
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)  # 0: greedy
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=1, le=MAX_N)  # choices per prompt; choice j samples with seed+j
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = None  # accepted, not logged
    # Extensions (llama.cpp / vLLM names). top_k -1 or 0: off (OpenAI samples from all tokens).
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(1.0, gt=0.0)
    # vLLM's name: each choice carries its `token_ids`, and `logprobs` a `top_candidates` list
    # per token ({id, token, logprob}: ids a client can send back as a token-id prompt).
    return_token_ids: bool | None = False
    # OpenAI fields accepted only at their neutral value (anything else is a 400 naming it).
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        limits = (f"at most {MAX_STOP} stop strings, each at most {MAX_STOP_CHARS} characters "
                  f"and {MAX_STOP_TOTAL} in all")
        if len(stops) > MAX_STOP:
            raise ValueError(f"{limits}; got {len(stops)} strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"{limits}; got one of {max(len(s) for s in stops)} characters")
        if sum(len(s) for s in stops) > MAX_STOP_TOTAL:
            raise ValueError(f"{limits}; got {sum(len(s) for s in stops)} characters in all")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        return v

    # GenerationParams' names -> this request's fields, where they differ: an error's `.param`
    # (ParameterError) becomes OpenAI's `error.param` through `field_of`.
    FIELDS: ClassVar[dict[str, str]] = {"max_new_tokens": "max_tokens", "top_n": "logprobs",
                                        "show_top": "logprobs", "greedy": "temperature"}

    @classmethod
    def field_of(cls, param: str | None) -> str | None:
        """The request field a GenerationParams setting comes from (None stays None)."""
        return None if param is None else cls.FIELDS.get(param, param)

    def to_params(self, choice: int = 0) -> GenerationParams:
        """This request as the engine's GenerationParams for its choice `choice` (which samples
        with seed + choice, so choice 0 equals a lone run with that seed). The OpenAI
        conventions map here, once: temperature 0 is greedy, top_k -1 or 0 is off, None is
        each field's default. Validated against the model by the engine's submit."""
        temperature = 1.0 if self.temperature is None else self.temperature
        return GenerationParams.from_keywords(
            max_new_tokens=DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens,
            greedy=temperature == 0,
            top_k=None if self.top_k in (None, -1, 0) else self.top_k,
            top_p=1.0 if self.top_p is None else self.top_p,
            temperature=temperature,
            repetition_penalty=(1.0 if self.repetition_penalty is None
                                else self.repetition_penalty),
            seed=None if self.seed is None else self.seed + choice,
            stop=self.stop,
            show_top=self.logprobs or 0)

    def neutral_fields_problem(self) -> tuple[str, str] | None:
        """(field, message) for an OpenAI option this server cannot honour, else None."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name, (f"{name} is not supported (only 0); use repetition_penalty "
                              "(> 1 discourages repeats)")
        if self.best_of is not None and self.best_of != (self.n or 1):
            return "best_of", "best_of is not supported (leave it out or equal to n)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported by GPT-2"
        return None


class TokenizeRequest(BaseModel):
    """POST /tokenize: `content` (llama.cpp's name) or `prompt` (vLLM's)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    content: str | None = None
    prompt: str | None = None
    model: str | None = None
    add_special_tokens: bool = False  # accepted for vLLM clients; GPT-2 adds none


class DetokenizeRequest(BaseModel):
    """POST /detokenize: token ids to text."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tokens: list[int]
    model: str | None = None
