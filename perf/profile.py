"""``make profile``: where a decode step's time goes, on the ORT side and on the Python side.

    .venv/bin/python -m perf.profile --layers 4            # synthetic Phi-4-mini INT4 (as make perf)
    .venv/bin/python -m perf.profile --tiny                # stories260k (or its synthetic stand-in)
    .venv/bin/python -m perf.profile --model DIR --prompt 128 --new-tokens 64

Two runs of the same greedy request, each after a warm-up request, on two Engines:

1. ORT's profiler on (``Engine(..., profile=True)``; ``session.end_profiling()`` writes the
   trace): the kernel events (``cat == "Node"``) of the profiled request are grouped by
   ``args.op_name``; the table shows each op type's time per decoded token and its share, for the
   decode steps and for the prefill apart. ``model_run`` time minus the kernels' sum is the time
   ORT spends per run outside kernels.
2. cProfile over the decode loop of ``generate()`` (switched on when the prefill returns) on an
   Engine without the ORT profiler: the Python functions with the most own time per decode step.
   cProfile adds its own cost to every Python call, so these figures rank the Python work;
   ``make perf``'s overhead column measures it without a profiler.

The trace is moved to ``perf/results/<date>-<host>-ort-profile.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import json
import pstats
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from .common import (
    DEFAULT_CONTEXT,
    DEFAULT_VOCAB,
    REPO,
    RESULTS_DIR,
    TINY_BYTES,
    ModelChoice,
    host_name,
    md_table,
    phi4_model,
    prompt_ids,
    tiny_model,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m perf.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="profile this model folder")
    p.add_argument("--tiny", action="store_true", help="profile the tiny model (stories260k) instead")
    p.add_argument("--layers", type=int, default=4, help="layers of the synthetic Phi-4-mini model (default 4)")
    p.add_argument("--vocab", type=int, default=DEFAULT_VOCAB, help=f"its vocabulary (default {DEFAULT_VOCAB})")
    p.add_argument("--prompt", type=int, default=128, help="prompt length in tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens (default 32, or 256 on tiny models)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the engine's choice)")
    p.add_argument("--top", type=int, default=15, help="rows per table (default 15)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the trace goes (default perf/results)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# ORT trace


def load_trace(path: Path) -> list[dict]:
    """Events of an ORT profile JSON (a list, or ``{"traceEvents": [...]}``)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return data["traceEvents"] if isinstance(data, dict) else data


def summarize_trace(events: list[dict], runs: int) -> dict:
    """Group the kernels of the last ``runs`` model runs by op type: the first of them is the
    prefill, the rest are decode steps. Times in µs."""
    model_runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: e["ts"],
    )[-runs:]
    if not model_runs:
        raise ValueError("the trace has no model_run events")
    bounds = [(e["ts"], e["ts"] + e["dur"]) for e in model_runs]
    starts = np.array([b[0] for b in bounds])
    phases = {"prefill": defaultdict(lambda: [0.0, 0]), "decode": defaultdict(lambda: [0.0, 0])}
    kernel_sum = {"prefill": 0.0, "decode": 0.0}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i < 0 or e["ts"] > bounds[i][1]:
            continue  # a warm-up run's kernel
        phase = "prefill" if i == 0 else "decode"
        op = e.get("args", {}).get("op_name", "?")
        acc = phases[phase][op]
        acc[0] += e["dur"]
        acc[1] += 1
        kernel_sum[phase] += e["dur"]
    decode_runs = max(len(model_runs) - 1, 1)
    run_us = {"prefill": model_runs[0]["dur"], "decode": sum(e["dur"] for e in model_runs[1:]) / decode_runs}
    out: dict = {"runs": len(model_runs), "model_run_us": run_us}
    for phase, per in (("prefill", 1), ("decode", decode_runs)):
        total = kernel_sum[phase] or 1.0
        out[phase] = sorted(
            (
                {"op": op, "us_per_run": t / per, "calls_per_run": n / per, "share": t / total}
                for op, (t, n) in phases[phase].items()
            ),
            key=lambda r: -r["us_per_run"],
        )
        out[f"{phase}_kernel_us"] = kernel_sum[phase] / per
    return out


def ort_profile(model: ModelChoice, ids: np.ndarray, n: int, threads: int | None, out_dir: Path) -> dict:
    from engine import Engine

    eng = Engine(model.path, max_length=len(ids) + n, threads=threads, profile=True)
    eng.eos_token_ids = frozenset()  # exactly n tokens
    eng.generate(ids, max_new_tokens=min(n, 4))  # warm-up (in the trace too, excluded below)
    eng.generate(ids, max_new_tokens=n)
    trace = Path(eng.session.end_profiling())
    if not trace.is_absolute():
        trace = Path.cwd() / trace
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / f"{dt.date.today().isoformat()}-{host_name()}-ort-profile.json"
    shutil.move(str(trace), dest)
    # the profiled request made n runs: the prefill, then n - 1 decode steps
    summary = summarize_trace(load_trace(dest), runs=n)
    summary["trace"] = str(dest)
    summary["threads"] = eng.threads
    return summary


