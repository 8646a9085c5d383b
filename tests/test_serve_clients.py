"""What real evaluation clients (lm-evaluation-harness' local-completions, tokenizer_backend=
remote) rely on beyond the OpenAI shape, against a real `gpt2-onnx serve` subprocess on the tiny
model (issue 29):

- is_greedy: lm-eval compares `token_logprob == max(top_logprobs.values())` with exact float
  equality, so the two numbers must come from one computation, bit for bit;
- more than 4 stop strings (lm-eval appends the EOS string to `until`);
- `GET /tokenizer_info` in vLLM's shape.

References are independent of the server: the same model's logits in this process
(`batch_logits`) and a float64 log-softmax written out here in numpy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from serve_harness import running_server  # noqa: E402

from gpt2_onnx.runtime.generator import TextGenerator  # noqa: E402
from gpt2_onnx.runtime.scoring import batch_logits  # noqa: E402
from gpt2_onnx.serve.schemas import MAX_STOP, MAX_STOP_CHARS, MAX_STOP_TOTAL  # noqa: E402

KEY = "clients-key-42"
MODEL = "random-tiny-seed0"
N_POSITIONS = 256  # the tiny preset's context
EOS = 50256  # GPT-2's <|endoftext|>


@pytest.fixture(scope="module")
def base(tiny_fused_dir: Path) -> Iterator[str]:
    with running_server(tiny_fused_dir, "--api-key", KEY) as url:
        yield url


@pytest.fixture(scope="module")
def http(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def gen(tiny_fused_dir: Path) -> TextGenerator:
    """The served model in this process, for reference logits."""
    return TextGenerator.load(tiny_fused_dir, device="cpu", precision="fp32-fused", threads=1)


def _complete(http: httpx.Client, **body: object) -> dict:
    resp = http.post("/v1/completions", json={"model": MODEL, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _ref_logsoftmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax of each row, written out independently of the runtime."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# ------------------------------------------------------------------------- is_greedy exact


def _prompts(http: httpx.Client) -> list[list[int]]:
    """Token-id prompts: random ids (few argmax positions) and a seed plus its greedy
    continuation (argmax nearly everywhere), so both kinds of position are covered."""
    rng = np.random.default_rng(29)
    out = [rng.integers(0, EOS, 40).tolist() for _ in range(3)]
    for seed in ([464, 3139], [40313, 481, 307]):
        res = _complete(http, prompt=seed, max_tokens=30, temperature=0, return_token_ids=True)
        out.append(seed + res["choices"][0]["token_ids"])
    return out


def test_echo_logprobs_are_greedy_exactly_at_the_argmax(http, gen) -> None:
    greedy_positions = 0
    for ids in _prompts(http):
        for k in (1, 5):
            res = _complete(http, prompt=ids, max_tokens=1, echo=True, logprobs=k,
                            temperature=0)
            lp = res["choices"][0]["logprobs"]
            ref = _ref_logsoftmax(batch_logits(gen.decoder, [ids], mode="all")[0])  # [len, V]
            assert lp["token_logprobs"][0] is None
            for j in range(1, len(ids)):
                got, top = lp["token_logprobs"][j], lp["top_logprobs"][j]
                assert abs(got - ref[j - 1, ids[j]]) < 1e-6, (j, got, ref[j - 1, ids[j]])
                if ids[j] == int(np.argmax(ref[j - 1])):
                    greedy_positions += 1
                    assert got == max(top.values()), (j, got, top)  # lm-eval's is_greedy
                else:
                    assert got < max(top.values())
    assert greedy_positions >= 40  # the greedy continuations put most positions at the argmax


def test_generated_logprobs_are_greedy_exactly(http, gen) -> None:
    for prompt in ([464, 3139], [40313, 481, 307], list(range(1000, 1020))):
        for k in (1, 5):
            for stream in (False, True):
                body = dict(prompt=prompt, max_tokens=24, temperature=0, logprobs=k,
                            return_token_ids=True)
                if stream:
                    lps: dict[str, list] = {"token_logprobs": [], "top_logprobs": []}
                    ids: list[int] = []
                    with http.stream("POST", "/v1/completions",
                                     json={"model": MODEL, "stream": True, **body}) as resp:
                        assert resp.status_code == 200
                        for line in resp.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            for c in json.loads(line[6:])["choices"]:
                                if c.get("logprobs"):
                                    for key in lps:
                                        lps[key] += c["logprobs"][key]
                                ids += c.get("token_ids") or []
                else:
                    choice = _complete(http, **body)["choices"][0]
                    lps, ids = choice["logprobs"], choice["token_ids"]
                assert len(ids) == len(lps["token_logprobs"]) > 0
                logits = batch_logits(gen.decoder, [prompt + ids[:-1]], mode="all")[0]
                ref = _ref_logsoftmax(logits[len(prompt) - 1:])  # [n_new, V]
                for i, (tok, got, top) in enumerate(zip(ids, lps["token_logprobs"],
                                                        lps["top_logprobs"], strict=True)):
                    assert got == max(top.values()), (i, got, top)  # is_greedy, bit for bit
                    assert tok == int(np.argmax(ref[i]))
                    # 1e-5, not 1e-6: the reference is one full forward, the server decoded
                    # step by step from its KV cache (float32 logits ~2e-6 apart)
                    assert abs(got - ref[i, tok]) < 1e-5, (i, got, ref[i, tok])


# ------------------------------------------------------------------------------ stop strings


@pytest.mark.parametrize("count", [5, MAX_STOP])
def test_more_than_four_stop_strings_are_honoured(http, count) -> None:
    assert MAX_STOP == 32
    prompt = [464, 3139, 286]
    full = _complete(http, prompt=prompt, max_tokens=40, temperature=0)["choices"][0]["text"]
    late, early = full[len(full) * 2 // 3:][:3], full[len(full) // 3:][:3]
    assert late and early
    # never-seen fillers first, the stop that appears later in the text before the earlier one
    # (the text ends at the first stop to appear, not the first listed), lm-eval's EOS last
    stops = [f"\u0000never{i}" for i in range(count - 3)] + [late, early, "<|endoftext|>"]
    assert len(stops) == count
    cut = full[:min(full.index(s) for s in (late, early))]
    choice = _complete(http, prompt=prompt, max_tokens=40, temperature=0,
                       stop=stops)["choices"][0]
    assert choice["text"] == cut and choice["finish_reason"] == "stop"


@pytest.mark.parametrize("stop", [
    [f"s{i}" for i in range(MAX_STOP + 1)],  # too many
    ["x" * (MAX_STOP_CHARS + 1)],  # one too long
    ["y" * MAX_STOP_CHARS] * (MAX_STOP_TOTAL // MAX_STOP_CHARS + 1),  # too long in all
])
def test_too_many_or_too_long_stop_strings_are_400_naming_stop(http, stop) -> None:
    resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stop": stop})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == "stop" and f"at most {MAX_STOP} stop strings" in err["message"]
    assert str(MAX_STOP_CHARS) in err["message"] and str(MAX_STOP_TOTAL) in err["message"]


# ------------------------------------------------------------------------------ /tokenizer_info


def test_tokenizer_info_has_gpt2s_special_tokens(http, base) -> None:
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == info["bos_token"] == "<|endoftext|>"
    assert info["eos_token_id"] == info["bos_token_id"] == EOS
    assert info["pad_token"] is None and info["pad_token_id"] is None  # GPT-2 has none
    assert info["model_max_length"] == N_POSITIONS
    assert info["tokenizer_class"] == "GPT2Tokenizer"
    # same auth rule as the other API routes
    resp = httpx.get(f"{base}/tokenizer_info", timeout=10)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.get(f"{base}/tokenizer_info", headers={"Authorization": "Bearer nope"},
                      timeout=10)
    assert wrong.status_code == 401
