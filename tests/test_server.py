"""The OpenAI-compatible server (engine/server/) against a real uvicorn server on 127.0.0.1.

Driven with the official ``openai`` client and raw HTTP (httpx, and a plain socket for
disconnects). Greedy answers are compared token for token with a separate plain Engine (no
auto_batch, no server); seeded samples with the same Engine given the same seeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'engine[serve]')")
openai = pytest.importorskip("openai", reason="the serve extra is not installed (pip install 'engine[serve]')")

import httpx  # noqa: E402 -- after the skips: an optional extra
import uvicorn  # noqa: E402

import engine  # noqa: E402
from engine.server import ServerConfig, create_app  # noqa: E402
from engine.testing.synthetic import SyntheticSpec, cached_model  # noqa: E402

MAX_LENGTH = 160


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app: Any) -> Iterator[str]:
    """``app`` under uvicorn on 127.0.0.1 in a thread; yields its base URL once /health is 200."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.02)
        yield base
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_model(SyntheticSpec(layout="gqa", seed=53), tmp_path_factory.mktemp("server-models"))


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> Iterator[engine.Engine]:
    """The independent reference: a plain Engine, one request at a time, no server."""
    with engine.Engine(model_dir, max_length=MAX_LENGTH) as eng:
        yield eng


@pytest.fixture(scope="module")
def base(model_dir: Path) -> Iterator[str]:
    eng = engine.Engine(model_dir, max_length=MAX_LENGTH, max_batch=4, auto_batch=True)
    with live_server(create_app(eng, config=ServerConfig(model_name="tiny"))) as url:
        yield url