# ------------------------------------------------------------------------------------------------
# Python profile


def python_profile(model: ModelChoice, ids: np.ndarray, n: int, threads: int | None, top: int) -> dict:
    from engine import Engine

    eng = Engine(model.path, max_length=len(ids) + n, threads=threads)
    eng.eos_token_ids = frozenset()
    eng.generate(ids, max_new_tokens=n)  # warm-up
    prof = cProfile.Profile()
    st = eng._state
    prefill = st.prefill

    def prefill_then_profile(*a, **kw):
        out = prefill(*a, **kw)
        prof.enable()  # the decode loop only: from the first token's sampling to the request's end
        return out

    st.prefill = prefill_then_profile  # instance attribute shadows the method for this request
    try:
        t = time.perf_counter()
        res = eng.generate(ids, max_new_tokens=n)
        prof.disable()
        wall = time.perf_counter() - t - res.stats.prefill_s
    finally:
        del st.prefill
    steps = n - 1  # decode_one_token calls
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = "" if file == "~" else file.split("site-packages/")[-1]
        if where.startswith(str(REPO)):
            where = str(Path(where).relative_to(REPO))
        rows.append(
            {
                "function": f"{where}:{line}({func})" if where else func,
                "calls_per_token": ncalls / steps,
                "own_us_per_token": tottime / steps * 1e6,
                "cum_us_per_token": cumtime / steps * 1e6,
            }
        )
    rows.sort(key=lambda r: -r["own_us_per_token"])
    return {
        "wall_us_per_token_profiled": wall / steps * 1e6,
        "decode_tokens_per_s_profiled": res.stats.decode_tokens_per_s,
        "functions": rows[:top],
    }


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model:
        model = ModelChoice(args.model.name, args.model.resolve())
    elif args.tiny:
        model = tiny_model()
    else:
        print(f"synthetic Phi-4-mini INT4, {args.layers} layers, vocab {args.vocab} ...", file=sys.stderr)
        model = phi4_model(args.layers, args.vocab, DEFAULT_CONTEXT)
    from engine.config import load_model_spec

    spec = load_model_spec(model.path)
    tiny = spec.weight_bytes < TINY_BYTES
    n = args.new_tokens or (256 if tiny else 32)
    prompt = min(args.prompt, spec.context_length - n)
    if prompt < 1:
        raise SystemExit(f"--new-tokens {n} leaves no room for a prompt in context_length {spec.context_length}")
    ids = prompt_ids(prompt, spec.vocab_size)
    print(f"profiling {model.name}: prompt {prompt}, {n} new tokens ...", file=sys.stderr)

    ort_sum = ort_profile(model, ids, n, args.threads, args.out)
    py_sum = python_profile(model, ids, n, args.threads, args.top)

    print(f"\n## ORT ops, {model.name}, {ort_sum['threads']} threads, prompt {prompt}, {n} new tokens\n")
    for phase in ("decode", "prefill"):
        per = "per decode step" if phase == "decode" else "prefill (one run)"
        run_us = ort_sum["model_run_us"][phase]
        kern = ort_sum[f"{phase}_kernel_us"]
        print(
            f"\n{phase}: model_run {run_us:.1f} µs {per}, kernels {kern:.1f} µs, "
            f"outside kernels {run_us - kern:.1f} µs\n"
        )
        rows = [
            [r["op"], f"{r['us_per_run']:.1f}", f"{r['calls_per_run']:.0f}", f"{100 * r['share']:.1f}%"]
            for r in ort_sum[phase][: args.top]
        ]
        print(md_table(["op", "µs per run", "calls per run", "share of kernels"], rows))
    print(f"\nORT trace: {ort_sum['trace']}")

    print(
        f"\n## Python functions by own time per decode step (cProfile over the decode loop; profiled wall "
        f"{py_sum['wall_us_per_token_profiled']:.1f} µs/token)\n"
    )
    rows = [
        [
            f"`{r['function']}`",
            f"{r['calls_per_token']:.2f}",
            f"{r['own_us_per_token']:.2f}",
            f"{r['cum_us_per_token']:.2f}",
        ]
        for r in py_sum["functions"]
    ]
    print(md_table(["function", "calls/token", "own µs/token", "cumulative µs/token"], rows))
    summary_path = Path(ort_sum["trace"]).with_name(Path(ort_sum["trace"]).stem.replace("-ort-", "-") + ".json")
    summary_path.write_text(
        json.dumps(
            {"model": model.name, "prompt": prompt, "new_tokens": n, "ort": ort_sum, "python": py_sum},
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"summary: {summary_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
