"""GenerationParams as the one home of the generation settings (runtime/params.py).

Each front end maps to it once and gives the same GenerationParams for the same request: the
Python keywords (GenerationParams.from_keywords, which TextGenerator's methods take as
**keywords), the HTTP request (CompletionRequest.to_params) and the CLI's options. Errors carry
the setting's name as data (ParameterError.param / .problems). The generation keywords are
spelled out as function parameters in at most three functions of the package (an AST count).
"""

from __future__ import annotations

import ast
import inspect
import pickle
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import invoke

from gpt2_onnx.runtime import ContextLengthError, GenerationParams, ParameterError
from gpt2_onnx.runtime.manifest import ModelDims
from gpt2_onnx.runtime.params import KEYWORDS, resolve
from gpt2_onnx.runtime.sampling import SamplingSettings

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("export", "runtime", "serve", "cli")  # cli/: the CLI layer, once it exists
DIMS = ModelDims(n_layer=2, n_head=2, head_dim=16, n_embd=32, n_positions=256,
                 vocab_size=50257, bos_token_id=50256, eos_token_id=50256)
MAX_FUNCTIONS_WITH_THE_KEYWORDS = 3


# ------------------------------------------------------------------- the keywords, written once


def functions_with_parameter(name: str) -> list[str]:
    """path:line function for every def/lambda of the package with a parameter `name`
    (positional, keyword-only or positional-only; a dataclass field is no parameter)."""
    hits = []
    for folder in PACKAGE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    a = node.args
                    if name in [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]:
                        where = f"{path.relative_to(ROOT)}:{node.lineno}"
                        hits.append(f"{where} {getattr(node, 'name', '<lambda>')}")
    return hits


def test_repetition_penalty_is_a_parameter_of_at_most_three_functions() -> None:
    hits = functions_with_parameter("repetition_penalty")
    assert hits, "the AST pass found nothing: is it looking in the right folders?"
    assert len(hits) <= MAX_FUNCTIONS_WITH_THE_KEYWORDS, (
        "the generation keywords are spelled out in more than "
        f"{MAX_FUNCTIONS_WITH_THE_KEYWORDS} functions; take **keywords (or params=) and map "
        "them with GenerationParams.from_keywords:\n" + "\n".join(hits))


def test_every_sampling_setting_is_a_keyword_and_a_request_field() -> None:
    """A new SamplingSettings field fails here until the Python keywords and the HTTP request
    map it (the request may name it its own way: CompletionRequest.FIELDS)."""
    pytest.importorskip("pydantic")
    from gpt2_onnx.serve.schemas import CompletionRequest

    for f in fields(SamplingSettings):
        assert f.name in KEYWORDS, f.name
        assert CompletionRequest.field_of(f.name) in CompletionRequest.model_fields, f.name


def test_generator_methods_show_the_keywords_in_their_signatures() -> None:
    from gpt2_onnx.runtime.generator import TextGenerator

    for method in ("generate", "validate", "generate_ids", "params"):
        sig = inspect.signature(getattr(TextGenerator, method))
        assert [p for p in KEYWORDS if p in sig.parameters] == list(KEYWORDS), method
        assert sig.parameters["top_k"].default == 50
    stream = inspect.signature(TextGenerator.stream).parameters
    assert "repetition_penalty" in stream and "show_top" not in stream


# ------------------------------------------------------------------- same request, same params


def test_keywords_and_http_request_give_the_same_params() -> None:
    pytest.importorskip("pydantic")
    from gpt2_onnx.serve.schemas import CompletionRequest

    body = CompletionRequest(prompt="x", max_tokens=12, temperature=0.7, top_p=0.9, top_k=40,
                             repetition_penalty=1.3, seed=5, stop=["\n", "."], logprobs=3)
    want = GenerationParams.from_keywords(max_new_tokens=12, temperature=0.7, top_p=0.9,
                                          top_k=40, repetition_penalty=1.3, seed=5,
                                          stop=["\n", "."], show_top=3)
    assert body.to_params() == want
    assert want == GenerationParams(
        max_new_tokens=12, seed=5, stop=("\n", "."), top_n=3,
        sampling=SamplingSettings(top_k=40, top_p=0.9, temperature=0.7,
                                  repetition_penalty=1.3))
    assert body.to_params(choice=2).seed == 7  # choice j samples with seed + j


