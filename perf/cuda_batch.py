"""Batches and concurrent clients on CUDA (or the CPU), engine vs onnxruntime-genai in the same run.

    python -m perf.cuda_batch                                       # the GPU run of perf/device_run.sh
    python -m perf.cuda_batch --provider cpu --layers 1 --vocab 512 --batches 1,2 --clients 2 --new 8 --reps 1
                                                                    # dry run of this script, any machine

On the synthetic Phi-4-mini-shaped float16 INT4 model (``phi4_mini_spec(layers, vocab, dtype="float16")``,
built once into perf/models/):

1. Batch sweep (perf.batch.run_batches): for each batch size B, B different prompts decode ``--new``
   tokens each (EOS off) on one Engine with ``max_batch`` = the largest B and on onnxruntime-genai
   with ``batch_size`` = B, interleaved; decode tok/s of all rows, x batch 1 (same repetition),
   engine / genai, whether every row equals its batch-1 run and genai's rows.
2. Concurrent clients: C threads each send one greedy request at once to an Engine that serialises
   them, to one with ``auto_batch=True`` (max_batch = C: continuous batching, requests join between
   steps), and all C to onnxruntime-genai's continuous-batching ``og.Engine`` (engine.dynamic_batching
   with max_batch_size = C) where it starts; tok/s = all new tokens / wall time, x serialised (same
   repetition), and whether every auto_batch / genai result equals the serialised one.
3. Checks (exit 1 when one fails): batch rows equal their batch-1 runs and genai's rows; auto_batch
   results equal the serialised ones. Targets (reported, exit 1 with ``--strict``): batch 8 >= 5x batch 1 decode tok/s;
   the most clients through auto_batch >= 4x serialised.

Results: markdown on stdout, JSON and a PNG (tok/s against batch size and clients, one line per
engine and provider) in ``--out`` (default perf/results/). ``--providers cpu,cuda`` runs both in
turn (the CPU vs CUDA batch plot).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .batch import BatchRow, batch_prompts, batch_table, genai_batch, run_batches
from .common import RESULTS_DIR, GenaiRunner, genai_available, host_name

MODELS_DIR = Path(__file__).resolve().parent / "models"


@dataclass
class ClientRow:
    """One (provider, engine mode, clients) point, medians over repetitions."""

    provider: str
    mode: str  # "serialised" | "auto_batch" | "genai engine" | "genai batch"
    clients: int
    prompt: int
    new: int
    reps: int
    tok_s: float
    latency_ms: float
    x_serialised: float | None = None
    equal_serialised: bool | None = None  # every request's tokens equal the serialised engine's
    raw: dict = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m perf.cuda_batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--providers", default="cuda", help="cuda, cpu or cpu,cuda (default cuda)")
    p.add_argument("--provider", dest="providers", help="alias of --providers")
    p.add_argument("--layers", type=int, default=32, help="layers of the synthetic Phi-4-mini (default 32)")
    p.add_argument("--vocab", type=int, default=200064, help="its vocabulary (default 200064)")
    p.add_argument("--batches", default="1,8,32", help="batch sizes (default 1,8,32)")
    p.add_argument("--clients", default="8,32", help="concurrent clients (default 8,32; empty: skip)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per row / request")
    p.add_argument("--new", type=int, default=64, help="new tokens per row / request (EOS off)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-genai", action="store_true", help="skip onnxruntime-genai even when it imports")
    p.add_argument("--strict", action="store_true", help="exit 1 when a speed target is missed too")
    p.add_argument("--out", default=None, help="folder for the JSON and the plot (default perf/results/)")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_model(layers: int, vocab: int, context: int) -> Path:
    """The float16 Phi-4-mini-shaped INT4 model (built once, cached by its spec)."""
    from engine.testing.synthetic import cached_model, phi4_mini_spec

    t = time.perf_counter()
    spec = phi4_mini_spec(layers=layers, vocab=vocab, context_length=context, quant="int4", dtype="float16")
    path = cached_model(spec, MODELS_DIR)
    print(f"model {path.name} ready in {time.perf_counter() - t:.1f} s", flush=True)
    return path


def _genai_engine(model_dir: Path, provider: str, clients: int, length: int):
    """onnxruntime-genai's continuous-batching Engine (engine.dynamic_batching) for ``clients`` requests."""
    runner = GenaiRunner(model_dir, provider, 1)
    og = runner.og
    cfg = og.Config(str(runner.tmp))
    blocks = clients * (length // 16 + 2)
    cfg.overlay(
        json.dumps(
            {"engine": {"dynamic_batching": {"max_batch_size": clients, "num_blocks": blocks, "block_size": 16}}}
        )
    )
    model = og.Model(cfg)
    return runner, og.Engine(model)


def genai_engine_round(og, eng, prompts: np.ndarray, new: int) -> tuple[float, list[float], list[list[int]]]:
    """All rows of ``prompts`` submitted at once to a genai Engine, greedy, exactly ``new`` tokens each."""
    buf = eng.create_event_buffer(4 * len(prompts) + 16)
    t0 = time.perf_counter()
    reqs = []
    for row in prompts:
        req = eng.create_request()
        opts = og.TurnOptions(req)
        opts.set_do_sample(False)
        opts.set_max_generated_tokens(new)
        opts.set_min_generated_tokens(new)
        req.begin_turn(row.astype(np.int32), opts)
        reqs.append(req)
    index = {id(r): i for i, r in enumerate(reqs)}
    tokens: list[list[int]] = [[] for _ in reqs]
    done = [0.0] * len(reqs)
    while eng.has_pending_requests():
        for ev in eng.run(buf):
            i = index.get(id(ev.request))
            if i is None:  # the binding may hand back another wrapper of the same request
                i = next(k for k, r in enumerate(reqs) if r == ev.request)
            if ev.token is not None:  # other events (a request's end alone) carry no token
                tokens[i].append(int(ev.token))
            if int(ev.finish_reason) != 0:
                done[i] = time.perf_counter() - t0
    wall = time.perf_counter() - t0
    for r in reqs:
        r.close()
    return sum(len(t) for t in tokens) / wall, done, tokens


def run_clients(
    model_dir: Path,
    provider: str,
    clients: int,
    prompt: int,
    new: int,
    reps: int,
    genai: bool,
    failures: list[str],
    notes: list[str],
) -> list[ClientRow]:
    """``clients`` threads, one greedy request each, sent at once: serialised engine, auto_batch engine,
    genai's continuous-batching Engine (where it takes the model) and genai with all clients as one
    static batch; alternated for ``reps`` repetitions after a warm-up."""
    from engine import Engine

    engines = {
        "serialised": Engine(model_dir, provider=provider, max_length=prompt + new, max_batch=1),
        "auto_batch": Engine(model_dir, provider=provider, max_length=prompt + new, max_batch=clients, auto_batch=True),
    }
    for eng in engines.values():
        eng.eos_token_ids = frozenset()
    grid = batch_prompts(clients, prompt, engines["serialised"].spec.vocab_size, seed=7)

    def engine_round(eng) -> tuple[float, list[float], list[list[int]]]:
        gate = threading.Barrier(clients)

        def client(i: int):
            gate.wait()
            r = eng.generate(grid[i], max_new_tokens=new)
            return r.stats.total_s, r.token_ids

        t = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            out = list(pool.map(client, range(clients)))
        wall = time.perf_counter() - t
        return clients * new / wall, [o[0] for o in out], [o[1] for o in out]

    rounds = {mode: (lambda e=eng: engine_round(e)) for mode, eng in engines.items()}
    runners = []
    optional = {"genai engine", "genai batch"}  # genai's problems are notes: the engine's figures stand alone
    if genai:
        try:
            runner, g_eng = _genai_engine(model_dir, provider, clients, prompt + new)
            runners.append(runner)
            rounds["genai engine"] = lambda: genai_engine_round(runner.og, g_eng, grid, new)
        except Exception as e:  # report it, the other rounds still run
            notes.append(f"genai engine ({clients} clients, {provider}): could not start ({type(e).__name__}: {e})")
        try:
            batch_runner = GenaiRunner(model_dir, provider, engines["serialised"].threads)
            runners.append(batch_runner)

            def genai_static() -> tuple[float, list[float], list[list[int]]]:
                t = time.perf_counter()
                s = genai_batch(batch_runner, grid, new)  # all clients as one static batch
                wall = time.perf_counter() - t
                return clients * new / wall, [wall] * clients, s.tokens

            rounds["genai batch"] = genai_static
        except Exception as e:  # report it, the other rounds still run
            notes.append(f"genai batch ({clients} clients, {provider}): could not start ({type(e).__name__}: {e})")
    samples: dict[str, list[tuple[float, list[float], list[list[int]]]]] = {m: [] for m in rounds}
    for rep in range(-1, reps):  # -1: warm-up
        for mode, fn in list(rounds.items()):
            try:
                s = fn()
            except Exception as e:  # report it, the others still run
                (notes if mode in optional else failures).append(
                    f"{mode} ({clients} clients, {provider}) raised {type(e).__name__}: {e}"
                )
                if mode not in optional:
                    traceback.print_exc()
                del rounds[mode]
                continue
            if rep >= 0:
                samples[mode].append(s)
    rows = []
    base = samples.get("serialised") or []
    for mode, ss in samples.items():
        if not ss:
            continue
        row = ClientRow(
            provider=provider,
            mode=mode,
            clients=clients,
            prompt=prompt,
            new=new,
            reps=len(ss),
            tok_s=statistics.median(s[0] for s in ss),
            latency_ms=1e3 * statistics.median(x for s in ss for x in s[1]),
            raw={"tok_s": [s[0] for s in ss]},
        )
        if base and mode != "serialised":
            row.x_serialised = statistics.median(a[0] / b[0] for a, b in zip(ss, base, strict=False))
            row.equal_serialised = ss[0][2] == base[0][2]
        rows.append(row)
    for eng in engines.values():
        eng.close()
    for runner in runners:
        runner.close()
    return rows


def make_perf_sweep(
    name: str, model_dir: Path, provider: str, *, batches: list[int], clients: int, prompt: int, new: int, reps: int
) -> tuple[list[BatchRow], list[ClientRow], list[str]]:
    """``make perf``'s batch sweep and concurrent clients on ``provider`` (perf/run.py runs it for CUDA):
    batch rows, client rows, notes (failures included)."""
    genai = genai_available()
    if genai and provider == "cuda":
        import onnxruntime_genai as og

        genai = og.is_cuda_available()
    notes: list[str] = []
    failures: list[str] = []
    rows: list[BatchRow] = []
    if len(batches) > 1:
        try:
            rows, b_notes = run_batches(
                name, model_dir, provider, batches=batches, prompt=prompt, new=new, reps=reps, threads=None, genai=genai
            )
            notes += b_notes
        except Exception as e:  # reported; make perf goes on
            failures.append(f"batch sweep on {provider} raised {type(e).__name__}: {e}")
    c_rows = run_clients(model_dir, provider, clients, prompt, new, reps, genai, failures, notes) if clients > 1 else []
    return rows, c_rows, notes + failures


def client_table(rows: list[ClientRow]) -> str:
    """Markdown table of the concurrent-clients rounds."""

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    def yes(x: bool | None) -> str:
        return "-" if x is None else ("yes" if x else "no")

    head = (
        "| provider | mode | clients | prompt | new | tok/s (all clients) | x serialised | median latency ms "
        "| tokens = serialised |\n|---|---|---:|---:|---:|---:|---:|---:|---|\n"
    )
    return head + "\n".join(
        f"| {r.provider} | {r.mode} | {r.clients} | {r.prompt} | {r.new} | {r.tok_s:.1f} | {f(r.x_serialised)} "
        f"| {r.latency_ms:.0f} | {yes(r.equal_serialised)} |"
        for r in rows
    )


def plot(batch_rows: list[BatchRow], client_rows: list[ClientRow], path: Path) -> Path:
    """tok/s against batch size (left) and concurrent clients (right), one line per engine and provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))

    def panel(ax, rows: list, series, x, y, xlabel: str, ylabel: str, title: str) -> None:
        """One line per ``series(row)`` (a (provider, name) pair), ``y`` against ``x``, log-log."""
        for key in dict.fromkeys(series(r) for r in rows):
            sel = sorted((r for r in rows if series(r) == key), key=x)
            ax.plot([x(r) for r in sel], [y(r) for r in sel], marker="o", label=f"{key[1]} ({key[0]})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)

    panel(
        left,
        batch_rows,
        lambda r: (r.provider, r.engine),
        lambda r: r.batch,
        lambda r: r.decode_tok_s,
        "batch size",
        "decode tok/s, all rows (median)",
        "batched decode",
    )
    panel(
        right,
        client_rows,
        lambda r: (r.provider, r.mode),
        lambda r: r.clients,
        lambda r: r.tok_s,
        "concurrent clients",
        "tok/s, all clients (median)",
        "concurrent clients",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    providers = [p for p in args.providers.split(",") if p]
    bad = [p for p in providers if p not in ("cpu", "cuda")]
    if bad:
        raise SystemExit(f"--providers: unknown {bad}; allowed: cpu, cuda")
    batches = sorted(set(_ints(args.batches)) | {1})
    clients = _ints(args.clients)
    model_dir = build_model(args.layers, args.vocab, args.prompt + args.new)
    use_genai = genai_available() and not args.no_genai
    failures: list[str] = []
    misses: list[str] = []
    batch_rows: list[BatchRow] = []
    client_rows: list[ClientRow] = []
    notes: list[str] = []
    for provider in providers:
        genai = use_genai
        if genai and provider == "cuda":
            import onnxruntime_genai as og

            genai = og.is_cuda_available()
            if not genai:
                notes.append("genai: this onnxruntime-genai build has no CUDA (onnxruntime-genai-cuda)")
        t = time.perf_counter()
        try:
            rows, b_notes = run_batches(
                f"phi4mini-int4-L{args.layers}-V{args.vocab}-fp16",
                model_dir,
                provider,
                batches=batches,
                prompt=args.prompt,
                new=args.new,
                reps=args.reps,
                threads=None,
                genai=genai,
            )
            batch_rows += rows
            notes += b_notes
        except Exception as e:  # report it; the clients still run
            failures.append(f"batch sweep on {provider} raised {type(e).__name__}: {e}")
            traceback.print_exc()
        print(f"batch sweep on {provider}: {time.perf_counter() - t:.0f} s", flush=True)
        for c in clients:
            t = time.perf_counter()
            client_rows += run_clients(model_dir, provider, c, args.prompt, args.new, args.reps, genai, failures, notes)
            print(f"{c} clients on {provider}: {time.perf_counter() - t:.0f} s", flush=True)

    for r in batch_rows:
        if r.engine == "engine" and r.rows_equal_alone is False:
            failures.append(f"{r.provider} batch {r.batch}: the engine's rows differ from their batch-1 runs")
        if r.engine == "engine" and r.rows_equal_genai is False:
            failures.append(f"{r.provider} batch {r.batch}: the engine's rows differ from onnxruntime-genai's")
        if r.engine == "engine" and r.batch == 8 and (r.x_b1 or 0) < 5:
            misses.append(f"{r.provider} batch 8 decode is {r.x_b1 or 0:.2f}x batch 1 (target >= 5x)")
    for r in client_rows:
        if r.mode == "auto_batch" and r.equal_serialised is False:
            failures.append(f"{r.provider} {r.clients} clients: auto_batch results differ from the serialised ones")
        if r.mode == "auto_batch" and r.clients == max(clients) and (r.x_serialised or 0) < 4:
            misses.append(
                f"{r.provider} {r.clients} clients: auto_batch {r.x_serialised or 0:.2f}x serialised (target >= 4x)"
            )

    print()
    if batch_rows:
        print(batch_table(batch_rows))
        print()
    if client_rows:
        print(client_table(client_rows))
        print()
    for n in notes:
        print(f"note: {n}")
    out_dir = Path(args.out) if args.out else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"cuda-batch-{'-'.join(providers)}-{dt.datetime.now():%Y%m%d-%H%M%S}-{host_name()}"
    payload = {
        "args": vars(args),
        "batch_rows": [asdict(r) for r in batch_rows],
        "client_rows": [asdict(r) for r in client_rows],
        "notes": notes,
        "failures": failures,
        "target_misses": misses,
    }
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=float) + "\n", encoding="utf-8")
    print(f"results: {stem.with_suffix('.json')}")
    if batch_rows or client_rows:
        try:
            print(f"plot: {plot(batch_rows, client_rows, stem.with_suffix('.png'))}")
        except Exception as e:  # matplotlib missing or failing must not hide the figures
            print(f"plot failed: {type(e).__name__}: {e}")
    for m in misses:
        print(f"target missed: {m}")
    if failures:
        print("\nFAILED:\n" + "\n".join(f"- {f}" for f in failures), file=sys.stderr)
    if failures or (misses and args.strict):
        return 1
    print("all checks passed" + (" (targets: see above)" if misses else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
