"""``make perf``: the engine, the plain session.run loop and onnxruntime-genai side by side.

    .venv/bin/python -m perf.run --layers 4                # the default sweep (see docs/perf.md)
    .venv/bin/python -m perf.run --model DIR --prompts 16,128 --reps 5
    .venv/bin/python -m perf.run --layers 32 --vocab 200064  # full-size synthetic Phi-4-mini

For every model, provider and prompt length, each engine first runs the greedy request of exactly
``new`` tokens once with every step timed (per-token latency percentiles, the time spent outside
``session.run``; it also warms that prompt length), then the engines run it in turn (engine,
plain, genai, engine, plain, genai, ...) for ``--reps`` timed repetitions; the table shows
medians and same-run paired ratios. Results go to stdout (markdown),
``perf/results/<date>-<host>.json`` and PNG plots beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.config import load_model_spec
from engine.providers import available_providers, default_threads
from engine.testing.soak import rss_bytes, rss_soak

from .batch import BatchRow, ConcurrentRow, batch_table, concurrent_table, run_batches, run_concurrent
from .common import (
    DEFAULT_CONTEXT,
    DEFAULT_VOCAB,
    RESULTS_DIR,
    TINY_BYTES,
    EngineRunner,
    GenaiRunner,
    ModelChoice,
    PlainRunner,
    Runner,
    Sample,
    cuda_twin,
    genai_available,
    host_name,
    memory_bandwidth,
    peak_rss_bytes,
    percentiles,
    phi4_model,
    prompt_ids,
    tiny_model,
)

ENGINES = ("engine", "plain", "genai")
CONTENDED = 0.8  # CPU share below which a row is flagged as measured on busy cores
MiB = 1024 * 1024


@dataclass
class Cell:
    """One (prompt length, new tokens) point of the sweep."""

    prompt: int
    new: int


@dataclass
class Row:
    """One table row: a (model, provider, prompt, engine) with medians over the repetitions."""

    model: str
    provider: str
    threads: int
    prompt: int
    new: int
    engine: str
    reps: int
    ttft_ms: float
    prefill_tok_s: float
    decode_tok_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    overhead_us: float | None  # median per-token step wall time minus time inside session.run*
    in_run_us: float | None
    kv_bytes: int
    rss_bytes: int  # resident memory this engine added (load, then growth during its own runs)
    cpu_share: float  # median over reps of process CPU time / (wall x threads); ~1 when uncontended
    weights_gb_s: float  # weight_bytes x decode tok/s
    read_gb_s: float  # bytes actually read per token (embedding table: one row) x decode tok/s
    decode_x_plain: float | None = None  # median over reps of engine / plain decode tok/s
    decode_x_genai: float | None = None
    ttft_x_plain: float | None = None  # median over reps of engine / plain TTFT (< 1: engine faster)
    ttft_x_genai: float | None = None
    tokens_match_plain: bool | None = None
    raw: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# planning


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m perf.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="run this model folder instead of the default two")
    p.add_argument("--models", default="tiny,phi4", help="default models to run: tiny,phi4 (default both)")
    p.add_argument("--layers", type=int, default=4, help="layers of the synthetic Phi-4-mini model (default 4)")
    p.add_argument("--vocab", type=int, default=DEFAULT_VOCAB, help=f"its vocabulary (default {DEFAULT_VOCAB})")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="its context length (default 4096)")
    p.add_argument("--prompts", default="16,128,512,1024", help="prompt lengths in tokens (clipped to context)")
    p.add_argument(
        "--new-tokens",
        type=int,
        default=None,
        help="new tokens per request (default 64, or 400 on tiny models)",
    )
    p.add_argument(
        "--long-new-tokens",
        type=int,
        default=32,
        help="new tokens at prompts >= 512 on non-tiny models when --new-tokens is not given (default 32)",
    )
    p.add_argument("--batch", default="1,2,4,8", help="batch sizes of the batch sweep (default 1,2,4,8; 1: skip it)")
    p.add_argument("--batch-prompt", type=int, default=16, help="prompt length of each batch row (default 16)")
    p.add_argument(
        "--batch-new", type=int, default=None, help="new tokens per batch row (default 32, or 200 on tiny models)"
    )
    p.add_argument(
        "--clients", type=int, default=8, help="concurrent clients of the auto_batch comparison (default 8; 0: skip)"
    )
    p.add_argument("--soak-tokens", type=int, default=10_000, help="tokens of the RSS soak on the tiny model (0: skip)")
    p.add_argument("--providers", default=None, help="cpu,cuda (default: every available one)")
    p.add_argument("--engines", default=",".join(ENGINES), help="engine,plain,genai (default all)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per cell (default 3)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the engine's choice)")
    p.add_argument("--membw-gib", type=float, default=1.0, help="array size of the bandwidth test (0: skip)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default perf/results)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--no-speculation",
        action="store_true",
        help="skip the prompt-lookup and prefix-cache benchmarks (perf/speculation.py)",
    )
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def plan_cells(context: int, tiny: bool, args: argparse.Namespace) -> tuple[list[Cell], list[str]]:
    """Prompt lengths that fit the context, with the new-token count of each; and notes on clipping."""
    cells, notes = [], []
    default_new = 400 if tiny else 64
    for p in _ints(args.prompts):
        n = args.new_tokens or default_new
        if args.new_tokens is None and not tiny and p >= 512 and args.long_new_tokens > 0:
            n = min(n, args.long_new_tokens)
        if p + n > context:
            n = context - p
            if n < 2:
                notes.append(f"prompt {p} skipped: context_length is {context}")
                continue
            notes.append(f"prompt {p}: new tokens clipped to {n} by context_length {context}")
        cells.append(Cell(p, n))
    return cells, notes


# ------------------------------------------------------------------------------------------------
# running


def make_runners(
    model: ModelChoice, provider: str, max_length: int, args: argparse.Namespace, wanted: list[str]
) -> tuple[list[Runner], dict[str, int], list[str]]:
    """Load each engine (same threads for all); the RSS each adds; notes on those that failed."""
    runners: list[Runner] = []
    rss: dict[str, int] = {}
    notes: list[str] = []
    spec = load_model_spec(model.path)
    threads = args.threads or default_threads(spec.weight_bytes)
    for name in wanted:
        before = rss_bytes()
        try:
            if name == "engine":
                r: Runner = EngineRunner(model.path, provider, max_length, threads=args.threads)
                threads = r.threads
            elif name == "plain":
                r = PlainRunner(model.path, provider, threads)
            else:
                if not genai_available():
                    notes.append("genai: onnxruntime_genai is not importable (pip install onnxruntime-genai)")
                    continue
                if provider == "cuda":
                    import onnxruntime_genai as og

                    if not og.is_cuda_available():
                        notes.append("genai: this onnxruntime-genai build has no CUDA (onnxruntime-genai-cuda)")
                        continue
                if not spec.has_genai_config:
                    notes.append(f"genai: {model.path} has no genai_config.json")
                    continue
                r = GenaiRunner(model.path, provider, threads)
        except Exception as e:  # any engine's load failure is reported and the others still run
            notes.append(f"{name} on {provider}: failed to load ({type(e).__name__}: {e})")
            continue
        runners.append(r)
        rss[name] = rss_bytes() - before
    return runners, rss, notes


def warm_up(runners: list[Runner], cells: list[Cell], vocab: int, rss: dict[str, int]) -> None:
    """Each engine once at the shortest prompt (first-run costs). Each cell's instrumented requests
    run before its timed repetitions and warm that prompt length (ORT's arenas grow to it)."""
    shortest = min(cells, key=lambda c: c.prompt)
    for r in runners:
        _measured(r, r.run, prompt_ids(shortest.prompt, vocab), min(32, shortest.new), rss)


def _measured(r: Runner, fn, ids: np.ndarray, n: int, rss: dict[str, int]) -> Sample:
    """Run ``fn(ids, n)``; record the CPU share it got and add the resident memory it grew to ``rss``.

    CPU share = process CPU time / (wall x threads). ORT's workers spin, so an uncontended run
    shows ~1.0; well below (0.6) means other processes took the cores during the run and its
    timings are inflated."""
    m = rss_bytes()
    t, c = time.perf_counter(), time.process_time()
    sample = fn(ids, n)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    rss[r.name] = rss.get(r.name, 0) + max(0, rss_bytes() - m)
    sample.extra["cpu_share"] = cpu / (wall * r.threads) if wall > 0 else float("nan")
    return sample


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _paired_ratio(a: list[Sample], b: list[Sample], key: str) -> float | None:
    """Median over repetitions of a[i].key / b[i].key (same repetition, so same noise)."""
    vals = [getattr(x, key) / getattr(y, key) for x, y in zip(a, b, strict=False) if getattr(y, key) > 0]
    return statistics.median(vals) if vals else None


def _match(a: list[int], ref: list[int], eos: set[int]) -> bool:
    """Whether ``a`` equals ``ref`` up to ref's first EOS (genai masks EOS; the others emit it)."""
    cut = next((i for i, t in enumerate(ref) if t in eos), len(ref))
    return a[:cut] == ref[:cut]


def run_model(
    model: ModelChoice, provider: str, args: argparse.Namespace, bar, log: list[str]
) -> tuple[list[Row], dict]:
    """The whole sweep of one model on one provider."""
    spec = load_model_spec(model.path)
    tiny = spec.weight_bytes < TINY_BYTES
    cells, notes = plan_cells(spec.context_length, tiny, args)
    log.extend(f"{model.name}: {n}" for n in notes)
    info = {
        "name": model.name,
        "path": str(model.path),
        "note": model.note,
        "provider": provider,
        "layers": spec.num_layers,
        "vocab": spec.vocab_size,
        "context_length": spec.context_length,
        "weight_bytes": spec.weight_bytes,
        "read_bytes_per_token": spec.step_read_bytes,
        "kv_bytes_per_token": spec.kv_bytes_per_token,
        "cells": [asdict(c) for c in cells],
    }
    if not cells:
        return [], info
    wanted = [e for e in args.engines.split(",") if e]
    max_length = max(c.prompt + c.new for c in cells)
    bar.set_description(f"{model.name}/{provider}: loading")
    t = time.perf_counter()
    runners, rss, load_notes = make_runners(model, provider, max_length, args, wanted)
    info["load_s"] = time.perf_counter() - t
    log.extend(f"{model.name}/{provider}: {n}" for n in load_notes)
    bar.total -= (len(wanted) - len(runners)) * (args.reps + 1) * len(cells)
    bar.refresh()
    if not runners:
        return [], info
    bar.set_description(f"{model.name}/{provider}: warm-up")
    warm_up(runners, cells, spec.vocab_size, rss)
    info["threads"] = runners[0].threads
    info["max_length"] = max_length

    rows: list[Row] = []
    eos = set(spec.eos_token_ids)
    for cell in cells:
        ids = prompt_ids(cell.prompt, spec.vocab_size)
        bar.set_description(f"{model.name}/{provider} p={cell.prompt}")
        inst: dict[str, Sample] = {}
        for r in runners:  # first: per-step timings, and the warm-up of this prompt length
            inst[r.name] = _measured(r, r.run_instrumented, ids, cell.new, rss)
            bar.update(1)
        timed: dict[str, list[Sample]] = {r.name: [] for r in runners}
        for _ in range(args.reps):
            for r in runners:  # interleaved: A, B, C, A, B, C, ...
                timed[r.name].append(_measured(r, r.run, ids, cell.new, rss))
                bar.update(1)
        ref = timed.get("plain", [None])[0]
        for r in runners:
            s = timed[r.name]
            dec = _median([x.decode_tokens_per_s for x in s])
            steps = inst[r.name].step_s
            over = [w - i for w, i in zip(steps, inst[r.name].in_run_s, strict=False)]
            p50, p90, p99 = percentiles(steps)
            row = Row(
                model=model.name,
                provider=provider,
                threads=r.threads,
                prompt=cell.prompt,
                new=cell.new,
                engine=r.name,
                reps=len(s),
                ttft_ms=_median([x.ttft_s for x in s]) * 1e3,
                prefill_tok_s=cell.prompt / _median([x.prefill_s for x in s]),
                decode_tok_s=dec,
                p50_ms=p50 * 1e3,
                p90_ms=p90 * 1e3,
                p99_ms=p99 * 1e3,
                overhead_us=_median(over) * 1e6 if over else None,
                in_run_us=_median(inst[r.name].in_run_s) * 1e6 if over else None,
                kv_bytes=r.kv_bytes(spec, cell.prompt, cell.new),
                rss_bytes=rss.get(r.name, 0),
                cpu_share=_median([x.extra["cpu_share"] for x in s]),
                weights_gb_s=spec.weight_bytes * dec / 1e9,
                read_gb_s=info["read_bytes_per_token"] * dec / 1e9,
                raw={
                    "ttft_s": [x.ttft_s for x in s],
                    "prefill_s": [x.prefill_s for x in s],
                    "decode_tokens_per_s": [x.decode_tokens_per_s for x in s],
                    "new_tokens": [x.new_tokens for x in s],
                    "extra": [x.extra for x in s],
                    "instrumented_decode_tokens_per_s": inst[r.name].decode_tokens_per_s,
                    "step_s": steps,
                    "overhead_mean_us": float(np.mean(over)) * 1e6 if over else None,
                },
            )
            if ref is not None and r.name != "plain":
                row.tokens_match_plain = _match(s[0].tokens, ref.tokens, eos)
                if not row.tokens_match_plain:
                    log.append(f"{model.name}/{provider} p={cell.prompt}: {r.name} greedy tokens differ from plain's")
            if r.name == "engine":
                if "plain" in timed:
                    row.decode_x_plain = _paired_ratio(s, timed["plain"], "decode_tokens_per_s")
                    row.ttft_x_plain = _paired_ratio(s, timed["plain"], "ttft_s")
                if "genai" in timed:
                    row.decode_x_genai = _paired_ratio(s, timed["genai"], "decode_tokens_per_s")
                    row.ttft_x_genai = _paired_ratio(s, timed["genai"], "ttft_s")
            rows.append(row)
    for r in runners:
        r.close()
    del runners
    gc.collect()
    info["peak_rss_bytes"] = peak_rss_bytes()
    return rows, info


# ------------------------------------------------------------------------------------------------
# output


def _f(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _spread(xs: list[float]) -> str:
    """ " ±N%": half the range of the repetitions relative to their median (blank for one repetition)."""
    med = statistics.median(xs) if xs else 0.0
    if len(xs) < 2 or med <= 0:
        return ""
    return f" ±{50 * (max(xs) - min(xs)) / med:.0f}%"


COLUMNS = (
    "model", "EP", "thr", "CPU %", "prompt", "new", "engine", "TTFT ms", "prefill tok/s", "decode tok/s",
    "p50 ms", "p90 ms", "p99 ms", "overhead µs/tok", "KV MiB", "RSS MiB", "GB/s weights", "GB/s read",
    "decode eng/plain", "decode eng/genai", "TTFT eng/plain", "TTFT eng/genai",
)  # fmt: skip


def markdown_table(rows: list[Row]) -> str:
    """The results as one markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        ep = r.provider.replace("ExecutionProvider", "")
        cells = [
            r.model, ep, str(r.threads), f"{100 * r.cpu_share:.0f}", str(r.prompt), str(r.new), r.engine,
            _f(r.ttft_ms) + _spread(r.raw["ttft_s"]), _f(r.prefill_tok_s),
            _f(r.decode_tok_s) + _spread(r.raw["decode_tokens_per_s"]),
            _f(r.p50_ms), _f(r.p90_ms), _f(r.p99_ms), _f(r.overhead_us), _f(r.kv_bytes / MiB),
            _f(r.rss_bytes / MiB), _f(r.weights_gb_s), _f(r.read_gb_s),
            _f(r.decode_x_plain), _f(r.decode_x_genai), _f(r.ttft_x_plain), _f(r.ttft_x_genai),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[Row], stem: Path) -> list[Path]:
    """decode tok/s vs prompt length per engine (one panel per model); CPU vs CUDA when both ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: list[Path] = []
    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        for eng, prov in dict.fromkeys((r.engine, r.provider) for r in rows if r.model == m):
            sel = sorted((r for r in rows if (r.model, r.engine, r.provider) == (m, eng, prov)), key=lambda r: r.prompt)
            xs = [r.prompt for r in sel]
            ys = [r.decode_tok_s for r in sel]
            lo = [y - min(r.raw["decode_tokens_per_s"]) for y, r in zip(ys, sel, strict=True)]
            hi = [max(r.raw["decode_tokens_per_s"]) - y for y, r in zip(ys, sel, strict=True)]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=f"{eng} ({prov})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("decode tok/s (median, bars: min-max of reps)")
        ax.set_title(m, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = stem.with_name(stem.name + "-decode.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out.append(path)

    providers = sorted({r.provider for r in rows})
    if len(providers) > 1:
        fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
        for ax, m in zip(axes[0], models, strict=True):
            keys = list(dict.fromkeys((r.engine, r.prompt) for r in rows if r.model == m))
            x = np.arange(len(keys))
            width = 0.8 / len(providers)
            for k, prov in enumerate(providers):
                vals = [
                    next(
                        (r.decode_tok_s for r in rows if (r.model, r.provider, r.engine, r.prompt) == (m, prov, e, p)),
                        0,
                    )
                    for e, p in keys
                ]
                ax.bar(x + k * width, vals, width, label=prov)
            ax.set_xticks(x + width * (len(providers) - 1) / 2, [f"{e}\np={p}" for e, p in keys], fontsize=7)
            ax.set_ylabel("decode tok/s")
            ax.set_title(f"{m}: CPU vs CUDA", fontsize=9)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = stem.with_name(stem.name + "-cpu-vs-cuda.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def _stem(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = f"{dt.date.today().isoformat()}-{host_name()}"
    stem, k = out_dir / base, 2
    while stem.with_suffix(".json").exists():
        stem, k = out_dir / f"{base}-{k}", k + 1
    return stem


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    t_start = time.perf_counter()
    log: list[str] = []
    batches = sorted(set(_ints(args.batch)) | {1})
    if any(b < 1 for b in batches):
        raise SystemExit(f"--batch: sizes must be >= 1, got {args.batch}")
    have = available_providers()
    providers = [p for p in (args.providers.split(",") if args.providers else have) if p]
    for p in [p for p in providers if p not in have]:
        log.append(f"provider {p}: not available in this onnxruntime build (have {', '.join(have)})")
    providers = [p for p in providers if p in have]

    build_s = 0.0
    if args.model:
        models = [ModelChoice(args.model.name, args.model.resolve(), "--model")]
    else:
        models = []
        for key in [m for m in args.models.split(",") if m]:
            if key == "tiny":
                models.append(tiny_model())
            elif key == "phi4":
                print(
                    f"synthetic Phi-4-mini INT4, {args.layers} layers, vocab {args.vocab} ...",
                    file=sys.stderr,
                )
                t = time.perf_counter()
                models.append(phi4_model(args.layers, args.vocab, args.context))
                build_s = time.perf_counter() - t
            else:
                raise SystemExit(f"--models: unknown model {key!r}; allowed: tiny, phi4")

    wanted = [e for e in args.engines.split(",") if e]
    bad = [e for e in wanted if e not in ENGINES]
    if bad:
        raise SystemExit(f"--engines: unknown {bad}; allowed: {', '.join(ENGINES)}")
    total = 0
    for m in models:
        spec = load_model_spec(m.path)
        cells, _ = plan_cells(spec.context_length, spec.weight_bytes < TINY_BYTES, args)
        total += len(cells) * (args.reps + 1) * len(wanted) * len(providers)
        if len(batches) > 1:
            total += len(batches) * args.reps * (1 + ("genai" in wanted)) * ("cpu" in providers)
        if args.clients > 1:
            total += 2 * args.reps * ("cpu" in providers)

    rows: list[Row] = []
    infos: list[dict] = []
    batch_rows: list[BatchRow] = []
    concurrent_rows: list[ConcurrentRow] = []
    cuda_client_rows: list = []  # perf.cuda_batch.ClientRow: concurrent clients on CUDA
    soak: dict = {}
    with tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True) as bar:
        for m in models:
            for prov in providers:
                target = m if prov == "cpu" or args.model else cuda_twin(m, args)
                if target is None:
                    log.append(f"{m.name} on {prov}: skipped (a float32 GQA model, which the engine refuses on CUDA)")
                    continue
                if target is not m:
                    log.append(f"{m.name} on {prov}: its float16 twin ({target.note}), same shapes and seed")
                r, info = run_model(target, prov, args, bar, log)
                rows.extend(r)
                infos.append(info)
            if len(batches) > 1 and "cpu" in providers and "engine" in wanted:
                bar.set_description(f"{m.name}/cpu: batch sweep")
                tiny = load_model_spec(m.path).weight_bytes < TINY_BYTES
                b_rows, b_notes = run_batches(
                    m.name,
                    m.path,
                    "cpu",
                    batches=batches,
                    prompt=args.batch_prompt,
                    new=args.batch_new or (200 if tiny else 32),
                    reps=args.reps,
                    threads=args.threads,
                    genai="genai" in wanted and genai_available() and load_model_spec(m.path).has_genai_config,
                    progress=bar,
                )
                batch_rows.extend(b_rows)
                log.extend(b_notes)
            if args.clients > 1 and "cpu" in providers and "engine" in wanted:
                bar.set_description(f"{m.name}/cpu: {args.clients} concurrent clients")
                tiny = load_model_spec(m.path).weight_bytes < TINY_BYTES
                concurrent_rows.extend(
                    run_concurrent(
                        m.name,
                        m.path,
                        clients=args.clients,
                        rounds=4 if tiny else 1,
                        prompt=args.batch_prompt,
                        new=args.batch_new or (200 if tiny else 32),
                        reps=args.reps,
                        threads=args.threads,
                        progress=bar,
                    )
                )
            if "cuda" in providers and "engine" in wanted and (len(batches) > 1 or args.clients > 1):
                from .cuda_batch import make_perf_sweep

                twin = m if args.model else cuda_twin(m, args)
                if twin is not None:  # the CUDA batch sweep and clients (perf/cuda_batch.py)
                    bar.set_description(f"{m.name}/cuda: batches and {args.clients} clients")
                    tiny = load_model_spec(twin.path).weight_bytes < TINY_BYTES
                    b_rows, c_rows, c_notes = make_perf_sweep(
                        m.name, twin.path, "cuda", batches=batches, clients=args.clients, prompt=args.batch_prompt,
                        new=args.batch_new or (200 if tiny else 32), reps=args.reps,
                    )  # fmt: skip
                    batch_rows.extend(b_rows)
                    cuda_client_rows.extend(c_rows)
                    log.extend(c_notes)
        if args.soak_tokens > 0 and "engine" in wanted:
            bar.set_description(f"RSS soak ({args.soak_tokens} tokens)")
            soak = rss_soak(tiny_model().path, args.soak_tokens, threads=args.threads)
    speculation: dict = {}
    if not args.no_speculation and "engine" in wanted and "cpu" in providers:
        from .speculation import run_all as run_speculation

        print("speculation and prefix-cache benchmarks (perf/speculation.py) ...", file=sys.stderr)
        speculation = run_speculation(models, new_tiny=64, new=32, reps=args.reps, threads=args.threads)
    # after the models, so that the bandwidth test's arrays do not count in their peak RSS
    print("measuring memory bandwidth ...", file=sys.stderr)
    membw = memory_bandwidth(int(args.membw_gib * (1 << 30))) if args.membw_gib > 0 else {}
    wall_s = time.perf_counter() - t_start

    table = markdown_table(rows)
    print()
    print(table)
    print()
    if membw:
        print(
            f"memory bandwidth (numpy, {membw['bytes'] / 2**30:.3g} GiB array, median of 5): "
            f"read {membw['read_1t']:.1f} GB/s (1 thread), "
            f"{membw['read_nt']:.1f} GB/s ({membw['threads']} threads); "
            f"copy {membw['copy_1t']:.1f} GB/s (read+write, 1 thread)"
        )
    for info in infos:
        if "threads" not in info:
            continue
        print(
            f"{info['name']} ({info['provider']}): weights {info['weight_bytes'] / MiB:.1f} MiB, "
            f"read per token {info['read_bytes_per_token'] / MiB:.1f} MiB, "
            f"KV {info['kv_bytes_per_token']} B/token, "
            f"{info['threads']} threads, process peak RSS so far {info['peak_rss_bytes'] / MiB:.0f} MiB"
        )
    for r in rows:
        if (
            r.engine == "engine"
            and r.overhead_us is not None
            and any(i["name"] == r.model and i["weight_bytes"] < TINY_BYTES for i in infos)
        ):
            print(
                f"engine overhead per token on {r.model} ({r.provider}, prompt {r.prompt}): "
                f"{r.overhead_us:.1f} µs "
                f"(step {r.p50_ms * 1e3:.1f} µs p50, inside run_with_iobinding {r.in_run_us:.1f} µs)"
            )
    contended = [r for r in rows if r.cpu_share < CONTENDED]
    if contended:
        print(
            f"warning: {len(contended)} of {len(rows)} rows got under {100 * CONTENDED:.0f}% of their "
            "threads' CPU time (column CPU %): other processes shared the cores and inflated those "
            "timings (ratios too, where the contention hit one engine's runs more than another's); "
            "rerun when the machine is quiet"
        )
    if batch_rows:
        print()
        print(batch_table(batch_rows))
        print()
    if concurrent_rows:
        print(concurrent_table(concurrent_rows))
        print()
    if cuda_client_rows:
        from .cuda_batch import client_table

        print(client_table(cuda_client_rows))
        print()
    if soak:
        print(
            f"RSS soak ({tiny_model().name}, one Engine, max_batch 4): {soak['tokens']} tokens in "
            f"{soak['requests']} requests (single, streamed, batched, sampled); RSS after warm-up "
            f"{soak['rss_start_bytes'] / MiB:.1f} MiB, at the end {soak['rss_end_bytes'] / MiB:.1f} MiB "
            f"(growth {soak['growth_bytes'] / MiB:+.2f} MiB, max {soak['max_growth_bytes'] / MiB:+.2f} MiB)"
        )
    if speculation:
        print(speculation["speculation_table"])
        print()
        print(speculation["chat_table"])
        print()
        log.extend(speculation["notes"])
    for line in log:
        print(f"note: {line}")
    print(f"wall time {wall_s:.0f} s (synthetic model build {build_s:.0f} s)")

    stem = _stem(args.out)
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": host_name(),
        "command": "python -m perf.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": __import__("os").cpu_count(),
        "onnxruntime": __import__("onnxruntime").__version__,
        "onnxruntime_genai": __import__("onnxruntime_genai").__version__ if genai_available() else None,
        "providers": providers,
        "reps": args.reps,
        "memory_bandwidth_gb_s": membw,
        "wall_s": wall_s,
        "build_s": build_s,
        "notes": log,
    }
    data = {
        "meta": meta,
        "models": infos,
        "rows": [asdict(r) for r in rows],
        "table": table,
        "batch_rows": [asdict(r) for r in batch_rows],
        "batch_table": batch_table(batch_rows) if batch_rows else "",
        "rss_soak": soak,
        "concurrent_rows": [asdict(r) for r in concurrent_rows],
        "cuda_client_rows": [asdict(r) for r in cuda_client_rows],
        "speculation": speculation,
    }
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(data, indent=1, default=float) + "\n", encoding="utf-8")
    print(f"results: {json_path}")
    if rows and not args.no_plots:
        for path in plot(rows, stem):
            print(f"plot: {path}")
    if "cuda" in providers and (batch_rows or cuda_client_rows) and not args.no_plots:
        from .cuda_batch import plot as plot_batches

        print(f"plot: {plot_batches(batch_rows, cuda_client_rows, stem.with_name(stem.name + '-batches.png'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
