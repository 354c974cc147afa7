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
Last, what the exact alternative would cost: a decode pass padded to 2 (or 3, 5) tokens against a
one-token pass of the same graph.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
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


def _session(nodes: list, inputs: list, outputs: list, inits: list | None = None):
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, inits or [])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), so)


def op_rows(seed: int = 0) -> dict[str, float]:
    """Where a pass of several tokens parts from one-token steps, op by op (Phi-4-mini shapes):
    the largest difference between a row computed alone (M = 1) and the same row inside a pass
    of several, for MatMulNBits at accuracy levels 4 and 0 (K = N = 3072, block 32, zero points;
    M = 2..32), and for GroupQueryAttention (24 heads, 8 KV heads, head 128, 300 cached positions)
    between a one-token pass and passes of 2, 3 and 5 tokens (and among those)."""
    from onnx import TensorProto as T
    from onnx import helper

    rng = np.random.default_rng(seed)
    k = n = 3072
    blocks = k // 32
    codes = rng.integers(0, 256, (n, blocks, 16), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) * 0.02).astype(np.float32)
    zeros = rng.integers(0, 256, n * ((blocks + 1) // 2), dtype=np.uint8)
    inits = [
        helper.make_tensor("B", T.UINT8, codes.shape, codes.tobytes(), raw=True),
        helper.make_tensor("S", T.FLOAT, scales.shape, scales.tobytes(), raw=True),
        helper.make_tensor("Z", T.UINT8, zeros.shape, zeros.tobytes(), raw=True),
    ]
    a = rng.standard_normal((32, k)).astype(np.float32)
    out: dict[str, float] = {}
    for level in (4, 0):
        node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft",
                                K=k, N=n, bits=4, block_size=32, accuracy_level=level)  # fmt: skip
        sess = _session([node], [helper.make_tensor_value_info("A", T.FLOAT, ["M", k])],
                        [helper.make_tensor_value_info("Y", T.FLOAT, ["M", n])], inits)  # fmt: skip
        alone = np.concatenate([sess.run(None, {"A": a[i : i + 1]})[0] for i in range(32)])
        out[f"MatMulNBits level {level}, M=1 vs M=2..32"] = max(
            float(np.abs(sess.run(None, {"A": a[:m]})[0] - alone[:m]).max()) for m in (2, 5, 8, 16, 32)
        )
    heads, kv_heads, head, cap, past = 24, 8, 128, 512, 300
    names = ["q", "k", "v", "pk", "pv"]
    shapes = [[1, "S", heads * head], [1, "S", kv_heads * head], [1, "S", kv_heads * head]] + [
        [1, kv_heads, cap, head]
    ] * 2
    node = helper.make_node("GroupQueryAttention", [*names, "sl", "tl"], ["o", "ok", "ov"], domain="com.microsoft",
                            num_heads=heads, kv_num_heads=kv_heads)  # fmt: skip
    inputs = [helper.make_tensor_value_info(nm, T.FLOAT, sh) for nm, sh in zip(names, shapes, strict=True)]
    inputs += [helper.make_tensor_value_info("sl", T.INT32, [1, 1]), helper.make_tensor_value_info("tl", T.INT32, [])]
    outputs = [
        helper.make_tensor_value_info(nm, T.FLOAT, sh)
        for nm, sh in (("o", shapes[0]), ("ok", shapes[3]), ("ov", shapes[4]))
    ]
    sess = _session([node], inputs, outputs)
    cache = [rng.standard_normal((1, kv_heads, cap, head)).astype(np.float32) for _ in range(2)]
    new = [rng.standard_normal((1, 5, d)).astype(np.float32) for d in (heads * head, kv_heads * head, kv_heads * head)]

    def attend(count: int, kv: list[np.ndarray]) -> np.ndarray:
        """The next ``count`` new positions in one pass over ``kv`` (written in place: the cache
        then holds them, as the engine's share buffer does)."""
        first = int(kv[2])
        feed = {nm: x[:, first : first + count] for nm, x in zip(names[:3], new, strict=True)}
        feed.update(pk=kv[0], pv=kv[1])
        feed.update(sl=np.array([[past + first + count - 1]], np.int32), tl=np.array(past + first + count, np.int32))
        o, kv[0], kv[1] = sess.run(None, feed)
        kv[2] = first + count
        return o[0]

    steps = [c.copy() for c in cache] + [0]
    one = np.concatenate([attend(1, steps) for _ in range(5)])  # decode steps, one position each
    several = {s: attend(s, [c.copy() for c in cache] + [0]) for s in (2, 3, 5)}
    out["GroupQueryAttention, one-token pass vs passes of 2, 3, 5"] = max(
        float(np.abs(several[s] - one[:s]).max()) for s in several
    )
    out["GroupQueryAttention, passes of 2 and 3 vs 5"] = max(
        float(np.abs(several[s] - several[5][:s]).max()) for s in (2, 3)
    )
    return out


def padded_step_cost(layers: int, vocab: int, reps: int, past: int = 128) -> dict[int, float]:
    """What exactness by padding would cost: one decode pass of 2, 3 and 5 new tokens (the LM head on
    the last position only, as the engine's decode graph) against a pass of 1, over ``past`` cached
    positions, on the level-4 model; medians of ``reps`` rounds, alternating."""
    import onnx
    import onnxruntime as ort

    from engine.config import load_model_spec
    from engine.graph import slice_logits_to_last
    from engine.testing.synthetic import cached_model, phi4_mini_spec

    folder = cached_model(phi4_mini_spec(layers=layers, vocab=vocab), MODELS_DIR)
    spec = load_model_spec(folder)
    model = onnx.load(str(spec.model_path))
    slice_logits_to_last(model, spec.logits.name, 1)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), so)
    shape = (1, spec.num_kv_heads, 512, spec.head_size)
    kv = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for name in spec.past_names}

    def run(n: int) -> float:
        b = sess.io_binding()
        b.bind_cpu_input(spec.input_ids.name, np.full((1, n), 5, np.int64))
        b.bind_cpu_input(spec.attention_mask.name, np.ones((1, past + n), np.int64))
        for past_name, present_name in zip(spec.past_names, spec.present_names, strict=True):
            b.bind_ortvalue_input(past_name, kv[past_name])
            b.bind_ortvalue_output(present_name, kv[past_name])  # share buffer, as the engine binds it
        b.bind_output(spec.logits.name)
        t = time.perf_counter()
        sess.run_with_iobinding(b)
        return time.perf_counter() - t

    widths = (1, 2, 3, 5)
    for n in widths:
        run(n)
    times: dict[int, list[float]] = {n: [] for n in widths}
    for _ in range(reps):
        for n in widths:
            times[n].append(run(n))
    one = statistics.median(times[1])
    return {n: statistics.median(times[n]) / one for n in widths[1:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=int, nargs="+", default=[0, 4], help="MatMulNBits accuracy levels")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=DEFAULT_VOCAB)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--new", type=int, default=64, help="greedy tokens per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step-cost-reps", type=int, default=60, help="rounds of the padded-step cost (0: skip)")
    args = ap.parse_args(argv)
    print(f"# machine: {platform.machine()}, {platform.processor() or 'cpu'}; {args.layers} layers, vocab {args.vocab}")
    header = ["accuracy_level", "coarse activations", "requests parted (exact=False)", "first differing token"]
    print(table_header([*header, "drafts kept", "default engine equals plain", "default engine drafts"]))
    for level in args.levels:
        r = run_level(level, args.layers, args.vocab, args.requests, args.new, args.seed)
        print(table_row(list(r.values())), flush=True)
    print("\nlargest difference of a row alone and inside a pass of several (0.0: bit for bit):")
    for what, diff in op_rows(args.seed).items():
        print(f"  {what}: {diff:.3g}")
    if args.step_cost_reps:
        cost = padded_step_cost(args.layers, args.vocab, args.step_cost_reps)
        shown = ", ".join(f"{n} tokens {c:.2f}x" for n, c in cost.items())
        print(f"\na pass of several new tokens against one (level 4, medians of {args.step_cost_reps}): {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
