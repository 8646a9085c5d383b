"""`gpt2-onnx serve` as users meet it: a real subprocess on a free port, the official `openai`
client and httpx, real signals.

References are independent of the server: `TextGenerator.generate` in this process (same model,
same seed), transformers' logits for log-probs, the GPT-2 tokenizer's known ids. One server per
module serves most tests; the drain tests start their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from gpt2_onnx.runtime.generator import TextGenerator  # noqa: E402

KEY = "test-key-123"
SLOTS, MAX_QUEUE = 3, 2
N_POSITIONS = 256  # the tiny preset's context
LAUNCH = "import sys; from gpt2_onnx.cli import main; sys.argv[0] = 'gpt2-onnx'; main()"


# ------------------------------------------------------------------------------ harness


class Server:
    """`gpt2-onnx serve` in a subprocess on a free port (--port 0; the URL is read from its
    first stderr line), stderr kept in a file."""

    def __init__(self, model_dir: Path, log: Path, *args: str, prelude: str = "") -> None:
        self.log = log
        self._stderr = open(log, "w")  # noqa: SIM115 - closed in stop()
        code = prelude + LAUNCH
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "serve", str(model_dir), "--port", "0",
             "--threads", "1", *args],
            stdout=subprocess.DEVNULL, stderr=self._stderr,
            env={**os.environ, "COLUMNS": "300", "NO_COLOR": "1"})
        self.url = self._wait_url()
        self._wait_ready()

    def _wait_url(self, timeout: float = 60) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = re.search(r"http://127\.0\.0\.1:\d+", self.log.read_text())
            if found:
                return found.group(0)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: "
                                   f"{self.log.read_text()}")
            time.sleep(0.05)
        raise TimeoutError(f"no URL from the server: {self.log.read_text()}")

    def _wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                return
            time.sleep(0.05)
        raise TimeoutError(f"server not ready: {self.log.read_text()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._stderr.close()
        return code


@pytest.fixture(scope="module")
def model_dir(tiny_fused_dir: Path) -> Path:
    """random-init tiny, seed 0 (conftest's tiny_reference weights), with the fused variant."""
    return tiny_fused_dir


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--api-key", KEY,
                 "--slots", str(SLOTS), "--max-queue", str(MAX_QUEUE))
    yield srv
    assert srv.stop() == 0, srv.log.read_text()


@pytest.fixture(scope="module")
def gen(model_dir: Path) -> TextGenerator:
    """The same model in this process: the reference for what the server returns."""
    return TextGenerator.load(model_dir, device="cpu", precision="fp32-fused", threads=1)


@pytest.fixture()
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture()
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as c:
        yield c
    _wait_idle(server)


