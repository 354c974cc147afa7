"""Command line: ``python -m engine`` or the ``engine`` console script.

    engine generate --model DIR --prompt TEXT [--max-new-tokens N] [sampling flags] [--stream] [--chat]
    engine generate --model DIR --prompt A --prompt B ... [--max-batch N]   # a batch: one block per prompt
    engine chat --model DIR            # interactive, multi-turn; /reset clears the history, /quit leaves
    engine info --model DIR [--max-length L] [--max-batch B]   # layout, shapes, KV bytes, vocab, providers

TTFT and tok/s go to stderr at the end of each generation; the text goes to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from .errors import EngineError
from .sampling import SamplingParams


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (genai format or Optimum export)")
    p.add_argument("--provider", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--max-length", type=int, default=None, help="KV cache length (default min(context, 4096))")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: measured per model)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--presence-penalty", type=float)
    p.add_argument("--frequency-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


# the SamplingParams fields that have a plain --flag VALUE (do_sample is a switch; bias and logprobs are API-only)
_NOT_FLAGS = ("do_sample", "logit_bias", "logprobs")
_SAMPLING = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.name not in _NOT_FLAGS)


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {k: getattr(args, k) for k in _SAMPLING if getattr(args, k) is not None}
    if args.do_sample:
        kw["do_sample"] = True
    if args.stop:
        kw["stop"] = args.stop
    return kw


def _engine(args: argparse.Namespace):
    from .generation import Engine

    return Engine(
        args.model,
        provider=args.provider,
        max_length=args.max_length,
        threads=args.threads,
        max_batch=getattr(args, "max_batch", 1),
    )


def _print_stats(stats) -> None:
    print(
        f"\n[{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new; TTFT {stats.ttft_s * 1000:.1f} ms; "
        f"decode {stats.decode_tokens_per_s:.1f} tok/s]",
        file=sys.stderr,
    )


def _run_one(eng, prompt_ids: list[int] | str, args: argparse.Namespace, stream: bool) -> str:
    kw = _sampling_kwargs(args)
    if stream:
        parts = []
        it = eng.stream(prompt_ids, args.max_new_tokens, **kw)
        for chunk in it:
            parts.append(chunk.text)
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        text = "".join(parts)
        print()
        _print_stats(eng.last_result.stats)
        return text
    res = eng.generate(prompt_ids, args.max_new_tokens, **kw)
    print(res.text)
    _print_stats(res.stats)
    return res.text


def cmd_generate(args: argparse.Namespace) -> int:
    """``engine generate``: one prompt, or a batch when --prompt is given several times."""
    if len(args.prompt) > 1 and args.stream:
        print("error: --stream takes one --prompt (a batch prints each result when it is done)", file=sys.stderr)
        return 2
    # no KV rows beyond the prompts given; batches run on the CPU provider only (a list runs one by one on CUDA)
    args.max_batch = 1 if args.provider == "cuda" else max(1, min(args.max_batch, len(args.prompt)))
    eng = _engine(args)
    prompts: list[list[int] | str] = list(args.prompt)
    if args.chat:
        prompts = [eng.render_chat([{"role": "user", "content": p}]) for p in args.prompt]
    if len(prompts) == 1:
        _run_one(eng, prompts[0], args, args.stream)
        return 0
    results = eng.generate(prompts, args.max_new_tokens, **_sampling_kwargs(args))
    for i, res in enumerate(results):
        print(f"--- [{i}] {res.finish_reason}")
        print(res.text)
        _print_stats(res.stats)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """``engine chat``: interactive multi-turn conversation."""
    eng = _engine(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("chat: type a message; /reset clears the history, /quit (or Ctrl-D) leaves", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = _run_one(eng, eng.render_chat(history), args, stream=True)
        except EngineError as e:
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


def cmd_info(args: argparse.Namespace) -> int:
    """``engine info``: what the engine reads from a model folder."""
    from .config import DEFAULT_MAX_LENGTH, load_model_spec
    from .kv_cache import kv_cache_bytes_needed
    from .providers import available_providers, default_threads

    spec = load_model_spec(args.model)
    length = args.max_length or min(spec.context_length, DEFAULT_MAX_LENGTH)
    kv = kv_cache_bytes_needed(spec, length, args.max_batch)
    rows = [
        ("model", str(spec.model_path)),
        ("type", spec.model_type),
        ("layout", spec.layout.value),
        ("layers", spec.num_layers),
        ("attention heads", spec.num_heads if spec.num_heads is not None else "?"),
        ("KV heads", spec.num_kv_heads),
        ("head size", spec.head_size),
        ("hidden size", spec.hidden_size if spec.hidden_size is not None else "?"),
        ("vocab", spec.vocab_size),
        ("context length", spec.context_length),
        ("KV dtype", spec.kv_dtype.name),
        ("KV bytes per token", spec.kv_bytes_per_token),
        (f"KV cache (max_length {length} x max_batch {args.max_batch})", f"{kv / 2**20:.1f} MiB"),
        ("weights", f"{spec.weight_bytes / 2**20:.1f} MiB"),
        ("BOS / EOS / PAD", f"{spec.bos_token_id} / {list(spec.eos_token_ids)} / {spec.pad_token_id}"),
        ("default CPU threads", default_threads(spec.weight_bytes)),
        ("providers available", ", ".join(available_providers())),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the CLI."""
    parser = argparse.ArgumentParser(prog="engine", description="LLM inference on ONNX Runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a continuation of a prompt")
    _add_model_args(g)
    g.add_argument("--prompt", required=True, action="append", help="prompt text (repeat it for a batch)")
    g.add_argument("--max-batch", type=int, default=8, help="prompts per forward pass of a batch (default 8)")
    g.add_argument("--stream", action="store_true", help="print tokens as they are decoded")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_model_args(c)
    c.add_argument("--system", default=None, help="system message")
    _add_sampling_args(c)
    c.set_defaults(func=cmd_chat)
    i = sub.add_parser("info", help="describe a model folder")
    i.add_argument("--model", required=True)
    i.add_argument("--max-length", type=int, default=None, help="for the KV estimate (default min(context, 4096))")
    i.add_argument("--max-batch", type=int, default=1, help="for the KV estimate (default 1)")
    i.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 for a usage or model error)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
