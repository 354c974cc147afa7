"""Does a verify pass reproduce plain decoding? Greedy requests on the synthetic Phi-4-mini-shaped
INT4 model at several MatMulNBits accuracy levels, plain vs speculative (issue 15):

    .venv/bin/python -m perf.spec_exactness                       # levels 0 and 4, 4 layers, 6 requests
    .venv/bin/python -m perf.spec_exactness --levels 0 1 2 3 4 --requests 12 --new 96

For each level: ``requests`` random prompts; the plain engine's greedy continuation; then the same
request on an engine with ``speculation_options={"exact": False}`` whose drafter proposes that very
continuation (every draft right, so nearly every token comes out of a verify pass). A request
"parts" when its tokens differ from the plain ones; the table gives how many did and where the
first difference came. The default engine (``exact=True``) is checked too: on a level whose
activations are rounded (engine/config.py coarse_activations) it takes plain steps and must equal.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import warnings

import numpy as np

from engine.speculation import SpeculationConfig

from .common import DEFAULT_VOCAB, MODELS_DIR, table_header, table_row
from .speculation import OracleDrafter


def run_level(level: int, layers: int, vocab: int, requests: int, new: int, seed: int) -> dict[str, object]:
    """One accuracy level's row: requests that parted, their first differing positions, drafts kept."""
    from engine import Engine
    from engine.testing.synthetic import cached_model, phi4_mini_spec

    spec = dataclasses.replace(phi4_mini_spec(layers=layers, vocab=vocab), accuracy_level=level)
    model = cached_model(spec, MODELS_DIR)
    plain = Engine(model, max_length=512)
    inexact = Engine(model, max_length=512, speculation="prompt_lookup", speculation_options={"exact": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the default engine says why it takes plain steps
        exact = Engine(model, max_length=512, speculation="prompt_lookup")
    for eng in (plain, inexact, exact):
        eng.eos_token_ids = frozenset()
    rng = np.random.default_rng(seed)
    parted: list[int] = []
    kept = drafted = 0
    exact_ok = True
    for _ in range(requests):
        prompt = rng.integers(3, vocab, 24).tolist()
        want = plain.generate(prompt, new).token_ids
        inexact._ctx.drafter = OracleDrafter(SpeculationConfig(exact=False), len(prompt), want)
        got = inexact.generate(prompt, new)
        kept += got.stats.accepted_tokens
        drafted += got.stats.drafted_tokens
        first = next((i for i, (a, b) in enumerate(zip(want, got.token_ids, strict=True)) if a != b), None)
        if first is not None:
            parted.append(first)
        exact_ok &= exact.generate(prompt, new).token_ids == want
    return {
        "level": level,
        "coarse": plain.spec.coarse_activations or "-",
        "parted": f"{len(parted)} of {requests}",
        "first": ", ".join(map(str, parted)) or "-",
        "kept": f"{kept}/{drafted}",
        "default_equal": exact_ok,
        "default_drafts": exact.speculation_plain is None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=int, nargs="+", default=[0, 4], help="MatMulNBits accuracy levels")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=DEFAULT_VOCAB)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--new", type=int, default=64, help="greedy tokens per request")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"# machine: {platform.machine()}, {platform.processor() or 'cpu'}; {args.layers} layers, vocab {args.vocab}")
    header = ["accuracy_level", "coarse activations", "requests parted (exact=False)", "first differing token"]
    print(table_header([*header, "drafts kept", "default engine equals plain", "default engine drafts"]))
    for level in args.levels:
        r = run_level(level, args.layers, args.vocab, args.requests, args.new, args.seed)
        print(table_row(list(r.values())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
