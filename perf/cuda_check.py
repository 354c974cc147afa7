"""Device check of ``provider="cuda"``, sized for a session lent a GPU (15 minutes of device time).

    python -m perf.cuda_check                                  # the defaults below
    python -m perf.cuda_check --prompt 128 --new 128 --reps 5 --layers 4 --vocab 32064
    python -m perf.cuda_check --provider cpu --layers 1 --reps 1   # dry run of this script, any machine

1. Environment: onnxruntime and its providers, cupy and the GPU; exits 2 when CUDA is not usable.
2. Model: the synthetic Phi-4-mini-shaped fp16 model ``phi4_mini_spec(layers, vocab, dtype="float16")``
   (INT4 MatMulNBits, GroupQueryAttention), built once into perf/models/ (``cached_model``).
3. Engines, same model and lengths: the engine with CUDA graphs, the engine without, the engine with
   CUDA graphs and no lookahead (each step waits for its ids: ``Engine._lookahead = False``), and
   onnxruntime-genai (CUDA) with and without its own graph capture when ``onnxruntime_genai`` imports.
4. Checks (exit 1 when one fails): greedy tokens of graph vs no-graph identical; genai vs the
   engine identical over the first ``--parity-tokens``; ORT profiles of a decode without graphs, at
   batch 1 and at ``--batch`` rows (the device batch path), have no MemcpyToHost/MemcpyFromHost node
   in any run.
5. Timings: one warm-up request each, then ``--reps`` repetitions interleaved (graph, no graph, genai,
   graph, ...); medians of TTFT, prefill and decode tok/s, as a markdown table on stdout and JSON in
   ``--out`` (default perf/results/), cuda-check-<date>-<host>.json.

A runner that fails to start or raises is recorded as a failure and the others go on, so one run
on a lent GPU reports everything it can.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .common import RESULTS_DIR, EngineRunner, GenaiRunner, Runner, Sample, genai_available, host_name, prompt_ids

MODELS_DIR = Path(__file__).resolve().parent / "models"


@dataclass
class Row:
    """Medians of one runner over the timed repetitions."""

    runner: str
    reps: int
    ttft_ms: float
    prefill_ms: float
    decode_tok_s: float
    first_divergence: int | None  # first index where its tokens differ from the reference runner's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32064)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="new tokens per request (EOS ignored)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--parity-tokens", type=int, default=32, help="tokens genai must match the engine on")
    p.add_argument("--batch", type=int, default=8, help="rows of the batched decode profiled for Memcpy nodes")
    p.add_argument("--no-genai", action="store_true", help="skip onnxruntime-genai even when it imports")
    p.add_argument("--provider", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run of the script")
    p.add_argument("--out", default=None, help="folder for the JSON (default perf/results/)")
    return p.parse_args(argv)


def environment(provider: str) -> dict[str, str]:
    """Versions and the device; raises SystemExit(2) when CUDA is not usable from here."""
    import onnxruntime as ort

    from engine.cuda import import_cupy
    from engine.errors import ProviderError

    env = {"onnxruntime": ort.__version__, "providers": ",".join(ort.get_available_providers()), "gpu": "none"}
    if provider == "cpu":
        return env
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"CUDA is not usable: onnxruntime {ort.__version__} has no CUDAExecutionProvider", file=sys.stderr)
        raise SystemExit(2)
    try:
        cupy = import_cupy()
    except ProviderError as e:
        print(f"CUDA is not usable: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    free, total = cupy.cuda.runtime.memGetInfo()
    env |= {
        "cupy": cupy.__version__,
        "gpu": name,
        "gpu_memory_gib": f"{total / 2**30:.1f}",
        "gpu_free_gib": f"{free / 2**30:.1f}",
    }
    if genai_available():
        import onnxruntime_genai as og

        env["onnxruntime_genai"] = getattr(og, "__version__", "?")
    return env


def build_model(layers: int, vocab: int) -> Path:
    from engine.testing.synthetic import cached_model, phi4_mini_spec

    t = time.perf_counter()
    path = cached_model(phi4_mini_spec(layers=layers, vocab=vocab, dtype="float16"), MODELS_DIR)
    print(f"model {path} ready in {time.perf_counter() - t:.1f} s", flush=True)
    return path


def memcpy_in_decode(
    model_dir: Path, provider: str, ids: np.ndarray, max_length: int, batch: int = 1
) -> list[list[str]]:
    """Memcpy node op types of each decode run of a profiled request (up to 16 tokens) without graphs;
    ``batch`` > 1: a batch of that many rows (``ids`` and shifted copies of it), on the device's batch path."""
    from engine import Engine
    from engine.testing.ort_profile import load_runs

    eng = Engine(
        model_dir,
        provider=provider,
        max_length=max_length,
        max_batch=batch,
        cuda_graph=False,
        profile=True,
        warmup=False,
    )
    eng.eos_token_ids = frozenset()
    trace: Path | None = None
    try:
        new = min(16, max_length - len(ids))
        if batch == 1:
            eng.generate(ids, max_new_tokens=new)
        else:
            eng.generate([np.roll(ids, b) for b in range(batch)], max_new_tokens=new)
        trace = Path(eng.session.end_profiling())
        runs = load_runs(trace)
    finally:  # ORT writes the trace into the working directory: never leave it there
        if trace is None:
            trace = Path(eng.session.end_profiling())
        trace.unlink(missing_ok=True)
    return [r.memcpy_ops for r in runs[1:]]


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (the shorter length when one is a prefix); None when equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _step_sync(runner: EngineRunner) -> EngineRunner:
    """The engine with CUDA graphs, every step waiting for its ids (no lookahead): what the lookahead gains."""
    runner.eng._lookahead = False
    return runner