@pytest.fixture(scope="module")
def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def _sse(text: str) -> list[Any]:
    """The data lines of an SSE body, JSON-decoded (``[DONE]`` kept as the string)."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ------------------------------------------------------------------------------------------------
# protocol


def test_completion_greedy_equals_engine(client: openai.OpenAI, ref: engine.Engine) -> None:
    want = ref.generate("Hello there", 12)
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny"
    assert isinstance(r.created, int)
    (choice,) = r.choices
    assert choice.text == want.text
    assert choice.finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(want.prompt_ids)
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_prompt_forms(client: openai.OpenAI, ref: engine.Engine) -> None:
    """A list of token ids, a list of strings, a list of id lists: one choice per prompt, in order."""
    ids = [5, 80, 81, 90]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == ref.generate(ids, 8).text
    r = client.completions.create(model="tiny", prompt=["one", "two words"], max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [ref.generate("one", 6).text, ref.generate("two words", 6).text]
    r = client.completions.create(model="tiny", prompt=[[5, 6], [7, 8, 9]], max_tokens=5, temperature=0)
    assert [c.text for c in r.choices] == [ref.generate([5, 6], 5).text, ref.generate([7, 8, 9], 5).text]
    assert r.usage.prompt_tokens == 5


def test_chat_greedy_equals_engine_chat(client: openai.OpenAI, ref: engine.Engine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    want = ref.chat(messages, 10)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(want.prompt_ids)
    assert r.usage.completion_tokens == len(want.token_ids)
    # max_completion_tokens is the newer name of max_tokens
    r2 = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10, temperature=0)
    assert r2.choices[0].message.content == want.text


def test_streaming_chat_and_completion(client: openai.OpenAI, base: str, ref: engine.Engine) -> None:
    messages = [{"role": "user", "content": "Tell me"}]
    want = ref.chat(messages, 20)
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert all(c.usage is None for c in chunks[:-1])
    # raw SSE: text/event-stream, ends with data: [DONE]; no usage field unless asked for
    body = {"model": "tiny", "prompt": "Tell me", "max_tokens": 15, "temperature": 0, "stream": True}
    r = httpx.post(base + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.text)
    assert events[-1] == "[DONE]" and r.text.endswith("data: [DONE]\n\n")
    assert all(e["object"] == "text_completion" and "usage" not in e for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == ref.generate("Tell me", 15).text


def test_stop_strings(client: openai.OpenAI, ref: engine.Engine) -> None:
    full = ref.generate("Stop here", 30).text
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].isprintable())
    want = full[: full.index(stop)]
    r = client.completions.create(model="tiny", prompt="Stop here", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    stream = client.completions.create(
        model="tiny", prompt="Stop here", max_tokens=30, temperature=0, stop=stop, stream=True
    )
    parts = list(stream)
    assert "".join(c.choices[0].text for c in parts) == want
    assert parts[-1].choices[0].finish_reason == "stop"


def test_seed_and_n(client: openai.OpenAI, ref: engine.Engine) -> None:
    """n > 1 with a seed: choice j draws with seed + j, exactly as Engine.generate with that seed,
    and the same request gives the same choices again."""
    kw: dict[str, Any] = {"model": "tiny", "prompt": "Pick", "max_tokens": 12, "temperature": 1.0, "seed": 7, "n": 3}
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    texts = [c.text for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.text for c in b.choices]
    want = [ref.generate("Pick", 12, do_sample=True, temperature=1.0, seed=7 + j).text for j in range(3)]
    assert texts == want
    assert len(set(texts)) > 1
    assert a.usage.completion_tokens == sum(
        len(ref.generate("Pick", 12, do_sample=True, temperature=1.0, seed=7 + j).token_ids) for j in range(3)
    )
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=8, temperature=0.8, seed=3, n=2
    )
    assert len(chat.choices) == 2


def test_logprobs(client: openai.OpenAI, ref: engine.Engine) -> None:
    want = ref.generate("Log", 6, logprobs=3)
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Log"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(max(t.logprob for t in item.top_logprobs))  # greedy: the top one
        assert item.bytes == list(item.token.encode("utf-8"))
    c = client.completions.create(model="tiny", prompt="Log", max_tokens=6, temperature=0, logprobs=3)
    lp = c.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(want.logprobs, abs=1e-6)
    assert len(lp.tokens) == len(lp.top_logprobs) == len(want.token_ids)
    assert all(len(t) <= 3 for t in lp.top_logprobs)
    assert c.choices[0].text == want.text
    # streamed: one logprob entry per token, the same values
    stream = client.completions.create(model="tiny", prompt="Log", max_tokens=6, temperature=0, logprobs=3, stream=True)
    got = [v for ch in stream for v in (ch.choices[0].logprobs.token_logprobs if ch.choices[0].logprobs else [])]
    assert got == pytest.approx(want.logprobs, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# errors


BAD_REQUESTS = {
    "unknown field": ("/v1/completions", {"model": "tiny", "prompt": "x", "frobnicate": 1}, "frobnicate"),
    "unsupported tools": (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": []},
        "tools",
    ),
    "wrong type": ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    "no prompt": ("/v1/completions", {"model": "tiny"}, "prompt"),
    "zero max_tokens": ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, None),
    "negative temperature": ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, None),
    "top_p zero": ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, None),
    "n zero": ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 0}, "n"),
    "seed negative": ("/v1/completions", {"model": "tiny", "prompt": "x", "seed": -1}, None),
    "bias key": ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    "bias id": ("/v1/completions", {"model": "tiny", "prompt": "x", "logit_bias": {"99999": 1}}, None),
    "too many logprobs": ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 50}, None),
    "empty prompt": ("/v1/completions", {"model": "tiny", "prompt": ""}, None),
    "id outside vocab": ("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, None),
    "echo": ("/v1/completions", {"model": "tiny", "prompt": "x", "echo": True}, "echo"),
    "stream_options alone": (
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}},
        "stream_options",
    ),
    "no messages": ("/v1/chat/completions", {"model": "tiny", "messages": []}, "messages"),
    "bad role": ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, None),
    "top_logprobs alone": (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        "top_logprobs",
    ),
    "prompt of a wrong shape": ("/v1/completions", {"model": "tiny", "prompt": {"a": 1}}, "prompt"),
    "mixed prompt list": ("/v1/completions", {"model": "tiny", "prompt": ["a", [1, 2]]}, "prompt"),
    "image content": (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages.0.content",
    ),
    "lone surrogate": ("/v1/completions", {"model": "tiny", "prompt": "\ud800"}, None),
    "prompt too long": ("/v1/completions", {"model": "tiny", "prompt": [5] * (MAX_LENGTH + 1)}, None),
    "max_tokens too large": ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": MAX_LENGTH * 10}, None),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_400(base: str, case: str) -> None:
    path, body, param = BAD_REQUESTS[case]
    for stream in (False, True):
        if stream and "stream_options" in body:
            continue
        data = json.dumps({**body, "stream": True} if stream else body)  # ASCII: a lone surrogate as its escape
        r = httpx.post(base + path, content=data, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400, (case, stream, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["message"] and "Traceback" not in r.text
        if param is not None:
            assert err["param"] == param
    if case in ("prompt too long", "max_tokens too large"):
        assert err["code"] == "context_length_exceeded"


def test_malformed_bodies(base: str, client: openai.OpenAI) -> None:
    for content in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        r = httpx.post(base + "/v1/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 400, content
        assert "error" in r.json()
    r = httpx.post(base + "/v1/completions", content=b"x" * (2 << 20))  # over the 1 MiB default
    assert r.status_code == 413
    r = httpx.get(base + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", max_tokens=-3)
    # the engine still answers
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0).choices[0].text is not None


# ------------------------------------------------------------------------------------------------
# endpoints, auth


def test_models_health_metrics(base: str, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    text = httpx.get(base + "/metrics").text
    for name in (
        "engine_requests_total",
        "engine_prompt_tokens_total",
        "engine_generation_tokens_total",
        "engine_queue_depth",
        "engine_running_rows",
        "engine_time_to_first_token_seconds_bucket",
        "engine_inter_token_latency_seconds_bucket",
    ):
        assert name in text
    assert 'engine_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_api_key(model_dir: Path) -> None:
    eng = engine.Engine(model_dir, max_length=64, max_batch=2, auto_batch=True)
    with live_server(create_app(eng, config=ServerConfig(model_name="tiny", api_key="s3cret"))) as url:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
        assert httpx.get(url + "/health").status_code == 200  # open
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(url + "/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/metrics").status_code == 401
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


# ------------------------------------------------------------------------------------------------
# cancellation, overflow, load


def _slow_steps(eng: engine.Engine, seconds: float) -> None:
    """Make every decode step, batched or single, take at least ``seconds`` (so that a test can act
    mid-request)."""
    state = eng._state
    for name in ("decode_rows", "decode_one_token"):
        step = getattr(state, name)

        def slow(step: Any = step) -> Any:
            time.sleep(seconds)
            return step()

        setattr(state, name, slow)


def _watch_tickets(eng: engine.Engine) -> list[Any]:
    """Record the tickets the server submits."""
    tickets: list[Any] = []
    submit = eng.submit

    def recording(*args: Any, **kwargs: Any) -> Any:
        t = submit(*args, **kwargs)
        tickets.append(t)
        return t

    eng.submit = recording  # type: ignore[method-assign]
    return tickets


def _raw_stream(port: int, body: dict[str, Any]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def test_disconnect_frees_row(model_dir: Path, ref: engine.Engine) -> None:
    """A client that closes its socket mid-stream: its row stops at the next step (no more tokens),
    a request queued behind it takes the row while the other row runs on, and the other row's
    output is exactly its greedy reference."""
    eng = engine.Engine(model_dir, max_length=MAX_LENGTH, max_batch=2, auto_batch=True)
    tickets = _watch_tickets(eng)
    with live_server(create_app(eng)) as url:
        _slow_steps(eng, 0.004)
        port = int(url.rsplit(":", 1)[1])
        sock = _raw_stream(port, {"model": "m", "prompt": "gone", "max_tokens": 120, "temperature": 0, "stream": True})
        seen = b""
        while seen.count(b"data: ") < 4:
            seen += sock.recv(65536)
        other: dict[str, Any] = {}

        def run_other() -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                other["r"] = c.post(
                    "/v1/completions", json={"model": "m", "prompt": "stay", "max_tokens": 100, "temperature": 0}
                )

        t = threading.Thread(target=run_other)
        t.start()
        while len(tickets) < 2:
            time.sleep(0.005)
        sock.close()  # the first client goes away
        gone = tickets[0]
        deadline = time.monotonic() + 10
        while not gone.request.cancelled:
            assert time.monotonic() < deadline, "the server did not cancel the request of a closed socket"
            time.sleep(0.005)
        # a third request takes the freed row and finishes while the second row still runs
        r = httpx.post(
            url + "/v1/completions", json={"model": "m", "prompt": "next", "max_tokens": 5, "temperature": 0}
        )
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == ref.generate("next", 5).text
        assert not tickets[1].done, "the third request waited for a row that was not freed"
        streamed = gone.streamed
        time.sleep(0.05)
        assert gone.streamed == streamed < 120 and not gone.done  # no token after the cancellation
        t.join(60)
        assert other["r"].json()["choices"][0]["text"] == ref.generate("stay", 100).text
        metrics = httpx.get(url + "/metrics").text
        assert "engine_running_rows 0.0" in metrics


def test_plain_request_disconnect_cancels(model_dir: Path) -> None:
    """A non-streamed request whose client gives up is cancelled too."""
    eng = engine.Engine(model_dir, max_length=MAX_LENGTH, max_batch=2, auto_batch=True)
    tickets = _watch_tickets(eng)
    with live_server(create_app(eng)) as url:
        _slow_steps(eng, 0.01)
        no_eos = {str(i): -100 for i in eng.eos_token_ids}  # sampled: no early end by chance
        body = {"model": "m", "prompt": "x", "max_tokens": 140, "logit_bias": no_eos}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=0.3)
        deadline = time.monotonic() + 10
        while not tickets[0].request.cancelled:
            assert time.monotonic() < deadline, "the request of a client that left was not cancelled"
            time.sleep(0.01)
        assert not tickets[0].done


@pytest.mark.slow
def test_queue_overflow_is_429(model_dir: Path, ref: engine.Engine) -> None:
    """Beyond max_batch running + max_queue waiting, requests are refused with 429 and Retry-After;
    the admitted ones all complete correctly."""
    eng = engine.Engine(model_dir, max_length=MAX_LENGTH, max_batch=2, auto_batch=True)
    with live_server(create_app(eng, config=ServerConfig(max_queue=1))) as url:
        _slow_steps(eng, 0.005)
        body = {"model": "m", "prompt": "q", "max_tokens": 40, "temperature": 0}
        results: list[httpx.Response] = []

        def one() -> None:
            results.append(httpx.post(url + "/v1/completions", json=body, timeout=60))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) >= 3 and 429 in codes and set(codes) <= {200, 429}
        want = ref.generate("q", 40).text
        for r in results:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
            else:
                assert r.json()["choices"][0]["text"] == want
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200


@pytest.mark.slow
def test_load_64_streaming_clients(base: str, ref: engine.Engine) -> None:
    """64 concurrent streaming clients, 128 requests of 8 prompts: every stream complete, correct and
    ended with [DONE]."""
    prompts = [f"load {i}" for i in range(8)]
    want = {p: ref.generate(p, 16).text for p in prompts}

    async def main() -> list[tuple[str, str, list[Any]]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
            todo = iter(range(128))
            out: list[tuple[str, str, list[Any]]] = []

            async def worker() -> None:
                for i in todo:
                    p = prompts[i % len(prompts)]
                    body = {"model": "tiny", "prompt": p, "max_tokens": 16, "temperature": 0, "stream": True}
                    r = await c.post("/v1/completions", json=body)
                    assert r.status_code in (200, 429), r.text
                    while r.status_code == 429:  # the queue (64 + 4 rows) can fill: retry as told
                        await asyncio.sleep(float(r.headers["retry-after"]) / 10)
                        r = await c.post("/v1/completions", json=body)
                    out.append((p, r.text, _sse(r.text)))

            await asyncio.gather(*(worker() for _ in range(64)))
            return out

    results = asyncio.run(main())
    assert len(results) == 128
    for p, raw, events in results:
        assert raw.endswith("data: [DONE]\n\n")
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == want[p]
        assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.slow
def test_cli_serve(model_dir: Path, ref: engine.Engine) -> None:
    """``python -m engine serve`` with an API key, in a subprocess: health, one request, a clean stop."""
    import subprocess
    import sys

    port = _free_port()
    cmd = [sys.executable, "-m", "engine", "serve", "--model", str(model_dir), "--port", str(port)]
    cmd += ["--max-batch", "2", "--max-length", "64", "--api-key", "k", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        r = c.completions.create(model=model_dir.name, prompt="cli", max_tokens=5, temperature=0)
        assert r.choices[0].text == ref.generate("cli", 5).text
        assert r.model == model_dir.name
    finally:
        proc.terminate()
        assert proc.wait(30) in (0, -15)  # uvicorn shuts down, then re-raises the SIGTERM it caught


def test_serialised_server(model_dir: Path, ref: engine.Engine) -> None:
    """A plain engine (max_batch 1, no auto_batch): one runner thread serves requests one by one,
    with the same answers, streamed or not, and several at once still all answered."""
    eng = engine.Engine(model_dir, max_length=MAX_LENGTH)
    with live_server(create_app(eng)) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        want = ref.generate("serial", 10).text
        assert c.completions.create(model="m", prompt="serial", max_tokens=10, temperature=0).choices[0].text == want
        stream = c.completions.create(model="m", prompt="serial", max_tokens=10, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in stream) == want
        r = c.completions.create(model="m", prompt=["serial", "two"], max_tokens=10, temperature=0, n=2)
        two = ref.generate("two", 10).text
        assert [ch.text for ch in r.choices] == [want, want, two, two]  # prompt by prompt, n each
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="m", prompt="x", max_tokens=MAX_LENGTH * 2)


def test_null_fields_are_defaults(base: str, ref: engine.Engine) -> None:
    """``null`` for an optional field means "not given", as clients that serialise every field send it."""
    body = {"model": "tiny", "prompt": "nulls", "max_tokens": 6, "temperature": 0, "n": None, "stop": None}
    body |= {"logprobs": None, "stream": None, "seed": None, "logit_bias": None, "stream_options": None}
    r = httpx.post(base + "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == ref.generate("nulls", 6).text
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "x", "name": None}], "logprobs": None}
    assert (
        httpx.post(base + "/v1/chat/completions", json={**chat, "max_tokens": 3, "top_logprobs": None}).status_code
        == 200
    )


def test_clients_that_leave_at_once_leak_nothing(model_dir: Path, ref: engine.Engine) -> None:
    """Streams and plain requests whose sockets close right after sending: every admitted slot is
    given back (no 429 afterwards with a queue of 2) and the server answers correctly."""
    eng = engine.Engine(model_dir, max_length=MAX_LENGTH, max_batch=2, auto_batch=True)
    app = create_app(eng, config=ServerConfig(max_queue=2))
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        for i in range(24):
            body = {"model": "m", "prompt": f"bye {i}", "max_tokens": 100, "stream": i % 2 == 0}
            _raw_stream(port, body).close()
        state = app.state.server
        deadline = time.monotonic() + 20
        while state.inflight:
            assert time.monotonic() < deadline, f"{state.inflight} slots never given back"
            time.sleep(0.02)
        body = {"model": "m", "prompt": "after", "max_tokens": 5, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref.generate("after", 5).text
