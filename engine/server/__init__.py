"""OpenAI-compatible HTTP serving on top of the engine's scheduler (needs the ``serve`` extra).

``create_app(engine)`` builds the FastAPI app (engine/server/app.py); ``python -m engine serve
--model DIR`` runs it under uvicorn; engine/server/ray_serve.py deploys the same app on Ray Serve.
See docs/serving.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app", "serve"]


def serve(
    model_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    max_length: int | None = None,
    threads: int | None = None,
    provider: str = "cpu",
    spinning: bool = False,
    config: ServerConfig | None = None,
    log_level: str = "info",
    engine_options: Mapping[str, Any] | None = None,
) -> None:
    """Load ``model_dir`` (continuous batching when ``max_batch`` >= 2) and serve it with uvicorn
    until interrupted. Binds 127.0.0.1 unless told otherwise. ORT's idle threads do not spin by
    default: the event loop and the clients' sockets need the cores between steps. ``engine_options``:
    more Engine keywords (``speculation``, ``speculation_options``, ``prefix_cache``)."""
    import uvicorn

    from ..generation import Engine

    def load() -> Engine:
        return Engine(
            model_dir,
            provider=provider,
            max_length=max_length,
            threads=threads,
            spinning=spinning,
            max_batch=max_batch,
            auto_batch=max_batch >= 2,
            **dict(engine_options or {}),
        )

    app = create_app(loader=load, config=config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