def _metrics(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"},
                     timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _wait_idle(server: Server, timeout: float = 30) -> dict[str, float]:
    end = time.monotonic() + timeout
    while True:
        m = _metrics(server)
        if m["gpt2onnx_busy_slots"] == 0 and m["gpt2onnx_queue_length"] == 0 \
                and m["gpt2onnx_requests_in_flight"] == 0:
            return m
        if time.monotonic() > end:
            raise TimeoutError(f"server not idle: {m}")
        time.sleep(0.05)


def _sse(lines: Iterator[str]) -> Iterator[dict]:
    """Chunks of a server-sent event stream until `data: [DONE]` (which must come)."""
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        if data == "[DONE]":
            return
        yield json.loads(data)
    raise AssertionError("the stream ended without data: [DONE]")


# ------------------------------------------------------------------------------ openai client


def test_completion_equals_generate_with_the_same_seed(client, gen, server) -> None:
    model = client.models.list().data[0].id
    assert model == "random-tiny-seed0"
    a = client.completions.create(model=model, prompt="Paris will", max_tokens=12, seed=7)
    b = client.completions.create(model=model, prompt="Paris will", max_tokens=12, seed=7)
    ref = gen.generate("Paris will", max_new_tokens=12, seed=7, top_k=None)
    assert a.choices[0].text == b.choices[0].text == ref.text
    assert a.choices[0].finish_reason == "length"
    assert (a.usage.prompt_tokens, a.usage.completion_tokens, a.usage.total_tokens) == (2, 12, 14)
    # Sampling settings and the llama.cpp/vLLM extensions reach the engine as given.
    c = client.completions.create(model=model, prompt="London was", max_tokens=10, seed=3,
                                  temperature=0.7, top_p=0.9,
                                  extra_body={"top_k": 40, "repetition_penalty": 1.3})
    ref = gen.generate("London was", max_new_tokens=10, seed=3, temperature=0.7, top_p=0.9,
                       top_k=40, repetition_penalty=1.3)
    assert c.choices[0].text == ref.text
    greedy = client.completions.create(model=model, prompt="London was", max_tokens=10,
                                       temperature=0)
    assert greedy.choices[0].text == gen.generate("London was", max_new_tokens=10,
                                                  greedy=True).text


def test_streaming_joins_to_the_completion(client, gen) -> None:
    ref = gen.generate("Paris will", max_new_tokens=20, seed=11, top_k=None)
    chunks = list(client.completions.create(
        model="random-tiny-seed0", prompt="Paris will", max_tokens=20, seed=11, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == ref.text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_n_choices_and_several_prompts(client, gen) -> None:
    res = client.completions.create(model="random-tiny-seed0", prompt=["Paris will", "A cat"],
                                    max_tokens=6, n=2, seed=5)
    assert [c.index for c in res.choices] == [0, 1, 2, 3]
    for c in res.choices:
        prompt = ["Paris will", "A cat"][c.index // 2]
        # choice j of a prompt samples with seed + j
        assert c.text == gen.generate(prompt, max_new_tokens=6, seed=5 + c.index % 2,
                                      top_k=None).text
    assert res.choices[0].text != res.choices[1].text
    assert res.usage.prompt_tokens == 2 + 2 and res.usage.completion_tokens == 24


def test_stop_string_and_token_id_prompts(client, gen) -> None:
    full = gen.generate("Paris will", max_new_tokens=30, greedy=True).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full[:full.index(stop)]
    res = client.completions.create(model="random-tiny-seed0", prompt=[40313, 481],
                                    max_tokens=30, temperature=0, stop=[stop])
    assert res.choices[0].text == cut and res.choices[0].finish_reason == "stop"
    res = client.completions.create(model="random-tiny-seed0", prompt=[[40313, 481], [32]],
                                    max_tokens=4, temperature=0, echo=True)
    assert res.choices[0].text.startswith("Paris will") and res.choices[1].text.startswith("A")


def _reference_logprobs(model, ids: list[int]) -> np.ndarray:
    """transformers: log_softmax of the logits at each position, float64 [len, vocab]."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def test_logprobs_against_transformers(client, tiny_reference, torch_one_thread) -> None:
    res = client.completions.create(model="random-tiny-seed0", prompt="Paris will",
                                    max_tokens=5, temperature=0, logprobs=3)
    lp = res.choices[0].logprobs
    ids = [40313, 481]
    ref_rows = []
    # Rebuild the generated ids from the greedy reference itself, step by step.
    for _ in range(5):
        row = _reference_logprobs(tiny_reference, ids)[-1]
        ref_rows.append(row)
        ids.append(int(row.argmax()))
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for step, row in enumerate(ref_rows):
        chosen = int(row.argmax())
        assert lp.token_logprobs[step] == pytest.approx(row[chosen], abs=1e-4)
        top = lp.top_logprobs[step]
        assert len(top) == 3  # greedy: the chosen token is among the top 3
        best3 = np.sort(row)[::-1][:3]
        assert sorted(top.values(), reverse=True) == pytest.approx(best3.tolist(), abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_echo_logprobs_max_tokens_0_scores_the_prompt(client, gen, tiny_reference,
                                                      torch_one_thread) -> None:
    text = "The capital of France is Paris, and"
    res = client.completions.create(model="random-tiny-seed0", prompt=text, max_tokens=0,
                                    echo=True, logprobs=2)
    choice = res.choices[0]
    assert choice.text == text and res.usage.completion_tokens == 0
    lp = choice.logprobs
    ids = gen.encode(text)
    assert "".join(lp.tokens) == text and len(lp.tokens) == len(ids)
    ref = _reference_logprobs(tiny_reference, ids)
    expected = [ref[j, ids[j + 1]] for j in range(len(ids) - 1)]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:], expected, atol=1e-4)
    np.testing.assert_allclose(lp.token_logprobs[1:], gen.score(text, add_bos=False).logprobs,
                               atol=1e-4)
    for j in range(1, len(ids)):
        assert max(lp.top_logprobs[j].values()) == pytest.approx(ref[j - 1].max(), abs=1e-4)
    # echo + generation: the prompt's log-probs, then the new tokens'
    res = client.completions.create(model="random-tiny-seed0", prompt=text, max_tokens=3,
                                    echo=True, logprobs=0, temperature=0)
    assert len(res.choices[0].logprobs.tokens) == len(ids) + 3
    assert res.choices[0].text.startswith(text)


# ------------------------------------------------------------------------------ plain HTTP


def test_models_health_tokenize_detokenize(http, server) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"  # no key
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["max_model_len"] == N_POSITIONS
    assert http.get("/v1/models/random-tiny-seed0").json()["id"] == "random-tiny-seed0"
    assert http.post("/tokenize", json={"content": "Paris will"}).json()["tokens"] == [40313, 481]
    assert http.post("/tokenize", json={"prompt": "Paris will"}).json()["count"] == 2
    assert http.post("/detokenize", json={"tokens": [40313, 481]}).json()["content"] \
        == "Paris will"


def _assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
        assert param.split(".")[0] in err["message"], err
    return err


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "temperature": 5}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_k": -2}, "top_k"),
    ({"prompt": "x", "top_k": 60000}, "top_k"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "stop": [f"s{i}" for i in range(33)]}, "stop"),  # at most 32
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "bogus": 1}, "bogus"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [40313, 99999]}, "prompt"),
    ({"prompt": [[40313], ["x"]]}, "prompt"),
    ({"prompt": "x", "n": 4, "max_tokens": 1, "echo": 3}, "echo"),
])
def test_bad_parameters_are_400_naming_the_field(http, body, param) -> None:
    err = _assert_error(http.post("/v1/completions", json=body), 400, param)
    assert err["type"] == "invalid_request_error"


def test_bad_json_and_other_routes(http) -> None:
    _assert_error(http.post("/v1/completions", content=b"{not json",
                            headers={"content-type": "application/json"}), 400)
    err = _assert_error(http.post("/v1/completions", content=b'{"prompt": "x"}',
                                  headers={"content-type": "application/x-www-form-urlencoded"}),
                        400)
    assert "Content-Type: application/json" in err["message"]
    _assert_error(http.post("/detokenize", json={"tokens": [70000]}), 400, "tokens")
    _assert_error(http.post("/tokenize", json={}), 400, "content")
    err = _assert_error(http.post("/v1/chat/completions", json={"messages": []}), 404)
    assert "/v1/completions" in err["message"] and "chat" in err["message"]
    err = _assert_error(http.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}),
                        404, "model")
    assert err["code"] == "model_not_found"
    _assert_error(http.get("/v2/nothing"), 404)


def test_context_and_body_limits_are_413(http) -> None:
    err = _assert_error(http.post("/v1/completions", json={"prompt": [1] * (N_POSITIONS + 1)}),
                        413, "prompt")
    assert err["code"] == "context_length_exceeded"
    err = _assert_error(http.post("/v1/completions", json={"prompt": [1] * 200,
                                                           "max_tokens": 57}), 413, "max_tokens")
    assert "56" in err["message"]  # the most it may ask for
    ok = http.post("/v1/completions", json={"prompt": [1] * 200, "max_tokens": 56,
                                            "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 56
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'
    _assert_error(http.post("/v1/completions", content=big,
                            headers={"content-type": "application/json"}), 413)

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"a" * 65536
        yield b'"}'
    _assert_error(http.post("/v1/completions", content=chunked(),
                            headers={"content-type": "application/json"}), 413)


def test_api_key_is_required(server) -> None:
    body = {"prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}):
        err = _assert_error(httpx.post(f"{server.url}/v1/completions", json=body,
                                       headers=headers, timeout=10), 401)
        assert err["code"] == "invalid_api_key"
    _assert_error(httpx.get(f"{server.url}/metrics", timeout=10), 401)
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="random-tiny-seed0", prompt="x", max_tokens=1)


@contextlib.contextmanager
def _stream(server: Server, body: dict) -> Iterator[httpx.Response]:
    """A streamed completion, open until the block ends (then the client goes away)."""
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c, \
            c.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}
                     ) as resp:
        assert resp.status_code == 200, resp.read()
        yield resp


def test_queue_full_is_429_then_disconnect_frees_the_slots(http, server) -> None:
    before = _wait_idle(server)
    # SLOTS + MAX_QUEUE choices: every slot busy and the queue full.
    with _stream(server, {"prompt": "Paris will", "max_tokens": 250,
                          "n": SLOTS + MAX_QUEUE, "seed": 1}) as resp:
        chunks = _sse(resp.iter_lines())  # kept: dropping the iterator closes the connection
        next(chunks)  # the first token is out: the request runs
        err = _assert_error(http.post("/v1/completions", json={"prompt": "x",
                                                               "max_tokens": 1}), 429)
        assert err["type"] == "rate_limit_error"
        assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}
                         ).headers["retry-after"] == "1"
        assert _metrics(server)["gpt2onnx_busy_slots"] == SLOTS
        next(chunks)
    # the client went away mid-stream
    after = _wait_idle(server)
    assert after['gpt2onnx_requests_total{outcome="cancelled"}'] \
        == before['gpt2onnx_requests_total{outcome="cancelled"}'] + 1
    assert after['gpt2onnx_requests_total{outcome="rejected"}'] \
        == before['gpt2onnx_requests_total{outcome="rejected"}'] + 2
    assert after["gpt2onnx_engine_cancelled_total"] \
        == before["gpt2onnx_engine_cancelled_total"] + SLOTS + MAX_QUEUE
    # Generation stopped: far fewer tokens than the 5 x 250 asked for.
    made = after["gpt2onnx_generation_tokens_total"] - before["gpt2onnx_generation_tokens_total"]
    assert made < (SLOTS + MAX_QUEUE) * 250 // 2


def test_disconnect_while_waiting_for_a_plain_response_frees_the_slots(server) -> None:
    before = _wait_idle(server)
    with pytest.raises(httpx.ReadTimeout), httpx.Client(
            timeout=httpx.Timeout(60, read=0.1), headers={"Authorization": f"Bearer {KEY}"}) as c:
        c.post(f"{server.url}/v1/completions",  # two waves of 254 steps: far beyond 0.1 s
               json={"prompt": "Paris will", "max_tokens": 254, "n": SLOTS + MAX_QUEUE})
    after = _wait_idle(server)  # the client gave up: the slots are free again
    assert after['gpt2onnx_requests_total{outcome="cancelled"}'] \
        == before['gpt2onnx_requests_total{outcome="cancelled"}'] + 1
    made = after["gpt2onnx_generation_tokens_total"] - before["gpt2onnx_generation_tokens_total"]
    assert made < (SLOTS + MAX_QUEUE) * 254


def test_concurrent_streams_each_equal_their_solo_result(server, gen) -> None:
    jobs = [("Paris will", 1, 0.8), ("A long time ago", 2, 1.0), ("The", 3, 1.2),
            ("In 1999, the", 4, 0.5), ("Numbers: 1, 2,", 5, 1.0)]  # 5 > SLOTS: one waits
    solo = [gen.generate(p, max_new_tokens=40, seed=s, temperature=t, top_k=None).text
            for p, s, t in jobs]
    out: dict[int, str] = {}

    def run(i: int) -> None:
        p, s, t = jobs[i]
        with _stream(server, {"prompt": p, "max_tokens": 40, "seed": s,
                              "temperature": t}) as resp:
            out[i] = "".join(ch["choices"][0]["text"] for ch in _sse(resp.iter_lines()))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [out.get(i) for i in range(len(jobs))] == solo


def test_metrics_show_latency_and_tokens(server, client) -> None:
    secret = "zebra quokka prompt"
    client.completions.create(model="random-tiny-seed0", prompt=secret, max_tokens=5, seed=0)
    m = _wait_idle(server)
    assert m["gpt2onnx_time_to_first_token_seconds_count"] >= 1
    assert m["gpt2onnx_inter_token_latency_seconds_count"] >= 4
    assert m["gpt2onnx_prompt_tokens_total"] >= 1 and m["gpt2onnx_generation_tokens_total"] >= 5
    assert m['gpt2onnx_requests_total{outcome="ok"}'] >= 1
    assert m["gpt2onnx_slots"] == SLOTS and m["gpt2onnx_max_queue"] == MAX_QUEUE
    log = server.log.read_text()
    assert "choices=1 prompt_tokens=" in log and secret not in log  # prompts are not logged


# ------------------------------------------------------------------------------ signals


def test_sigterm_drains_in_flight_requests_then_exits_0(model_dir, tmp_path) -> None:
    srv = Server(model_dir, tmp_path / "drain.log", "--slots", "2", "--grace", "60")
    try:
        with _stream(srv, {"prompt": "Paris will", "max_tokens": 200, "seed": 2}) as resp:
            chunks = _sse(resp.iter_lines())
            texts = [next(chunks)["choices"][0]["text"]]
            srv.signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while httpx.get(f"{srv.url}/health", timeout=5).status_code != 503:
                assert time.monotonic() < deadline, "health never said draining"
            err = _assert_error(httpx.post(f"{srv.url}/v1/completions",
                                           json={"prompt": "x"}, timeout=10), 503)
            assert err["code"] == "draining"
            rest = list(chunks)
        texts += [ch["choices"][0]["text"] for ch in rest]
        assert rest[-1]["choices"][0]["finish_reason"] == "length"
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()
    ref = TextGenerator.load(model_dir, device="cpu", precision="fp32-fused", threads=1)
    assert "".join(texts) == ref.generate("Paris will", max_new_tokens=200, seed=2,
                                          top_k=None).text
    assert "draining" in srv.log.read_text()


def test_ctrl_c_past_the_grace_cancels_and_exits_0(model_dir, tmp_path) -> None:
    srv = Server(model_dir, tmp_path / "cut.log", "--slots", "1", "--grace", "0",
                 "--model-name", "gpt2-tiny")
    assert httpx.get(f"{srv.url}/v1/models", timeout=10).json()["data"][0]["id"] == "gpt2-tiny"
    try:
        with _stream(srv, {"prompt": "Paris will", "max_tokens": 250}) as resp:
            chunks = _sse(resp.iter_lines())
            next(chunks)
            srv.signal(signal.SIGINT)
            rest = list(chunks)  # ends with [DONE], not a hang
        assert "error" in rest[-1] and rest[-1]["error"]["code"] == "cancelled"
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()
    assert "cancelled 1 request" in srv.log.read_text()


def test_a_missing_directory_is_one_line(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-c", LAUNCH, "serve", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "300"})
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "error" in proc.stderr


def test_fp32_only_directory_names_the_fix(tiny_dir) -> None:
    proc = subprocess.run([sys.executable, "-c", LAUNCH, "serve", str(tiny_dir)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "300"})
    assert proc.returncode == 1 and "fp32-fused" in proc.stderr, proc.stderr


def test_without_the_serve_extra_the_command_says_what_to_install(tiny_fused_dir) -> None:
    blocked = "import sys; sys.modules.update(fastapi=None, uvicorn=None); "
    proc = subprocess.run([sys.executable, "-c", blocked + LAUNCH, "serve", str(tiny_fused_dir)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "300"})
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "pip install 'gpt2-onnx[serve]'" in proc.stderr and "fastapi" in proc.stderr
    listed = subprocess.run([sys.executable, "-c", blocked + LAUNCH, "--help"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "COLUMNS": "300"})
    assert listed.returncode == 0 and "serve" in listed.stdout


def test_another_host_mounts_the_app_and_health_is_503_until_loaded(gen) -> None:
    """The routes on a host other than `gpt2-onnx serve` (uvicorn in a thread here, as a Ray
    Serve deployment would mount them): 503 while no engine is set, then the same answers."""
    import socket

    import uvicorn

    from gpt2_onnx.runtime.engine import Engine
    from gpt2_onnx.serve.app import create_app
    from gpt2_onnx.serve.routes import ServerState

    state = ServerState(model_id="hosted")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    engine = Engine(gen, slots=2, max_queue=2)
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["error"]["code"] == "loading"
        err = _assert_error(httpx.post(f"{url}/v1/completions", json={"prompt": "x"},
                                       timeout=10), 503)
        assert err["code"] == "loading"
        state.set_ready(engine.start())
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        res = httpx.post(f"{url}/v1/completions", timeout=60,
                         json={"model": "hosted", "prompt": "Paris will", "max_tokens": 6,
                               "seed": 4})
        assert res.json()["choices"][0]["text"] == gen.generate(
            "Paris will", max_new_tokens=6, seed=4, top_k=None).text
    finally:
        server.should_exit = True
        thread.join(30)
        engine.close()
        sock.close()
