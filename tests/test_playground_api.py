"""The server extensions the playground page reads (issue 20), over plain HTTP; no browser.

- `return_token_ids` (vLLM's name): each choice carries `token_ids`, and `logprobs` a
  `top_candidates` list per token ({id, token, logprob}) — ids the page sends back as a token-id
  prompt to force a candidate.
- `timings` on a choice once it is done (the engine's, in ms and tokens/s).
- `device` on the model card; `--no-ui` leaves `GET /` out.

References: `TextGenerator` in this process (same model, greedy; its explain mode's candidates)
and the GPT-2 tokenizer for the candidates' text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_harness import running_server  # noqa: E402

from gpt2_onnx.runtime.generator import TextGenerator  # noqa: E402

PROMPT = "Paris will"
TOP_N = 4
TIMING_KEYS = {"prefill_ms", "decode_ms", "decode_tokens_per_s", "ttft_ms", "queue_ms"}


@pytest.fixture(scope="module")
def server(tiny_fused_dir: Path) -> Iterator[str]:
    with running_server(tiny_fused_dir, "--no-ui") as url:
        yield url


@pytest.fixture(scope="module")
def gen(tiny_fused_dir: Path) -> TextGenerator:
    return TextGenerator.load(tiny_fused_dir, device="cpu", precision="fp32-fused", threads=1)


def complete(base: str, **body) -> dict:
    r = httpx.post(base + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream_chunks(base: str, **body) -> list[dict]:
    with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200
        data = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def assert_candidates_match(cands: list[dict], step, gen: TextGenerator) -> None:
    """The API's candidates of one step against the in-process explain mode's."""
    assert [c["id"] for c in cands] == [c.id for c in step.candidates]
    for c in cands:
        assert c["token"] == gen.decode([c["id"]], skip_special_tokens=False)
    assert [c["logprob"] for c in cands] == pytest.approx(
        [math.log(c.prob) for c in step.candidates], abs=1e-4)


def test_streamed_token_ids_candidates_and_timings(server: str, gen: TextGenerator) -> None:
    ref = gen.generate(PROMPT, max_new_tokens=6, greedy=True, show_top=TOP_N)
    chunks = stream_chunks(server, prompt=PROMPT, max_tokens=6, temperature=0,
                           logprobs=TOP_N, return_token_ids=True)
    choices = [c["choices"][0] for c in chunks]
    tokens = [ch for ch in choices if ch["token_ids"]]
    assert [ch["token_ids"] for ch in tokens] == [[i] for i in ref.ids]
    for ch, step in zip(tokens, ref.steps, strict=True):
        lp = ch["logprobs"]
        assert len(lp["top_candidates"]) == 1
        assert_candidates_match(lp["top_candidates"][0], step, gen)
        # the same numbers as OpenAI's text-keyed top_logprobs
        for c in lp["top_candidates"][0]:
            assert lp["top_logprobs"][0][c["token"]] == pytest.approx(c["logprob"])
    last = choices[-1]
    assert last["finish_reason"] == "length" and last["token_ids"] == []
    assert set(last["timings"]) == TIMING_KEYS
    t = last["timings"]
    assert t["ttft_ms"] >= t["prefill_ms"] > 0 and t["decode_tokens_per_s"] > 0
    assert t["decode_ms"] > 0 and t["queue_ms"] >= 0
    assert all("timings" not in ch for ch in choices[:-1])


def test_non_streamed_and_echo(server: str, gen: TextGenerator) -> None:
    ref = gen.generate(PROMPT, max_new_tokens=5, greedy=True, show_top=TOP_N)
    choice = complete(server, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=TOP_N,
                      echo=True, return_token_ids=True)["choices"][0]
    assert choice["token_ids"] == ref.ids
    assert choice["text"] == PROMPT + ref.text
    lp = choice["logprobs"]
    n_prompt = len(gen.encode(PROMPT))
    # one entry per token, prompt first: the first prompt token has no candidates (as
    # top_logprobs has None there); the others are the prompt's own top candidates
    assert len(lp["top_candidates"]) == len(lp["top_logprobs"]) == n_prompt + 5
    assert lp["top_candidates"][0] is None and lp["top_logprobs"][0] is None
    for cands, top in zip(lp["top_candidates"][1:], lp["top_logprobs"][1:], strict=True):
        assert len(cands) == TOP_N
        for c in cands:
            assert top[c["token"]] == pytest.approx(c["logprob"])
    for cands, step in zip(lp["top_candidates"][n_prompt:], ref.steps, strict=True):
        assert_candidates_match(cands, step, gen)
    assert set(choice["timings"]) == TIMING_KEYS


def test_forcing_a_candidate_by_token_ids(server: str, gen: TextGenerator) -> None:
    """What the page does: prompt ids + the tokens kept + another candidate, as a token-id
    prompt; the continuation equals the in-process greedy run from those ids."""
    first = complete(server, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=TOP_N,
                     return_token_ids=True)["choices"][0]
    k = 2
    other = first["logprobs"]["top_candidates"][k][1]["id"]
    assert other != first["token_ids"][k]
    ids = gen.encode(PROMPT) + first["token_ids"][:k] + [other]
    forced = complete(server, prompt=ids, max_tokens=3, temperature=0,
                      return_token_ids=True)["choices"][0]
    ref = gen.generate_ids([ids], max_new_tokens=3, greedy=True)[0]
    assert forced["token_ids"] == ref.ids
    assert forced["text"] == ref.text


def test_plain_openai_shape_without_the_extension(server: str) -> None:
    choice = complete(server, prompt=PROMPT, max_tokens=2, temperature=0,
                      logprobs=2)["choices"][0]
    assert "token_ids" not in choice
    assert "top_candidates" not in choice["logprobs"]
    chunks = stream_chunks(server, prompt=PROMPT, max_tokens=2, temperature=0)
    assert all("token_ids" not in c["choices"][0] for c in chunks)


def test_model_card_device_and_no_ui(server: str, gen: TextGenerator) -> None:
    card = httpx.get(server + "/v1/models", timeout=10).json()["data"][0]
    assert card["device"] == "cpu" == str(gen.device)
    assert card["precision"] == "fp32-fused"
    r = httpx.get(server + "/", timeout=10)  # --no-ui: no page
    assert r.status_code == 404
    assert r.json()["error"]["message"].startswith("no route GET /")


def test_page_served_by_default_with_a_same_origin_policy(tiny_fused_dir: Path) -> None:
    from gpt2_onnx.serve.ui import page_html

    with running_server(tiny_fused_dir) as base:
        r = httpx.get(base + "/", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.text == page_html()
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    # nothing in the page points at another host
    assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text