def make_runners(args: argparse.Namespace, model_dir: Path, max_length: int, failures: list[str]) -> dict[str, Runner]:
    """The runners that could be built (a failure is recorded, and the others still run)."""
    makers = {
        "engine cuda-graph": lambda: EngineRunner(model_dir, args.provider, max_length, cuda_graph=True),
        "engine no-graph": lambda: EngineRunner(model_dir, args.provider, max_length, cuda_graph=False),
        "engine cuda-graph step-sync": lambda: _step_sync(EngineRunner(model_dir, args.provider, max_length)),
    }
    if genai_available() and not args.no_genai:
        makers["genai cuda-graph"] = lambda: GenaiRunner(model_dir, args.provider, 1, {"enable_cuda_graph": "1"})
        makers["genai no-graph"] = lambda: GenaiRunner(model_dir, args.provider, 1, {"enable_cuda_graph": "0"})
    runners: dict[str, Runner] = {}
    for name, make in makers.items():
        try:
            runners[name] = make()
        except Exception as e:  # report every runner's problem in one device call
            failures.append(f"{name}: could not start ({type(e).__name__}: {e})")
            traceback.print_exc()
    return runners


def timed_runs(runners: dict[str, Runner], ids: np.ndarray, args: argparse.Namespace, failures: list[str]):
    """Warm-up, then ``args.reps`` interleaved repetitions; a runner that raises is dropped and recorded."""
    samples: dict[str, list[Sample]] = {name: [] for name in runners}
    live = dict(runners)
    for rep in range(-1, args.reps):  # -1: the warm-up (kernels compiled, graphs captured), not kept
        for name, r in list(live.items()):
            t = time.perf_counter()
            try:
                sample = r.run(ids, args.new)
            except Exception as e:  # report every runner's problem in one device call
                which = "the warm-up" if rep < 0 else f"repetition {rep}"
                failures.append(f"{name}: {which} raised {type(e).__name__}: {e}")
                traceback.print_exc()
                del live[name]
                continue
            if rep < 0:
                print(f"warm-up {name}: {time.perf_counter() - t:.2f} s", flush=True)
            else:
                samples[name].append(sample)
    return {name: ss for name, ss in samples.items() if ss}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment(args.provider)
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    model_dir = build_model(args.layers, args.vocab)
    ids = prompt_ids(args.prompt, args.vocab)
    max_length = args.prompt + args.new  # the same static mask width genai uses for its graph
    provider = args.provider

    failures: list[str] = []
    runners = make_runners(args, model_dir, max_length, failures)
    samples = timed_runs(runners, ids, args, failures)
    ref_name = "engine no-graph" if "engine no-graph" in samples else next(iter(samples), None)
    ref = samples[ref_name][0].tokens if ref_name else []
    rows = []
    for name, ss in samples.items():
        rows.append(
            Row(
                name,
                len(ss),
                1e3 * statistics.median(s.ttft_s for s in ss),
                1e3 * statistics.median(s.prefill_s for s in ss),
                statistics.median(s.decode_tokens_per_s for s in ss),
                first_divergence(ss[0].tokens, ref),
            )
        )
        if any(s.tokens != ss[0].tokens for s in ss):
            failures.append(f"{name}: tokens differ between repetitions")
    if "engine cuda-graph" in samples and "engine no-graph" in samples:
        graph_div = first_divergence(samples["engine cuda-graph"][0].tokens, samples["engine no-graph"][0].tokens)
        if graph_div is not None:
            failures.append(f"engine with CUDA graphs diverges from the engine without at token {graph_div}")
    engine_name = "engine cuda-graph" if "engine cuda-graph" in samples else ref_name
    for genai_name in ("genai cuda-graph", "genai no-graph"):
        if genai_name not in samples or engine_name is None or engine_name.startswith("genai"):
            continue
        genai_div = first_divergence(samples[genai_name][0].tokens, samples[engine_name][0].tokens)
        if genai_div is not None and genai_div < args.parity_tokens:
            failures.append(f"{genai_name} diverges from {engine_name} at token {genai_div} (< {args.parity_tokens})")

    n_copies: dict[int, int] = {}
    for batch in sorted({1, args.batch}):
        try:
            copies = memcpy_in_decode(model_dir, provider, ids, max_length, batch)
            n_copies[batch] = sum(len(c) for c in copies)
            print(
                f"Memcpy nodes in the {len(copies)} profiled decode runs of batch {batch} (no graph): {n_copies[batch]}"
            )
            if n_copies[batch]:
                failures.append(f"batch {batch}: {n_copies[batch]} Memcpy nodes in {len(copies)} runs: {copies[:2]}")
        except Exception as e:  # report every problem in one device call
            failures.append(f"profiled decode of batch {batch} raised {type(e).__name__}: {e}")
            traceback.print_exc()

    title = f"phi4-mini-shaped fp16 int4, {args.layers} layers, vocab {args.vocab}, prompt {args.prompt}"
    print(f"\n### {title}, new {args.new} ({provider}: {env['gpu']}, onnxruntime {env['onnxruntime']})\n")
    print(f"| runner | reps | TTFT ms | prefill ms | decode tok/s | first divergence from {ref_name} |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        div = "none" if row.first_divergence is None else str(row.first_divergence)
        print(
            f"| {row.runner} | {row.reps} | {row.ttft_ms:.2f} | {row.prefill_ms:.2f} | {row.decode_tok_s:.1f} | {div} |"
        )

    by_name = {row.runner: row for row in rows}
    for ours, theirs in (("engine cuda-graph", "genai cuda-graph"), ("engine no-graph", "genai no-graph")):
        if ours in by_name and theirs in by_name and by_name[theirs].decode_tok_s > 0:
            ratio = by_name[ours].decode_tok_s / by_name[theirs].decode_tok_s
            print(f"decode tok/s {ours} / {theirs}: {ratio:.2f}x")

    out_dir = Path(args.out) if args.out else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{provider}-check-{dt.datetime.now():%Y%m%d-%H%M%S}-{host_name()}.json"
    payload = {
        "args": vars(args),
        "env": env,
        "rows": [asdict(r) for r in rows],
        "memcpy_nodes": n_copies,
        "failures": failures,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"\nresults: {out}")
    for r in runners.values():
        r.close()
    if failures:
        print("\nFAILED:\n" + "\n".join(f"- {f}" for f in failures), file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
