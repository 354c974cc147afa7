"""Serving benchmark: ``engine serve`` under 1, 8 and 32 concurrent streaming clients, serialised
(``--max-batch 1``: one request at a time) against continuous batching (``--max-batch 32``).

    python -m perf.serve_bench [--model DIR] [--concurrency 1 8 32] [--requests 64] [--max-tokens 32]
                               [--reps 3] [--out perf/results/serve_bench.json]

The server runs in its own process (``python -m engine serve``), the clients are asyncio httpx
streams in this one, loopback only. Per level: aggregate tokens/s (completion tokens of all
requests over the wall time), p50/p99 time to first token and p50/p99 inter-token latency (gaps
between a stream's chunks), medians over ``--reps`` repetitions; then the batched/serialised
ratio of tokens/s measured in the same run. Default model: the built-in synthetic tiny model
(engine/testing/synthetic.py, seed 0), greedy, every request the same prompt and length (EOS off
is not possible through the API, so the prompt is a fixed token-id list and the synthetic model
rarely ends early; the token counts are reported).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: str, max_batch: int, max_length: int, threads: int | None, spinning: bool = False
) -> tuple[subprocess.Popen, str]:
    """``python -m engine serve`` in a subprocess; returns it and its base URL once /health is 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "engine", "serve", "--model", model, "--port", str(port)]
    cmd += ["--max-batch", str(max_batch), "--max-length", str(max_length), "--log-level", "warning"]
    cmd += ["--max-queue", "1024"]
    if threads:
        cmd += ["--threads", str(threads)]
    if spinning:
        cmd += ["--spinning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not become healthy within 120 s")


async def one_request(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[float, list[float], int]:
    """One streamed completion: (TTFT, inter-token gaps, completion tokens)."""
    t0 = time.perf_counter()
    if not body["stream"]:  # the whole answer: its latency counts as the time to first token
        r = await client.post("/v1/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - t0, [], r.json()["usage"]["completion_tokens"]
    times: list[float] = []
    usage = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            if event["choices"]:
                times.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return times[0] - t0, gaps, usage


async def run_level(base: str, concurrency: int, requests: int, body: dict[str, Any]) -> dict[str, float]:
    """``requests`` streamed requests with ``concurrency`` in flight at a time."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        todo = iter(range(requests))
        results: list[tuple[float, list[float], int]] = []

        async def worker() -> None:
            for _ in todo:
                results.append(await one_request(client, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    gaps = sorted(g for r in results for g in r[1])
    tokens = sum(r[2] for r in results)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {
        "tok_s": tokens / wall,
        "tokens": tokens,
        "wall_s": wall,
        "ttft_p50_ms": pct(ttft, 0.5) * 1e3,
        "ttft_p99_ms": pct(ttft, 0.99) * 1e3,
        "itl_p50_ms": pct(gaps, 0.5) * 1e3,
        "itl_p99_ms": pct(gaps, 0.99) * 1e3,
    }


# the built-in models: "tiny" is the tests' default synthetic spec (a step costs less than the
# server's own per-token work); "small" is wider, so that a decode step dominates, as in real models
SPECS = {
    "tiny": {"seed": 0},
    "small": {
        "layers": 4,
        "hidden": 256,
        "heads": 8,
        "kv_heads": 4,
        "head_size": 32,
        "intermediate": 768,
        "vocab": 1024,
        "context_length": 1024,
        "seed": 0,
    },
}


def default_model(name: str = "small") -> str:
    """The folder of a built-in synthetic model (built once into a cache folder)."""
    from engine.testing.synthetic import SyntheticSpec, cached_model

    cache = os.environ.get("ENGINE_MODEL_CACHE") or Path(tempfile.gettempdir()) / "engine-serve-bench"
    return str(cached_model(SyntheticSpec(**SPECS[name]), cache))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the built-in synthetic --spec)")
    p.add_argument("--spec", choices=sorted(SPECS), default="small", help="built-in synthetic model (default small)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64, help="requests per level (at least the concurrency)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=32, help="--max-batch of the batched server")
    p.add_argument("--threads", type=int, default=None, help="ORT threads of the server")
    p.add_argument("--spinning", action="store_true", help="let the server's idle ORT threads spin")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="streamed requests")
    p.add_argument("--out", default="perf/results/serve_bench.json")
    args = p.parse_args(argv)
    model = args.model or default_model(args.spec)
    body = {
        "model": "bench",
        "prompt": [3 + (i * 7) % 250 for i in range(args.prompt_tokens)],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": args.stream,
    }
    if args.stream:
        body["stream_options"] = {"include_usage": True}
    max_length = args.prompt_tokens + args.max_tokens + 8
    table: dict[str, dict[int, dict[str, float]]] = {}
    for mode, max_batch in (("serialised", 1), ("batched", args.batch)):
        proc, base = start_server(model, max_batch, max_length, args.threads, args.spinning)
        try:
            table[mode] = {}
            for c in args.concurrency:
                n = max(args.requests, c)
                asyncio.run(run_level(base, c, min(n, 2 * c), body))  # warm-up
                reps = [asyncio.run(run_level(base, c, n, body)) for _ in range(args.reps)]
                table[mode][c] = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
                row = table[mode][c]
                ttft = f"TTFT p50 {row['ttft_p50_ms']:7.1f} p99 {row['ttft_p99_ms']:7.1f} ms"
                itl = f"ITL p50 {row['itl_p50_ms']:6.2f} p99 {row['itl_p99_ms']:6.2f} ms"
                print(f"{mode:>10}  c={c:<3} {row['tok_s']:8.0f} tok/s  {ttft}  {itl}", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    head = (
        "| clients | serialised tok/s | batched tok/s | ratio | TTFT p50/p99 ms (batched) | ITL p50/p99 ms (batched) |"
    )
    print("\n" + head)
    print("|---|---|---|---|---|---|")
    for c in args.concurrency:
        s, b = table["serialised"][c], table["batched"][c]
        print(
            f"| {c} | {s['tok_s']:.0f} | {b['tok_s']:.0f} | {b['tok_s'] / s['tok_s']:.2f}x | "
            f"{b['ttft_p50_ms']:.1f} / {b['ttft_p99_ms']:.1f} | {b['itl_p50_ms']:.2f} / {b['itl_p99_ms']:.2f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args) | {"model": model}, "results": table}, indent=2))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