def test_http_conventions_map_once() -> None:
    """OpenAI's spellings: temperature 0 is greedy, top_k -1 / 0 is off, defaults as OpenAI's."""
    pytest.importorskip("pydantic")
    from gpt2_onnx.serve.schemas import DEFAULT_MAX_TOKENS, CompletionRequest

    greedy = CompletionRequest(prompt="x", temperature=0, top_k=-1).to_params()
    assert greedy.sampling.greedy and greedy.sampling.top_k is None
    assert greedy == GenerationParams.from_keywords(max_new_tokens=DEFAULT_MAX_TOKENS,
                                                    greedy=True, temperature=0.0, top_k=None)
    plain = CompletionRequest(prompt="x", top_k=0, stop="END").to_params()
    assert plain.sampling.top_k is None and plain.stop == ("END",) and plain.top_n == 0


def test_cli_options_give_the_same_params(tiny_dir: Path, runner, monkeypatch) -> None:
    from gpt2_onnx.runtime.generator import TextGenerator

    seen: list[GenerationParams] = []

    def fake_generate(self, prompts, *, params=None, **keywords):
        seen.append(params)
        return []

    monkeypatch.setattr(TextGenerator, "generate", fake_generate)
    res = invoke(runner, "generate", tiny_dir, "Paris will", "--json", "--max-new-tokens", 7,
                 "--top-k", 20, "--top-p", 0.8, "--temperature", 0.5, "--repetition-penalty",
                 1.2, "--seed", 3, "--stop", "\n", "--stop", ".", "--show-top", 2)
    assert res.exit_code == 0, res.output
    assert seen == [GenerationParams.from_keywords(
        max_new_tokens=7, top_k=20, top_p=0.8, temperature=0.5, repetition_penalty=1.2,
        seed=3, stop=["\n", "."], show_top=2)]


def test_params_argument_equals_the_keywords(tiny_gen) -> None:
    gen = tiny_gen
    kw = dict(max_new_tokens=5, top_k=10, seed=1)
    assert gen.params(**kw) == GenerationParams.from_keywords(**kw)
    by_keywords = gen.generate("Paris will", **kw)
    by_params = gen.generate("Paris will", params=GenerationParams.from_keywords(**kw))
    assert by_params.ids == by_keywords.ids
    assert "".join(gen.stream("Paris will", params=gen.params(**kw))) == by_keywords.text


def test_readme_python_calls_still_work(tiny_gen) -> None:
    """The README's Python API forms: keywords, greedy streaming, a batch, show_top, sampling=."""
    gen = tiny_gen
    result = gen.generate("Paris will", max_new_tokens=4, top_k=50, seed=0)
    assert len(result.ids) <= 4
    pieces = list(gen.stream("London was", max_new_tokens=4, greedy=True))
    assert "".join(pieces) == gen.generate("London was", max_new_tokens=4, greedy=True).text
    results = gen.generate(["Paris will", "A much longer prompt here"], greedy=True,
                           max_new_tokens=2)
    assert len(results) == 2
    explained = gen.generate("Paris will", greedy=True, max_new_tokens=3, show_top=5)
    assert [len(step.candidates) for step in explained.steps] == [5] * len(explained.ids)
    by_object = gen.generate("Paris will", max_new_tokens=4, seed=2,
                             sampling=SamplingSettings(top_k=40, temperature=0.8))
    by_keywords = gen.generate("Paris will", max_new_tokens=4, seed=2, top_k=40,
                               temperature=0.8)
    assert by_object.ids == by_keywords.ids


# ------------------------------------------------------------------- errors carry the name


def test_a_bad_setting_names_itself_as_data() -> None:
    with pytest.raises(ParameterError) as exc:
        GenerationParams.from_keywords(DIMS, top_k=0)
    assert exc.value.param == "top_k" and exc.value.params == ("top_k",)
    assert "top_k must be an integer in [1, 50257]" in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_every_bad_setting_is_listed() -> None:
    with pytest.raises(ParameterError) as exc:
        GenerationParams.from_keywords(DIMS, top_p=0.0, repetition_penalty=-1.0, seed=-3,
                                       max_new_tokens=-1, show_top=-1, stop=[""])
    err = exc.value
    assert err.params == ("top_p", "repetition_penalty", "seed", "max_new_tokens", "show_top",
                          "stop")
    assert err.param == "top_p"
    for name, message in err.problems:
        assert name in message and message in str(err)
    assert str(err).startswith("invalid sampling settings: top_p")


