"""A soak of many mixed requests on one Engine, watching the process's resident memory.

Used by ``make perf`` (a figure) and tests/test_soak.py (a bound).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engine.providers import proc_kib_field


def rss_bytes() -> int:
    """Resident set size of this process now (VmRSS; 0 where /proc is missing)."""
    return proc_kib_field("/proc/self/status", "VmRSS") or 0


def rss_soak(model_dir: str | os.PathLike[str] | Path, tokens: int = 10_000, threads: int | None = None) -> dict:
    """New tokens over many mixed requests on one Engine; RSS after warm-up, after each request.

    Returns the figures: tokens, requests, RSS after the warm-up, at the end, the maximum, and the
    growth from the warm-up to the end and to the maximum (bytes)."""
    from engine import Engine

    eng = Engine(model_dir, max_length=256, max_batch=4, threads=threads)
    vocab = eng.spec.vocab_size
    rng = np.random.default_rng(0)

    def request(i: int) -> int:
        p = rng.integers(3, vocab, int(rng.integers(2, 40))).tolist()
        n = int(rng.integers(10, 120))
        kind = i % 4
        if kind == 0:
            return len(eng.generate(p, max_new_tokens=n).token_ids)
        if kind == 1:
            return sum(1 for _ in eng.stream(p, max_new_tokens=n, do_sample=True, seed=i, top_p=0.9))
        if kind == 2:
            rows = [p, p[: max(1, len(p) // 2)], rng.integers(3, vocab, 7).tolist()]
            return sum(len(r.token_ids) for r in eng.generate(rows, max_new_tokens=n // 2))
        return len(eng.generate(p, max_new_tokens=n, do_sample=True, seed=i, logprobs=2).token_ids)

    for i in range(8):  # warm-up: every kind twice (ORT arenas, the batch's mask views)
        request(i)
    start = rss_bytes()
    peak, done, count = start, 0, 0
    while done < tokens:
        done += request(count)
        count += 1
        peak = max(peak, rss_bytes())
    end = rss_bytes()
    return {
        "tokens": done,
        "requests": count,
        "rss_start_bytes": start,
        "rss_end_bytes": end,
        "rss_max_bytes": peak,
        "growth_bytes": end - start,
        "max_growth_bytes": peak - start,
    }
