"""Device check for concat / combined-KV models on CUDA: engines created, run and freed in a loop.

    python -m perf.cuda_concat                                   # 100 cycles per model, provider cuda
    python -m perf.cuda_concat --provider cpu --cycles 5         # dry run of this script, any machine
    python -m perf.cuda_concat --model ../shared/models/tiny-llama-fp16 --model ../shared/models/tiny-gpt2-fp32

Why: on an H100 (onnxruntime-gpu 1.31) a CUDA engine of a growing-KV model gave the CPU engine's
tokens, but freeing it aborted the process; engine/cuda/runtime.py refuses such models on CUDA
(``REFUSE_GROWING_KV``) until this check passes. The likely fix (DeviceStepState.release() clears
the binding, so ORT-allocated presents go back to the arena before the session is destroyed) has
not run on a GPU.

For each model (the synthetic concat fp16 and fp32 models, plus ``--model`` folders) a child
process turns the refusal off, then ``--cycles`` times: Engine(provider) -> generate 8 greedy tokens
-> compare with the CPU engine's -> close() (every 4th cycle: dropped without close(), left to the
garbage collector) -> gc. The child prints one line per cycle, so an abort is reported with the
cycle it hit and its signal. Exit 1 when a child does not finish all cycles or a token differs.
JSON in ``--out`` (default perf/results/).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

from .common import RESULTS_DIR, host_name

MODELS_DIR = Path(__file__).resolve().parent / "models"
PROMPT = [1, 17, 33, 250, 101, 7]


def synthetic_models() -> list[Path]:
    """The synthetic concat-layout models (fp16, fp32), built once into perf/models/."""
    from engine.testing.synthetic import SyntheticSpec, cached_model

    return [
        cached_model(SyntheticSpec(layout="concat", dtype=dtype, seed=seed), MODELS_DIR)
        for dtype, seed in (("float16", 4), ("float32", 3))
    ]


def child(model_dir: str, provider: str, cycles: int) -> int:
    """Run in the child process: the cycles, one line each; returns the exit status."""
    import gc

    import engine
    from engine.cuda import runtime

    runtime.REFUSE_GROWING_KV = False  # the check itself: this process may abort
    want = engine.Engine(model_dir, max_length=64, warmup=False)
    want.eos_token_ids = frozenset()
    ref = want.generate(PROMPT, max_new_tokens=8).token_ids
    want.close()
    print(f"layout {want.spec.layout.value}, kv {want.spec.kv_dtype}, reference {ref}", flush=True)
    bad = 0
    for i in range(cycles):
        eng = engine.Engine(model_dir, provider=provider, max_length=64, warmup=False)
        eng.eos_token_ids = frozenset()
        got = eng.generate(PROMPT, max_new_tokens=8).token_ids
        if got != ref:
            bad += 1
            print(f"cycle {i}: tokens {got} differ from the CPU engine's {ref}", flush=True)
        if i % 4 != 3:
            eng.close()
        del eng
        gc.collect()
        print(f"cycle {i} ok", flush=True)
    print("done", flush=True)
    return 1 if bad else 0


def check(model_dir: Path, provider: str, cycles: int, timeout: float) -> dict:
    """One model's cycles in a child process; what it reached."""
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "perf.cuda_concat", "--child", str(model_dir), "--provider", provider]
    try:
        proc = subprocess.run([*cmd, "--cycles", str(cycles)], capture_output=True, text=True, timeout=timeout)
        out, err, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, code = f"timed out after {timeout:.0f} s", None
    lines = out.splitlines()
    done = sum(1 for line in lines if line.endswith(" ok"))
    return {
        "model": model_dir.name,
        "provider": provider,
        "cycles": cycles,
        "cycles_done": done,
        "finished": "done" in lines,
        "returncode": code,  # negative: killed by that signal (-6: SIGABRT)
        "seconds": round(time.perf_counter() - t, 1),
        "first_line": lines[0] if lines else "",
        "token_mismatches": [line for line in lines if "differ" in line][:5],
        "stderr_tail": err[-2000:],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.cuda_concat", description=__doc__.split("\n\n")[0])
    p.add_argument("--provider", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run of the script")
    p.add_argument("--cycles", type=int, default=100)
    p.add_argument("--model", action="append", default=[], help="another model folder (repeatable)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per model")
    p.add_argument("--out", default=None, help="folder for the JSON (default perf/results/)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.provider, args.cycles)
    models = synthetic_models() + [Path(m) for m in args.model]
    results = []
    for m in models:
        r = check(m, args.provider, args.cycles, args.timeout)
        results.append(r)
        ok = r["finished"] and r["returncode"] == 0
        print(
            f"{r['model']} ({r['first_line']}): {r['cycles_done']}/{r['cycles']} cycles on {r['provider']}, "
            f"exit {r['returncode']}, {r['seconds']} s -> {'ok' if ok else 'FAILED'}",
            flush=True,
        )
        if not ok:
            print(r["stderr_tail"][-800:], flush=True)
    out_dir = Path(args.out) if args.out else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"cuda-concat-{args.provider}-{dt.datetime.now():%Y%m%d-%H%M%S}-{host_name()}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n", encoding="utf-8")
    print(f"results: {out}")
    passed = all(r["finished"] and r["returncode"] == 0 for r in results)
    print("all engines created, run and freed" if passed else "FAILED: see above")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