def test_engine_names_are_its_fields_python_names_the_keywords() -> None:
    """GenerationParams(top_n=...) is refused as top_n; the keyword show_top as show_top."""
    with pytest.raises(ParameterError) as exc:
        GenerationParams(top_n=-1).validate(DIMS)
    assert exc.value.param == "top_n"
    with pytest.raises(ParameterError, match="show_top") as exc:
        GenerationParams.from_keywords(DIMS, show_top=DIMS.vocab_size + 1)
    assert exc.value.param == "show_top"
    with pytest.raises(ParameterError) as exc:
        GenerationParams(sampling="greedy").validate(DIMS)  # type: ignore[arg-type]
    assert exc.value.param == "sampling"


def test_context_errors_carry_the_figures() -> None:
    params = GenerationParams(max_new_tokens=20)
    with pytest.raises(ContextLengthError) as exc:
        params.check_prompt([1] * 240, DIMS)
    err = exc.value
    assert (err.param, err.prompt_tokens, err.max_new_tokens, err.limit, err.room) == (
        "max_new_tokens", 240, 20, 256, 16)
    assert "allowed range is [0, 16]" in str(err) and "n_positions=256" in str(err)
    with pytest.raises(ContextLengthError) as exc:
        params.check_prompt([1] * 100, DIMS, max_len=64)
    assert exc.value.param == "prompt" and exc.value.limit == 64
    assert "the engine's max_len=64" in str(exc.value)
    params.check_prompt([1] * 236, DIMS)  # 236 + 20 == 256 fits


def test_errors_survive_pickling() -> None:
    """Ray ships exceptions between processes: the data comes along."""
    with pytest.raises(ContextLengthError) as info:
        GenerationParams(max_new_tokens=50).check_prompt([1] * 250, DIMS)
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is ContextLengthError and str(back) == str(info.value)
    assert (back.param, back.limit, back.room) == ("max_new_tokens", 256, 6)
    with pytest.raises(ParameterError) as info:
        GenerationParams.from_keywords(DIMS, top_k=0, seed=-1)
    back = pickle.loads(pickle.dumps(info.value))
    assert back.problems == info.value.problems and back.param == "top_k"


def test_http_field_of_a_setting() -> None:
    pytest.importorskip("pydantic")
    from gpt2_onnx.serve.schemas import CompletionRequest

    assert [CompletionRequest.field_of(p) for p in
            ("max_new_tokens", "top_n", "greedy", "top_k", "seed", None)] == [
        "max_tokens", "logprobs", "temperature", "top_k", "seed", None]


# ------------------------------------------------------------------- keyword typos


def test_a_keyword_typo_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match=r"generate\(\) got an unexpected keyword argument "
                                        r"'top_kk'; did you mean 'top_k'\?"):
        resolve("generate", DIMS, None, {"top_kk": 5})
    with pytest.raises(TypeError, match="'colour'; it takes max_new_tokens, greedy"):
        resolve("generate", DIMS, None, {"colour": "red"})
    with pytest.raises(TypeError, match=r"stream\(\) got an unexpected keyword argument "
                                        "'show_top'"):
        resolve("stream", DIMS, None, {"show_top": 2}, exclude=("show_top",))
    with pytest.raises(TypeError, match="not both"):
        resolve("generate", DIMS, GenerationParams(), {"seed": 1})
    with pytest.raises(ParameterError, match="params: give a GenerationParams") as exc:
        resolve("generate", DIMS, {"seed": 1}, {})  # type: ignore[arg-type]
    assert exc.value.param == "params"


def test_generator_methods_refuse_typos(tiny_gen) -> None:
    gen = tiny_gen
    for call in (lambda: gen.generate("Hi", max_new_token=2),
                 lambda: gen.validate("Hi", max_new_token=2),
                 lambda: gen.stream("Hi", max_new_token=2),
                 lambda: gen.generate_ids([[1, 2]], max_new_token=2),
                 lambda: gen.params(max_new_token=2)):
        with pytest.raises(TypeError, match="'max_new_token'; did you mean "
                                            "'max_new_tokens'"):
            call()
