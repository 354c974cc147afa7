"""Scale-out on Ray Serve: the same FastAPI app (engine/server/app.py) as a Ray Serve deployment.

Each replica loads its own engine (one auto_batch engine per replica: requests routed to a replica
join its running batch between decode steps, so there is no ``@serve.batch`` on top); Ray Serve
spreads requests over replicas and autoscales them on ongoing requests. Deploy with::

    ray start --head                                   # a local cluster (or join one: --address)
    ENGINE_MODEL=path/to/model serve run engine.server.ray_serve:app

or from Python with ``serve.run(build_app("path/to/model", num_replicas=2))``. See docs/serving.md.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from ray import serve
from ray.serve import Application

from ..generation import Engine
from .app import ServerConfig, create_app


def build_app(
    model_dir: str,
    *,
    max_batch: int = 8,
    max_length: int | None = None,
    threads: int | None = None,
    provider: str = "cpu",
    num_replicas: int | str | None = None,
    autoscaling: dict[str, Any] | None = None,
    num_cpus: float = 2,
    num_gpus: float = 0,
    config: ServerConfig | None = None,
    name: str = "engine",
    engine_options: dict[str, Any] | None = None,
) -> Application:
    """A bound Ray Serve application serving ``model_dir`` with the OpenAI-compatible app.

    ``num_cpus`` / ``num_gpus``: what each replica reserves (one engine per replica; ``threads``
    defaults to ``num_cpus``). Give ``num_replicas`` for a fixed count, or ``autoscaling`` (Ray
    Serve's ``autoscaling_config``; the default scales 1..2 replicas on ongoing requests, a
    replica's target being ``max_batch`` requests). ``engine_options``: more Engine keywords
    (``speculation``, ``speculation_options``, ``prefix_cache``)."""
    cfg = config or ServerConfig(model_name=os.path.basename(os.path.normpath(model_dir)))
    ort_threads = threads if threads is not None else max(1, int(num_cpus))

    def load() -> Engine:  # runs inside each replica, at its start
        return Engine(
            model_dir,
            provider=provider,
            max_length=max_length,
            threads=ort_threads,
            spinning=False,  # the replica's event loop needs the cores between steps
            max_batch=max_batch,
            auto_batch=max_batch >= 2,
            **(engine_options or {}),
        )

    fastapi_app = create_app(loader=load, config=cfg)
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_cpus": num_cpus, **({"num_gpus": num_gpus} if num_gpus else {})},
        "max_ongoing_requests": max_batch + cfg.max_queue,
    }
    if num_replicas is not None:
        options["num_replicas"] = num_replicas
    else:
        options["autoscaling_config"] = autoscaling or {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": max_batch,
        }

    @serve.deployment(**options)
    @serve.ingress(fastapi_app)
    class EngineDeployment:
        """One replica: the app's engine loads at the replica's start (the app's lifespan)."""

        def __init__(self) -> None:
            self.pid = os.getpid()

        async def replica_pid(self) -> int:
            """This replica's process id (lets a test see that two replicas answered)."""
            return self.pid

        async def call(
            self, method: str, path: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
        ) -> tuple[int, Any]:
            """Drive this replica's app in-process through a handle: ``(status, JSON body)``
            (Ray Serve's local testing mode runs no HTTP proxy)."""
            import httpx

            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
                for _ in range(600):  # the engine loads in a thread at the replica's start
                    r = await client.request(method, path, json=body, headers=headers)
                    if r.status_code != 503 or "loading" not in r.text:
                        return r.status_code, r.json()
                    await asyncio.sleep(0.1)
            return r.status_code, r.json()

    return EngineDeployment.bind()


def app_from_env() -> Application:
    """``serve run engine.server.ray_serve:app``: the model folder from ``ENGINE_MODEL``, the
    replica shape from ``ENGINE_REPLICAS`` (default: autoscaling), ``ENGINE_NUM_CPUS``,
    ``ENGINE_NUM_GPUS`` and ``ENGINE_MAX_BATCH``; ``ENGINE_PREFIX_CACHE=1`` turns the prefix cache on
    (per-row reuse and routing of conversations in each replica)."""
    model = os.environ.get("ENGINE_MODEL")
    if not model:
        raise RuntimeError("set ENGINE_MODEL to the model folder to serve")
    replicas = os.environ.get("ENGINE_REPLICAS")
    return build_app(
        model,
        max_batch=int(os.environ.get("ENGINE_MAX_BATCH", "8")),
        num_replicas=int(replicas) if replicas else None,
        num_cpus=float(os.environ.get("ENGINE_NUM_CPUS", "2")),
        num_gpus=float(os.environ.get("ENGINE_NUM_GPUS", "0")),
        engine_options={"prefix_cache": os.environ.get("ENGINE_PREFIX_CACHE", "0") == "1"},
        config=ServerConfig(
            model_name=os.path.basename(os.path.normpath(model)), api_key=os.environ.get("ENGINE_API_KEY") or None
        ),
    )


def __getattr__(name: str) -> Any:
    # ``serve run engine.server.ray_serve:app`` reads the module attribute ``app``; built on access
    # so that importing this module needs no ENGINE_MODEL
    if name == "app":
        return app_from_env()
    raise AttributeError(name)
