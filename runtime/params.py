"""GenerationParams: everything one request asks for, and the one place it is checked.

Every front end maps to it once: the Python keywords through `GenerationParams.from_keywords`
(the only function that spells the generation keywords out; TextGenerator's methods take them
as `**keywords` and show them in their signatures through `takes_generation_keywords`), the
HTTP request through `CompletionRequest.to_params` (serve/schemas.py), the CLI's options
through `TextGenerator.params`. `validate` checks the prompt-independent settings, listing every
bad one; `check_prompt` checks the context limit. Both raise ParameterError (a ValueError) whose
`.param` / `.problems` name the settings as data.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from gpt2_onnx.runtime.errors import ContextLengthError, ParameterError
from gpt2_onnx.runtime.sampling import SamplingSettings
from gpt2_onnx.runtime.validation import check_all, check_int, check_optional_int, show_value

if TYPE_CHECKING:
    from gpt2_onnx.runtime.manifest import ModelDims

# The Python keywords' names for GenerationParams' own fields where they differ (show_top is
# explain mode's name for top_n), so their errors name what the caller wrote.
PYTHON_NAMES: Mapping[str, str] = {"top_n": "show_top"}


def check_stop(stop: object, name: str = "stop") -> tuple[str, ...]:
    """`stop` as a tuple of non-empty strings (one string: one stop string); ParameterError
    naming `name` otherwise (None included: GenerationParams stores no stop string as ())."""
    if not isinstance(stop, (str, list, tuple)):
        raise ParameterError(f"{name}: give a string or a list of non-empty strings, got "
                             f"{show_value(stop)}", name)
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise ParameterError(f"{name}: give non-empty strings, got {show_value(stop)}", name)
    return stops


@dataclass(frozen=True)
class GenerationParams:
    """Everything one request asks for. Checked by `validate` before any work starts."""

    max_new_tokens: int = 64  # new tokens at most (the prompt not counted)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)  # greedy, top-k, ...
    seed: int | None = None  # fixes the sampled tokens; None: fresh entropy
    stop: tuple[str, ...] = ()  # the text ends before the first of these; generation stops
    top_n: int = 0  # > 0: each TokenEvent carries the n most probable candidates (explain mode)

    def __post_init__(self) -> None:
        # A single string or a list is accepted for `stop` and stored as a tuple (other values
        # are kept as given for `validate` to refuse).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))

    @classmethod
    def from_keywords(
        cls,
        dims: ModelDims | None = None,
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
        sampling: SamplingSettings | None = None,
    ) -> GenerationParams:
        """The Python API's generation keywords as one GenerationParams: the one place they are
        spelled out (TextGenerator.generate, stream, validate, generate_ids and params take them
        as **keywords).

        max_new_tokens: new tokens at most (the prompt not counted).
        greedy / top_k / top_p / temperature / repetition_penalty: SamplingSettings' fields;
          `sampling` (a SamplingSettings), when given, replaces all five.
        seed: fixes the sampled tokens (None: fresh entropy). stop: a string or a list of them;
          the text ends before the first. show_top: > 0 records the top-N candidates per step.
        dims: when given, the result is validated against the model (ParameterError naming
          every bad setting, the Python keyword's name in it); without, it is only built.
        """
        if sampling is None:
            sampling = SamplingSettings(greedy=greedy, top_k=top_k, top_p=top_p,
                                        temperature=temperature,
                                        repetition_penalty=repetition_penalty)
        params = cls(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                     stop=() if stop is None else stop,  # type: ignore[arg-type]  # a tuple
                     top_n=show_top)
        if dims is not None:
            params.validate(dims, names=PYTHON_NAMES)
        return params

    def validate(self, dims: ModelDims, names: Mapping[str, str] | None = None) -> None:
        """ParameterError naming every bad setting and its allowed range (prompt-independent).

        names: a front end's names for this class's fields (e.g. {"top_n": "show_top"}), used
        in the messages and `.param` so they say what its caller wrote.
        """
        name = (lambda f: names.get(f, f)) if names else (lambda f: f)
        if not isinstance(self.sampling, SamplingSettings):
            raise ParameterError("sampling: give a SamplingSettings, got "
                                 f"{type(self.sampling).__name__}", "sampling")
        check_all(  # every bad setting in one error
            lambda: self.sampling.validate(dims.vocab_size),
            lambda: check_optional_int(name("seed"), self.seed, 0, hint=" or None"),
            lambda: check_int(name("max_new_tokens"), self.max_new_tokens, 0),
            lambda: check_int(name("top_n"), self.top_n, 0, dims.vocab_size, hint=" (0 is off)"),
            lambda: check_stop(self.stop, name("stop")))

    def check_prompt(self, prompt_ids: Sequence[int], dims: ModelDims, what: str = "prompt",
                     max_len: int | None = None) -> None:
        """ContextLengthError (a ParameterError: param "prompt" or "max_new_tokens", the
        figures as data) when the prompt, or the prompt plus max_new_tokens, exceeds the
        positions available: n_positions, or an engine's smaller max_len. The one check of the
        context limit; the server reports it as a 413 in its own words."""
        limit = dims.n_positions if max_len is None else min(max_len, dims.n_positions)
        what_limit = f"n_positions={dims.n_positions}" if limit == dims.n_positions \
            else f"the engine's max_len={limit}"
        n = len(prompt_ids)
        figures = dict(prompt_tokens=n, max_new_tokens=self.max_new_tokens, limit=limit)
        if n > limit:
            raise ContextLengthError(
                f"{what} has {n} tokens, more than {what_limit} the model allows; shorten it",
                "prompt", **figures)
        room = limit - max(n, 1)
        if self.max_new_tokens > room:
            raise ContextLengthError(
                f"max_new_tokens={self.max_new_tokens} with a prompt of {max(n, 1)} tokens "
                f"exceeds {what_limit}: allowed range is [0, {room}] for this prompt (shorten "
                "the prompt or ask for fewer tokens)", "max_new_tokens", **figures)


# ---------------------------------------------------------------------- the Python keywords

# The keywords `from_keywords` takes (read from its signature: written once, there).
KEYWORDS: tuple[str, ...] = tuple(
    p.name for p in inspect.signature(GenerationParams.from_keywords).parameters.values()
    if p.kind is inspect.Parameter.KEYWORD_ONLY)


def resolve(where: str, dims: ModelDims, params: GenerationParams | None,
            keywords: Mapping[str, Any], exclude: Sequence[str] = ()) -> GenerationParams:
    """The validated GenerationParams of one call of a TextGenerator method `where`: `params`
    as given, or built from the generation `keywords`.

    TypeError naming `where` and the keyword for a keyword it does not take (a typo gets the
    closest name suggested), or for params= and keywords together; ParameterError for a bad
    setting.
    """
    allowed = [k for k in KEYWORDS if k not in exclude]
    for key in keywords:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else (
                f"; it takes {', '.join(allowed)}")
            raise TypeError(f"{where}() got an unexpected keyword argument {key!r}{hint}")
    if params is None:
        return GenerationParams.from_keywords(dims, **keywords)
    if keywords:
        raise TypeError(f"{where}() takes params= or generation keywords, not both (got "
                        f"params= and {', '.join(keywords)})")
    if not isinstance(params, GenerationParams):
        raise ParameterError(f"params: give a GenerationParams, got {type(params).__name__}",
                             "params")
    params.validate(dims)
    return params


F = TypeVar("F", bound=Callable[..., Any])


def takes_generation_keywords(exclude: Sequence[str] = ()) -> Callable[[F], F]:
    """Show `from_keywords`' keywords (less `exclude`) in the signature of a method that takes
    them as **keywords, so help() and editors list them: the method's own parameters, then
    the keywords with their defaults."""
    extra = [p for p in inspect.signature(GenerationParams.from_keywords).parameters.values()
             if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in exclude]

    def mark(fn: F) -> F:
        own = [p for p in inspect.signature(fn).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        fn.__signature__ = inspect.signature(fn).replace(  # type: ignore[attr-defined]
            parameters=[*own, *extra])
        return fn

    return mark
