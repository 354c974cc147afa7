"""Speculation and prefix-cache benchmarks (issue 15), run by ``make perf`` or alone:

    .venv/bin/python -m perf.speculation                    # tiny model + synthetic Phi-4-mini, small defaults
    .venv/bin/python -m perf.speculation --models tiny --reps 9 --new-tiny 64

1. **Prompt lookup on vs off**, decode tok/s of the same greedy request (exactly ``new`` tokens,
   EOS ignored) on two engines of the same model, run alternately (off, on, on, off, off, on, ...);
   the ratio is taken per pair and its median reported, with the medians of each side. Workloads:

   * ``grounded``: the model's own greedy continuation of a text fed back inside a longer prompt
     (text + continuation + text again), so a model that copies repeats it; on stories260k also a
     "repeat this text" prompt;
   * ``open``: plain prompts whose output copies nothing on purpose;
   * ``oracle`` (synthetic model only): its random weights copy nothing, so prompt lookup finds
     little there; this row drafts the known greedy continuation instead (every draft right), which
     measures what a verify pass of K + 1 tokens buys on a bandwidth-bound INT4 model.

2. **Chat TTFT with and without the prefix cache**: five turns, each re-sending the whole
   conversation (the previous answers included); turn by turn the TTFT of one engine with
   ``prefix_cache=True`` and of one without, alternately, medians over ``reps`` conversations.

Both engines of a pair check that their greedy tokens agree (a mismatch is printed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.speculation import PromptLookupDrafter, SpeculationConfig

from .common import DEFAULT_CONTEXT, DEFAULT_VOCAB, STORIES, ModelChoice, phi4_model, tiny_model

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
OPEN = ["Tom had a big red ball.", "The sun was hot and the dog was sleepy.", "One day, a bird"]
REPEAT = "Sam and his mom went to the shop. They bought milk, bread and a big apple. Sam and his mom went to the shop."
CHAT = [
    "Tell me a story about a cat.",
    "What was the cat's name?",
    "Where did the cat live?",
    "Did the cat have a friend?",
    "How does the story end?",
]


@dataclass
class SpecRow:
    """One workload: decode tok/s off and on (medians), their paired ratio, drafts kept."""

    model: str
    workload: str
    prompt: int
    new: int
    reps: int
    off_tok_s: float
    on_tok_s: float
    ratio: float  # median over reps of on / off decode tok/s of the same rep
    drafted: int  # drafts verified in the last speculative run
    accepted: int  # of which kept
    tokens_per_pass: float  # decode tokens per forward pass in that run (timing-free)
    tokens_match: bool


@dataclass
class ChatRow:
    """One chat turn: TTFT with and without the prefix cache (medians), their paired ratio."""

    model: str
    turn: int
    prompt: int
    cached: int  # prompt tokens reused at this turn
    reps: int
    cold_ttft_ms: float
    warm_ttft_ms: float
    ratio: float  # median over reps of warm / cold TTFT
    tokens_match: bool


class OracleDrafter(PromptLookupDrafter):
    """Drafts the known greedy continuation (every draft right): the upper bound of grounding."""

    def __init__(self, config: SpeculationConfig, prompt_len: int, continuation: list[int]) -> None:
        super().__init__(config)
        self.prompt_len, self.continuation = prompt_len, continuation

    def propose(self, out: np.ndarray, limit: int) -> int:
        """The next ``min(limit, max_draft)`` tokens of the continuation."""
        at = len(self.text) - self.prompt_len
        k = max(0, min(limit, self.config.max_draft, len(self.continuation) - at))
        for i in range(k):
            out[1 + i] = self.continuation[at + i]
        return k

    def feedback(self, drafted: int, accepted: int) -> None:
        """Count the round; no cooldown (the oracle drafts at every position)."""
        super().feedback(drafted, accepted)
        self.cooldown = 0


def _engines(model: ModelChoice, max_length: int, threads: int | None, **on: object):
    from engine import Engine

    off = Engine(model.path, max_length=max_length, threads=threads)
    eng = Engine(model.path, max_length=max_length, threads=threads, **on)
    off.eos_token_ids = eng.eos_token_ids = frozenset()  # exactly ``new`` tokens on both
    return off, eng


def _workloads(model: ModelChoice, off, new: int, tiny: bool) -> list[tuple[str, list[int]]]:
    """(name, prompt ids) of the grounded and open-ended prompts of ``model``."""
    if tiny and off.tokenizer is not None:
        cont = off.generate(STORY, 60).text
        grounded = off._requests.prompt_ids(STORY + cont + " " + STORY).tolist()
        repeat = off._requests.prompt_ids(REPEAT).tolist()
        work = [("grounded: story + its continuation + story", grounded), ("grounded: repeat a sentence", repeat)]
        return work + [(f"open: {text[:24]!r}", off._requests.prompt_ids(text).tolist()) for text in OPEN]
    rng = np.random.default_rng(0)
    x = rng.integers(3, off.spec.vocab_size, 32).tolist()
    cont = off.generate(x, new).token_ids
    work = [("grounded: ids + continuation + ids", x + cont + x)]
    return work + [(f"open: random ids #{i}", rng.integers(3, off.spec.vocab_size, 32).tolist()) for i in range(2)]


def run_speculation(
    model: ModelChoice, *, new: int, reps: int, threads: int | None, tiny: bool, progress=None
) -> tuple[list[SpecRow], list[str]]:
    """Prompt lookup on vs off for each workload of ``model`` (module docstring)."""
    max_length = 512 if tiny else 1024
    # exact=False changes nothing on fp32/fp16 models; on an int8-activation model (MatMulNBits
    # accuracy_level 4: the synthetic Phi-4-mini INT4) the default engine takes plain steps
    # (docs/api.md), so its rows measure the opt-in
    off, on = _engines(model, max_length, threads, speculation="prompt_lookup", speculation_options={"exact": False})
    lookup = on._ctx.drafter  # the engine's prompt-lookup drafter (the oracle rows swap in another)
    rows, notes = [], []
    if on.spec.coarse_activations is not None:
        notes.append(
            f"{model.name}: {on.spec.coarse_activations}; measured with speculation_options={{'exact': False}} "
            "(the default engine takes plain steps there, ratio 1 by construction; greedy tokens may then part "
            "from plain decoding at a near tie)"
        )
    work = [(name, ids, None) for name, ids in _workloads(model, off, new, tiny)]
    if not tiny:  # random weights copy nothing: also the verify pass with every draft right
        x = work[-1][1]
        # drafts = the continuation this engine gives with these drafts: INT4 rounding differs between
        # one-row and several-row passes, so start from the plain one and iterate to a fixed point
        cont = off.generate(x, new).token_ids
        for _ in range(4):
            on._ctx.drafter = OracleDrafter(SpeculationConfig(exact=False), len(x), cont)
            cont, prev = on.generate(x, new).token_ids, cont
            if cont == prev:
                break
        work.append(("oracle: drafts = its own greedy continuation", x, cont))
    for name, ids, oracle in work:
        on._ctx.drafter = lookup if oracle is None else OracleDrafter(SpeculationConfig(exact=False), len(ids), oracle)
        off.generate(ids, 4)  # warm this prompt length on both
        on.generate(ids, 4)
        off_s, on_s, ratio = [], [], []
        match = True
        for rep in range(reps):
            if rep % 2:  # on first every other pair (the engine run second finds the cores warmer)
                b = on.generate(ids, new)
                a = off.generate(ids, new)
            else:
                a = off.generate(ids, new)
                b = on.generate(ids, new)
            off_s.append(a.stats.decode_tokens_per_s)
            on_s.append(b.stats.decode_tokens_per_s)
            ratio.append(b.stats.decode_tokens_per_s / a.stats.decode_tokens_per_s)
            match = match and a.token_ids == b.token_ids
            if progress is not None:
                progress.update(1)
        if not match:
            notes.append(f"{model.name} {name}: greedy tokens differ with speculation on")
        rows.append(
            SpecRow(
                model.name,
                name,
                len(ids),
                new,
                reps,
                statistics.median(off_s),
                statistics.median(on_s),
                statistics.median(ratio),
                b.stats.drafted_tokens,
                b.stats.accepted_tokens,
                (new - 1) / max(1, new - 1 - b.stats.accepted_tokens),
                match,
            )
        )
    on._ctx.drafter = lookup
    off.close()
    on.close()
    return rows, notes


def run_chat(
    model: ModelChoice, *, reps: int, threads: int | None, tiny: bool, new: int, progress=None
) -> tuple[list[ChatRow], list[str]]:
    """Five chat turns with and without the prefix cache (module docstring)."""
    max_length = 512 if tiny else 2048
    cold, warm = _engines(model, max_length, threads, prefix_cache=True)
    rng = np.random.default_rng(1)
    per_turn: list[list[tuple[float, float, int, int, bool]]] = [[] for _ in CHAT]
    for _ in range(reps):
        warm._ctx.prefix.clear()  # each conversation starts cold: no turn reuses the last one's
        messages: list[dict[str, str]] = []
        ids: list[int] = []
        for turn, text in enumerate(CHAT):
            if tiny:  # stories260k: the rendered conversation (chat template), answers as text
                messages.append({"role": "user", "content": text})
                prompt = warm.render_chat(messages)
            else:  # random weights answer in bytes that do not re-tokenize: the conversation as ids
                prompt = ids + rng.integers(3, warm.spec.vocab_size, 48).tolist()
            a = cold.generate(prompt, new)
            b = warm.generate(prompt, new)
            per_turn[turn].append(
                (a.stats.ttft_s, b.stats.ttft_s, len(prompt), b.stats.cached_prompt_tokens, a.token_ids == b.token_ids)
            )
            if tiny:
                messages.append({"role": "assistant", "content": b.text})
            else:
                ids = prompt + b.token_ids
            if progress is not None:
                progress.update(1)
    rows, notes = [], []
    for turn, samples in enumerate(per_turn, start=1):
        match = all(s[4] for s in samples)
        if not match:
            notes.append(f"{model.name} chat turn {turn}: greedy tokens differ with the prefix cache")
        rows.append(
            ChatRow(
                model.name,
                turn,
                samples[-1][2],
                samples[-1][3],
                len(samples),
                1e3 * statistics.median(s[0] for s in samples),
                1e3 * statistics.median(s[1] for s in samples),
                statistics.median(s[1] / s[0] for s in samples),
                match,
            )
        )
    cold.close()
    warm.close()
    return rows, notes


def spec_table(rows: list[SpecRow]) -> str:
    """Markdown table of the speculation rows."""
    out = [
        "| model | workload | prompt | new | reps | off tok/s | on tok/s | on/off (paired median) | kept/drafted "
        "| tokens/pass |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        out.append(
            f"| {r.model} | {r.workload} | {r.prompt} | {r.new} | {r.reps} | {r.off_tok_s:.1f} | {r.on_tok_s:.1f} "
            f"| {r.ratio:.2f}x | {r.accepted}/{r.drafted} | {r.tokens_per_pass:.2f} |"
        )
    return "\n".join(out)


def chat_table(rows: list[ChatRow]) -> str:
    """Markdown table of the chat rows."""
    out = [
        "| model | turn | prompt | cached | reps | TTFT cold ms | TTFT prefix cache ms | ratio (paired median) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        out.append(
            f"| {r.model} | {r.turn} | {r.prompt} | {r.cached} | {r.reps} | {r.cold_ttft_ms:.2f} "
            f"| {r.warm_ttft_ms:.2f} | {r.ratio:.2f}x |"
        )
    return "\n".join(out)


def run_all(
    models: list[ModelChoice], *, new_tiny: int, new: int, reps: int, threads: int | None, progress=None
) -> dict:
    """Both benchmarks on every model; tables, rows and notes as a dict (perf/run.py stores it)."""
    from engine.config import load_model_spec

    spec_rows: list[SpecRow] = []
    chat_rows: list[ChatRow] = []
    notes: list[str] = []
    for m in models:
        tiny = load_model_spec(m.path).weight_bytes < 16 * 1024 * 1024
        r, n = run_speculation(
            m,
            new=new_tiny if tiny else new,
            reps=10 * reps if tiny else reps,  # a tiny model's request takes ~10 ms: many pairs tame the noise
            threads=threads,
            tiny=tiny,
            progress=progress,
        )
        spec_rows += r
        notes += n
        c, n = run_chat(
            m, reps=3 * reps if tiny else reps, threads=threads, tiny=tiny, new=24 if tiny else 8, progress=progress
        )
        chat_rows += c
        notes += n
    return {
        "speculation_rows": [asdict(r) for r in spec_rows],
        "chat_rows": [asdict(r) for r in chat_rows],
        "speculation_table": spec_table(spec_rows),
        "chat_table": chat_table(chat_rows),
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.speculation", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,phi4", help="tiny,phi4 (default both)")
    p.add_argument("--model", type=Path, help="run this model folder instead")
    p.add_argument("--layers", type=int, default=4, help="layers of the synthetic Phi-4-mini model (default 4)")
    p.add_argument("--vocab", type=int, default=DEFAULT_VOCAB)
    p.add_argument("--new", type=int, default=48, help="new tokens per request on the synthetic model (default 48)")
    p.add_argument("--new-tiny", type=int, default=64, help="new tokens per request on tiny models (default 64)")
    p.add_argument("--reps", type=int, default=5, help="repetitions (default 5; tiny: 10x on/off pairs, 3x chats)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.model:
        models = [ModelChoice(args.model.name, args.model.resolve(), "--model")]
    else:
        keys = [k for k in args.models.split(",") if k]
        models = [tiny_model() if k == "tiny" else phi4_model(args.layers, args.vocab, DEFAULT_CONTEXT) for k in keys]
    if not (STORIES / "genai_config.json").is_file():
        print("note: ../shared/models/stories260k is absent: the tiny model is synthetic (random weights)")
    t = time.perf_counter()
    out = run_all(models, new_tiny=args.new_tiny, new=args.new, reps=args.reps, threads=args.threads)
    print(out["speculation_table"])
    print()
    print(out["chat_table"])
    for line in out["notes"]:
        print(f"note: {line}")
    print(f"wall time {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
