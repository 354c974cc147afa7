"""Interleaved conversations through the auto_batch worker, with and without the prefix cache
(issue 15, part 2: a record per cache row, a request routed to the row holding its prefix):

    .venv/bin/python -m perf.prefix_routing                      # stories260k (or tiny-gqa) and a 4-layer GQA model
    .venv/bin/python -m perf.prefix_routing --conversations 3 --turns 6 --reps 3

``conversations`` conversations take turns (c0 turn 1, c1 turn 1, ..., c0 turn 2, ...); each turn
re-sends its conversation so far (token ids: the previous prompt, the answer, ``--add`` new ids)
to an ``auto_batch=True, max_batch=4`` engine with ``prefix_cache=True`` and to the same engine
without it, alternately. One conversation alone would always find its prefix on row 0; several
interleaved need a row each, which the old single record could not give. Reported per model: the
median TTFT of turns 2.., the median of the paired ratios warm / cold, the share of prompt tokens
reused, and whether every answer equalled the cold engine's.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np

from .common import MODELS_DIR, ModelChoice, table_header, table_row, tiny_model


def _gqa_model() -> ModelChoice:
    from engine.testing.synthetic import SyntheticSpec, cached_model

    spec = SyntheticSpec(layout="gqa", layers=4, hidden=256, heads=8, kv_heads=4, head_size=32, intermediate=768,
                         vocab=2048, context_length=2048, seed=3)  # fmt: skip
    return ModelChoice("gqa-L4-H256", cached_model(spec, MODELS_DIR), "synthetic, fp32")


def run(model: ModelChoice, conversations: int, turns: int, add: int, new: int, reps: int) -> dict[str, object]:
    """One model's row (module docstring)."""
    from engine import Engine

    kw = {"max_length": 512, "max_batch": 4, "auto_batch": True}
    warm, cold = Engine(model.path, prefix_cache=True, **kw), Engine(model.path, **kw)
    warm.eos_token_ids = cold.eos_token_ids = frozenset()
    vocab = warm.spec.vocab_size
    ratios, warm_ms, cold_ms = [], [], []
    reused = total = 0
    equal = True
    try:
        for rep in range(reps):
            rng = np.random.default_rng(rep)
            ids: list[list[int]] = [[] for _ in range(conversations)]
            for turn in range(turns):
                for k in range(conversations):
                    prompt = ids[k] + rng.integers(3, vocab, add).tolist()
                    order = (warm, cold) if (turn + k) % 2 else (cold, warm)
                    res = {id(e): e.generate(prompt, new) for e in order}
                    a, b = res[id(cold)], res[id(warm)]
                    equal &= a.token_ids == b.token_ids
                    if turn:
                        ratios.append(b.stats.ttft_s / a.stats.ttft_s)
                        warm_ms.append(1e3 * b.stats.ttft_s)
                        cold_ms.append(1e3 * a.stats.ttft_s)
                        reused += b.stats.cached_prompt_tokens
                        total += len(prompt)
                    ids[k] = prompt + b.token_ids
    finally:
        warm.close()
        cold.close()
    return {
        "model": model.name,
        "warm_ms": statistics.median(warm_ms),
        "cold_ms": statistics.median(cold_ms),
        "ratio": statistics.median(ratios),
        "reused": reused / max(total, 1),
        "equal": equal,
        "samples": len(ratios),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--add", type=int, default=16, help="new ids per turn")
    ap.add_argument("--new", type=int, default=16, help="answer tokens per turn")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    header = ["model", "turns 2.. TTFT warm ms", "cold ms", "warm / cold (median of pairs)", "reused", "equal"]
    print(table_header(header))
    for model in (tiny_model(), _gqa_model()):
        r = run(model, args.conversations, args.turns, args.add, args.new, args.reps)
        ratio = f"{r['ratio']:.3f} ({r['samples']} pairs)"
        reused = f"{100 * r['reused']:.0f} %"
        cells = [r["model"], f"{r['warm_ms']:.2f}", f"{r['cold_ms']:.2f}", ratio, reused, r["equal"]]
        print(table_row(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
