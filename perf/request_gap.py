"""Whole-request time, engine against onnxruntime-genai, interleaved in one process.

    .venv/bin/python -m perf.request_gap --model ../shared/models/stories260k --cases 16x64,16x400,128x64

Each case (``PROMPTxNEW``) runs one warm-up request per engine, then ``--reps`` rounds in which
each engine runs the same greedy request once, alternately, so that the machine's drift hits
both alike. Whole-request time is the wall time of the runner's call (genai: its Generator's
creation included, as a service pays it per request); TTFT and decode tok/s are each engine's
own figures. Printed: medians and the speed ratio engine/genai (> 1: the engine is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from engine.config import load_model_spec

from .common import EngineRunner, GenaiRunner, genai_available, prompt_ids


def main(argv: list[str] | None = None) -> int:
    """Run the cases and print one line per case."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a genai model folder")
    p.add_argument("--cases", default="16x64,16x400,128x64", help="PROMPTxNEW,... (default %(default)s)")
    p.add_argument("--reps", type=int, default=15, help="alternating rounds per case (default 15)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-length", type=int, default=512, help="the engine's max_length (default 512)")
    args = p.parse_args(argv)
    if not genai_available():
        print("onnxruntime-genai is not installed: nothing to compare with")
        return 1
    model = Path(args.model)
    vocab = load_model_spec(model).vocab_size
    runners = {
        "engine": EngineRunner(model, "cpu", args.max_length, threads=args.threads),
        "genai": GenaiRunner(model, "cpu", args.threads),
    }
    for case in args.cases.split(","):
        prompt, new = (int(x) for x in case.split("x"))
        ids = prompt_ids(prompt, vocab)
        for r in runners.values():
            r.run(ids, new)
        whole: dict[str, list[float]] = {k: [] for k in runners}
        ttft: dict[str, list[float]] = {k: [] for k in runners}
        decode: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(args.reps):
            for name, r in runners.items():
                t0 = time.perf_counter()
                s = r.run(ids, new)
                whole[name].append(time.perf_counter() - t0)
                ttft[name].append(s.ttft_s)
                decode[name].append(s.decode_tokens_per_s)
        med = {k: statistics.median(v) for k, v in whole.items()}
        print(
            f"prompt {prompt} new {new}: whole ms engine {med['engine'] * 1e3:.2f} genai {med['genai'] * 1e3:.2f} "
            f"(engine/genai speed {med['genai'] / med['engine']:.3f}); TTFT ms "
            f"{statistics.median(ttft['engine']) * 1e3:.2f} / {statistics.median(ttft['genai']) * 1e3:.2f}; "
            f"decode tok/s {statistics.median(decode['engine']):.0f} / {statistics.median(decode['genai']):.0f}"
        )
    prefill_and_python(runners, vocab, args.reps * 20)
    for r in runners.values():
        r.close()
    return 0


def prefill_and_python(runners: dict, vocab: int, reps: int) -> None:
    """The prompt's forward pass alone (16 tokens; the engine's ``StepState.prefill`` against
    genai's ``append_tokens``, alternating), and the engine's Python per request: a 1-token
    ``generate()`` with the ORT run replaced by a no-op (what remains is request checks, sampler
    reset, loop and result)."""
    eng, gen = runners["engine"].eng, runners["genai"]
    ids = prompt_ids(16, vocab)
    times: dict[str, list[float]] = {"engine": [], "genai": []}
    for _ in range(reps):
        t0 = time.perf_counter()
        eng._state.prefill(ids[None, :])
        times["engine"].append(time.perf_counter() - t0)
        g = gen._generator(16, 4)
        t0 = time.perf_counter()
        g.append_tokens(ids.astype("int32"))
        times["genai"].append(time.perf_counter() - t0)
        del g
    state = eng._state
    run_prompt = state._run_prompt
    state._run_prompt = lambda *a, **k: None  # Python only: no ORT run
    try:
        for _ in range(50):
            eng.generate(ids, max_new_tokens=1)
        py = []
        for _ in range(reps):
            t0 = time.perf_counter()
            eng.generate(ids, max_new_tokens=1)
            py.append(time.perf_counter() - t0)
    finally:
        state._run_prompt = run_prompt
    print(
        f"prefill of 16 tokens, median of {reps} alternating: "
        f"engine {statistics.median(times['engine']) * 1e6:.0f} us, "
        f"genai append_tokens {statistics.median(times['genai']) * 1e6:.0f} us; engine Python per request "
        f"(generate of 1 token, ORT run stubbed): {statistics.median(py) * 1e6:.0f} us"
    )


if __name__ == "__main__":
    raise SystemExit(main())
