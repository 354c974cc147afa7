"""The Ray Serve deployment (engine/server/ray_serve.py): local testing mode, and a real local
``serve.run`` of two replicas behind Ray's HTTP proxy. Skipped when Ray Serve is absent (the
``ray`` extra)."""

from __future__ import annotations

import socket
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'engine[ray]')")

import httpx  # noqa: E402 -- after the skips: an optional extra

import engine  # noqa: E402
from engine.server.ray_serve import build_app  # noqa: E402
from engine.testing.synthetic import SyntheticSpec, cached_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(cached_model(SyntheticSpec(layout="gqa", seed=52), tmp_path_factory.mktemp("ray-models")))


def _reference(model_dir: str, prompt: str, n: int) -> str:
    with engine.Engine(model_dir, max_length=64) as eng:
        return eng.generate(prompt, n).text


def test_local_testing_mode(model_dir: str) -> None:
    """The deployment in-process: /health, a greedy completion equal to Engine.generate, a 400."""
    handle = serve.run(build_app(model_dir, num_replicas=1, num_cpus=1, max_length=64), _local_testing_mode=True)
    status, body = handle.call.remote("GET", "/health").result()
    assert (status, body) == (200, {"status": "ok"})
    req = {"model": "m", "prompt": "Hello", "max_tokens": 6, "temperature": 0}
    status, body = handle.call.remote("POST", "/v1/completions", req).result()
    assert status == 200
    assert body["choices"][0]["text"] == _reference(model_dir, "Hello", 6)
    assert body["usage"]["completion_tokens"] == 6
    status, body = handle.call.remote("POST", "/v1/completions", {**req, "bogus": 1}).result()
    assert status == 400 and body["error"]["param"] == "bogus"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_replicas_over_http(model_dir: str) -> None:
    """A real local Ray instance: two replicas behind Ray's HTTP proxy answer the OpenAI API; both
    replicas serve (their pids differ) and every answer equals Engine.generate."""
    import ray

    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(build_app(model_dir, num_replicas=2, num_cpus=1, max_length=64), route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # each replica loads its engine at start
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pids = {handle.replica_pid.remote().result() for _ in range(20)}
        assert len(pids) == 2
        want = _reference(model_dir, "Once", 5)
        with httpx.Client(base_url=base, timeout=60) as client:
            for _ in range(6):
                r = client.post(
                    "/v1/completions", json={"model": "m", "prompt": "Once", "max_tokens": 5, "temperature": 0}
                )
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == want
            r = client.get("/v1/models")
            assert r.status_code == 200 and r.json()["data"][0]["object"] == "model"
    finally:
        serve.shutdown()
        ray.shutdown()
