"""Batch sweep of ``make perf``.

Batch sweep: for each batch size B, B different prompts of the same length decode ``new`` tokens
each (EOS off), on the engine (one Engine with ``max_batch`` = the largest B) and on
onnxruntime-genai (``batch_size`` = B), interleaved for ``reps`` repetitions. Decode throughput is
all rows' tokens after the first over the time from the first token to the last; ``x_b1`` is the
same-repetition ratio against batch 1 of the same engine (median over repetitions).

The RSS soak of ``make perf`` is :func:`engine.testing.soak.rss_soak`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .common import GenaiRunner

MiB = 1024 * 1024


@dataclass
class BatchSample:
    """One batched request: B rows of ``new`` tokens after ``prompt`` tokens each."""

    batch: int
    ttft_s: float
    decode_tokens_per_s: float  # rows x (new - 1) / (last token - first token)
    tokens: list[list[int]] = field(default_factory=list)


@dataclass
class BatchRow:
    """Medians over repetitions for one (model, provider, engine, batch size)."""

    model: str
    provider: str
    engine: str
    batch: int
    prompt: int
    new: int
    reps: int
    ttft_ms: float
    decode_tok_s: float
    x_b1: float | None  # median of decode tok/s / the same repetition's batch-1 tok/s
    x_genai: float | None = None  # engine rows: median of engine / genai at this batch size
    rows_equal_alone: bool | None = None  # every row's tokens equal the engine's batch-1 run of its prompt
    rows_equal_genai: bool | None = None  # engine rows: every row's tokens equal genai's at this batch size
    raw: dict = field(default_factory=dict)


def engine_batch(eng, ids: np.ndarray, n: int) -> BatchSample:
    """``eng.generate`` on the rows of ``ids`` (B, P): B = 1 runs the single-request path."""
    results = [eng.generate(ids[0], max_new_tokens=n)] if ids.shape[0] == 1 else eng.generate(ids, max_new_tokens=n)
    first = max(r.stats.ttft_s for r in results)
    decode = max(r.stats.decode_s for r in results)
    tokens = [r.token_ids for r in results]
    tps = sum(len(x) - 1 for x in tokens) / decode if decode > 0 else 0.0
    return BatchSample(ids.shape[0], first, tps, tokens)


def genai_batch(runner: GenaiRunner, ids: np.ndarray, n: int) -> BatchSample:
    """onnxruntime-genai with ``batch_size`` = rows of ``ids`` (B, P), greedy, exactly n tokens."""
    og = runner.og
    b, p = ids.shape
    params = og.GeneratorParams(runner.model)
    params.set_search_options(max_length=p + n, min_length=p + n, do_sample=False, batch_size=b)
    gen = og.Generator(runner.model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids.astype(np.int32))
    gen.generate_next_token()
    t1 = time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()
    t2 = time.perf_counter()
    tokens = [[int(t) for t in gen.get_sequence(i)[p:]] for i in range(b)]
    del gen
    tps = sum(len(x) - 1 for x in tokens) / (t2 - t1) if t2 > t1 else 0.0
    return BatchSample(b, t1 - t0, tps, tokens)


def batch_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    """(batch, length) int64: a different fixed pseudo-random prompt per row (ids 3.. skip specials)."""
    rng = np.random.default_rng(seed * 1000 + batch * 31 + length)
    return rng.integers(3, vocab, size=(batch, length), dtype=np.int64)


def run_batches(
    model_name: str,
    model_dir: Path,
    provider: str,
    *,
    batches: list[int],
    prompt: int,
    new: int,
    reps: int,
    threads: int | None,
    genai: bool,
    progress=None,
) -> tuple[list[BatchRow], list[str]]:
    """The batch sweep of one model; rows and notes."""
    from engine import Engine

    notes: list[str] = []
    eng = Engine(model_dir, provider=provider, max_length=prompt + new, max_batch=max(batches), threads=threads)
    eng.eos_token_ids = frozenset()  # exactly `new` tokens per row on both engines
    runners = {"engine": lambda ids: engine_batch(eng, ids, new)}
    g = None
    if genai:
        try:
            g = GenaiRunner(model_dir, provider, eng.threads)
            runners["genai"] = lambda ids: genai_batch(g, ids, new)
        except Exception as e:  # genai's load failure is reported and the engine still runs
            notes.append(f"genai batch on {provider}: failed to load ({type(e).__name__}: {e})")
    vocab = eng.spec.vocab_size
    grids = {b: batch_prompts(b, prompt, vocab) for b in batches}
    for fn in runners.values():  # warm-up: every batch size once
        for b in batches:
            fn(grids[b])
    samples: dict[tuple[str, int], list[BatchSample]] = {(e, b): [] for e in runners for b in batches}
    for _ in range(reps):
        for b in batches:
            for name, fn in runners.items():  # interleaved: engine, genai, engine, genai, ...
                samples[name, b].append(fn(grids[b]))
                if progress is not None:
                    progress.update(1)
    # every row of the largest batch against its prompt run alone (the engine's batch-1 path)
    alone = {b: [eng.generate(row, max_new_tokens=new).token_ids for row in grids[b]] for b in batches}
    rows = []
    for name in runners:
        for b in batches:
            s = samples[name, b]
            base = samples[name, batches[0]] if batches[0] == 1 else None
            row = BatchRow(
                model=model_name,
                provider=provider,
                engine=name,
                batch=b,
                prompt=prompt,
                new=new,
                reps=len(s),
                ttft_ms=statistics.median(x.ttft_s for x in s) * 1e3,
                decode_tok_s=statistics.median(x.decode_tokens_per_s for x in s),
                x_b1=_paired(s, base) if base is not None else None,
                rows_equal_alone=s[0].tokens == alone[b],
                raw={"decode_tokens_per_s": [x.decode_tokens_per_s for x in s], "ttft_s": [x.ttft_s for x in s]},
            )
            if name == "engine" and "genai" in runners:
                row.x_genai = _paired(s, samples["genai", b])
                row.rows_equal_genai = s[0].tokens == samples["genai", b][0].tokens
                if not row.rows_equal_genai:
                    notes.append(f"{model_name}/{provider} batch {b}: the engine's rows differ from genai's")
            if not row.rows_equal_alone:
                notes.append(
                    f"{model_name}/{provider} batch {b}: {name}'s rows differ from the engine's batch-1 runs "
                    "(expected on INT4 models: MatMulNBits rounds several-row products differently, docs/api.md)"
                )
            rows.append(row)
    if g is not None:
        g.close()
    return rows, notes


def _paired(a: list[BatchSample], b: list[BatchSample]) -> float | None:
    vals = [x.decode_tokens_per_s / y.decode_tokens_per_s for x, y in zip(a, b, strict=False) if y.decode_tokens_per_s]
    return statistics.median(vals) if vals else None


def batch_table(rows: list[BatchRow]) -> str:
    """Markdown table of the batch sweep."""

    def f(x: float | None, d: int = 2) -> str:
        return "-" if x is None else f"{x:.{d}f}"

    def yes(x: bool | None) -> str:
        return "-" if x is None else ("yes" if x else "no")

    head = (
        "| model | provider | engine | batch | prompt | new | decode tok/s (all rows) | x batch 1 "
        "| engine/genai | TTFT ms | rows = alone | rows = genai |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|\n"
    )
    return head + "\n".join(
        f"| {r.model} | {r.provider} | {r.engine} | {r.batch} | {r.prompt} | {r.new} | {r.decode_tok_s:.1f} "
        f"| {f(r.x_b1)} | {f(r.x_genai)} | {r.ttft_ms:.1f} | {yes(r.rows_equal_alone)} | {yes(r.rows_equal_genai)} |"
        for r in rows
    )


@dataclass
class ConcurrentRow:
    """Concurrent clients on one Engine, requests serialised or coalesced (``auto_batch``)."""

    model: str
    mode: str  # "serialised" | "auto_batch"
    clients: int
    requests: int
    prompt: int
    new: int
    reps: int
    tok_s: float  # all new tokens / wall time of the round, median over repetitions
    latency_ms: float  # median request latency (call to result) over all requests of all repetitions
    x_serialised: float | None = None  # auto_batch rows: paired median of tok/s over the serialised round's


def run_concurrent(
    model_name: str,
    model_dir: Path,
    *,
    clients: int,
    rounds: int,
    prompt: int,
    new: int,
    reps: int,
    threads: int | None,
    progress=None,
) -> list[ConcurrentRow]:
    """``clients`` threads each send ``rounds`` greedy requests one after another, on an Engine that
    serialises them (the default) and on one with ``auto_batch=True`` (max_batch = clients);
    the two rounds alternate for ``reps`` repetitions."""
    from concurrent.futures import ThreadPoolExecutor

    from engine import Engine

    engines = {}
    for mode, auto in (("serialised", False), ("auto_batch", True)):
        eng = Engine(model_dir, max_length=prompt + new, max_batch=clients, auto_batch=auto, threads=threads)
        eng.eos_token_ids = frozenset()
        engines[mode] = eng
    grid = batch_prompts(clients, prompt, engines["serialised"].spec.vocab_size, seed=7)

    def one_round(eng) -> tuple[float, list[float]]:
        def client(i: int) -> list[float]:
            return [eng.generate(grid[i], max_new_tokens=new).stats.total_s for _ in range(rounds)]

        t = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            latencies = [x for xs in pool.map(client, range(clients)) for x in xs]
        return clients * rounds * new / (time.perf_counter() - t), latencies

    for eng in engines.values():
        one_round(eng)  # warm-up
    tok: dict[str, list[float]] = {m: [] for m in engines}
    lat: dict[str, list[float]] = {m: [] for m in engines}
    for _ in range(reps):
        for mode, eng in engines.items():
            t, ls = one_round(eng)
            tok[mode].append(t)
            lat[mode].extend(ls)
            if progress is not None:
                progress.update(1)
    rows = []
    for mode in engines:
        row = ConcurrentRow(
            model=model_name,
            mode=mode,
            clients=clients,
            requests=clients * rounds,
            prompt=prompt,
            new=new,
            reps=reps,
            tok_s=statistics.median(tok[mode]),
            latency_ms=statistics.median(lat[mode]) * 1e3,
        )
        if mode == "auto_batch":
            row.x_serialised = statistics.median(a / b for a, b in zip(tok[mode], tok["serialised"], strict=True))
        rows.append(row)
    return rows


def concurrent_table(rows: list[ConcurrentRow]) -> str:
    """Markdown table of the concurrent-clients runs."""
    head = (
        "| model | mode | clients | requests | prompt | new | tok/s (all clients) | x serialised "
        "| median latency ms |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    return head + "\n".join(
        f"| {r.model} | {r.mode} | {r.clients} | {r.requests} | {r.prompt} | {r.new} | {r.tok_s:.1f} "
        f"| {'-' if r.x_serialised is None else f'{r.x_serialised:.2f}'} | {r.latency_ms:.0f} |"
        for r in rows
    )
