"""Command line: ``python -m engine`` or the ``engine`` console script.

    engine generate --model DIR --prompt TEXT [--max-new-tokens N] [sampling flags] [--stream] [--chat]
    engine generate --model DIR --prompt A --prompt B ... [--max-batch N]   # a batch: one block per prompt
    engine chat --model DIR            # interactive, multi-turn; /reset clears the history, /quit leaves
    engine info --model DIR [--max-length L] [--max-batch B]   # layout, shapes, KV bytes, vocab, providers
    engine serve --model DIR [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--api-key KEY]  # OpenAI HTTP API

TTFT and tok/s go to stderr at the end of each generation; the text goes to stdout.

Every error ends the command with one line on stderr, ``error: ...``, and a non-zero exit status (2 for
a usage, model or request error, 1 for anything unexpected); no traceback. When the reader of stdout
goes away (``engine generate ... | head -c 1``) the command ends quietly with status 141, as Unix
tools killed by SIGPIPE do.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from .errors import EngineError, InvalidRequestError
from .sampling import SamplingParams

_INT32_MAX = 2**31 - 1
_MAX_BATCH = 1024  # Engine's own bound on max_batch
#: More ORT threads than this is a typo, not a machine (ORT would fail on 2**31 with a raw TypeError).
_MAX_THREADS = 1024
#: Exit status of a process whose stdout reader went away: 128 + SIGPIPE, as ``yes | head`` reports.
_EXIT_BROKEN_PIPE = 141


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error format: one line, ``error: ...``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        _print_error(message)
        self.exit(2)


def _int_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text}")
        return value

    return parse


def _text(value: str) -> str:
    """A command-line string as valid UTF-8: bytes that are not (kept by Python as lone surrogates,
    which tokenizers refuse) become U+FFFD."""
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate argv decoding cannot make (main() called with one)
        raw = value.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


def _lenient_stdio() -> None:
    """Read stdin and write stdout with U+FFFD / '?' for what the encoding cannot hold: a line of
    invalid UTF-8 in a chat, or text a non-UTF-8 terminal cannot show, is not fatal."""
    for stream in (sys.stdin, sys.stdout):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (genai format or Optimum export)")
    p.add_argument("--provider", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--max-length",
        type=_int_range(1, _INT32_MAX),
        default=None,
        help="KV cache length (default min(context, 4096))",
    )
    p.add_argument(
        "--threads",
        type=_int_range(1, _MAX_THREADS),
        default=None,
        help="ORT intra-op threads (default: measured per model)",
    )
    p.add_argument(
        "--speculation",
        choices=["prompt_lookup"],
        default=None,
        help="draft tokens from the request's own text and verify several per pass (CPU, GQA share-buffer models)",
    )
    p.add_argument(
        "--speculation-inexact",
        action="store_true",
        help="draft even where a verify pass cannot reproduce plain decoding exactly (int8-activation INT4 models)",
    )
    p.add_argument(
        "--prefix-cache",
        action="store_true",
        help="reuse the KV of a previous request whose ids start the new prompt (chat turns)",
    )


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=_int_range(1, _INT32_MAX), default=128)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=_int_range(0, _INT32_MAX))
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--presence-penalty", type=float)
    p.add_argument("--frequency-penalty", type=float)
    p.add_argument("--seed", type=_int_range(0, 2**64 - 1))
    p.add_argument("--stop", action="append", type=_text, default=None, help="stop string (repeatable)")


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


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Engine keywords of --speculation, --speculation-inexact and --prefix-cache."""
    if args.speculation_inexact and args.speculation is None:
        raise InvalidRequestError("--speculation-inexact needs --speculation prompt_lookup")
    options: dict[str, Any] = {"speculation": args.speculation, "prefix_cache": args.prefix_cache}
    if args.speculation_inexact:
        options["speculation_options"] = {"exact": False}
    return options


def _engine(args: argparse.Namespace):
    from .generation import Engine

    return Engine(
        args.model,
        provider=args.provider,
        max_length=args.max_length,
        threads=args.threads,
        max_batch=getattr(args, "max_batch", 1),
        **_engine_options(args),
    )


def _print_stats(stats) -> None:
    print(
        f"\n[{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new; TTFT {stats.ttft_s * 1000:.1f} ms; "
        f"decode {stats.decode_tokens_per_s:.1f} tok/s"
        + (f"; {stats.cached_prompt_tokens} prompt tokens reused" if stats.cached_prompt_tokens else "")
        + (f"; drafts kept {stats.accepted_tokens}/{stats.drafted_tokens}" if stats.drafted_tokens else "")
        + "]",
        file=sys.stderr,
    )


def _run_one(eng, prompt_ids: list[int] | str, args: argparse.Namespace, stream: bool) -> str:
    kw = _sampling_kwargs(args)
    if stream:
        parts = []
        with eng.stream(prompt_ids, args.max_new_tokens, **kw) as it:  # closed early on a broken pipe
            for chunk in it:
                parts.append(chunk.text)
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        print()
        if it.result is not None:
            _print_stats(it.result.stats)
        return "".join(parts)
    res = eng.generate(prompt_ids, args.max_new_tokens, **kw)
    print(res.text)
    _print_stats(res.stats)
    return res.text


def cmd_generate(args: argparse.Namespace) -> int:
    """``engine generate``: one prompt, or a batch when --prompt is given several times."""
    if len(args.prompt) > 1 and args.stream:
        _print_error("--stream takes one --prompt (a batch prints each result when it is done)")
        return 2
    _lenient_stdio()
    # no KV rows beyond the prompts given
    args.max_batch = max(1, min(args.max_batch, len(args.prompt)))
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
    _lenient_stdio()
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
            _print_error(e)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


def cmd_info(args: argparse.Namespace) -> int:
    """``engine info``: what the engine reads from a model folder."""
    from .config import DEFAULT_MAX_LENGTH, load_model_spec
    from .memory import estimate_memory
    from .providers import available_providers, default_threads

    spec = load_model_spec(args.model)
    length = args.max_length or min(
        spec.context_length, DEFAULT_MAX_LENGTH, spec.rope_cache_rows or spec.context_length
    )
    mem = estimate_memory(spec, length, args.max_batch)
    kv = mem.kv_cache
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
        ("step buffers + mask views", f"{(mem.buffers + mem.views) / 2**20:.1f} MiB"),
        ("host memory estimate (CPU engine)", f"{mem.total / 2**20:.1f} MiB: what the load-time check compares"),
        ("BOS / EOS / PAD", f"{spec.bos_token_id} / {list(spec.eos_token_ids)} / {spec.pad_token_id}"),
        ("default CPU threads", default_threads(spec.weight_bytes)),
        ("providers available", ", ".join(available_providers())),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``engine serve``: the OpenAI-compatible HTTP server (needs the ``serve`` extra)."""
    try:
        from .server import ServerConfig, serve
    except ImportError as e:
        _print_error(f"engine serve needs the serve extra (pip install 'engine[serve]'): {e}")
        return 2
    from pathlib import Path

    model = args.model_name or Path(args.model).resolve().name
    config = ServerConfig(
        model_name=model,
        api_key=args.api_key or os.environ.get("ENGINE_API_KEY") or None,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout,
        max_body_bytes=args.max_body_bytes,
    )
    serve(
        args.model,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_length=args.max_length,
        threads=args.threads,
        provider=args.provider,
        spinning=args.spinning,
        config=config,
        log_level=args.log_level,
        engine_options=_engine_options(args),
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the CLI."""
    parser = _Parser(prog="engine", description="LLM inference on ONNX Runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a continuation of a prompt")
    _add_model_args(g)
    g.add_argument("--prompt", required=True, action="append", type=_text, help="prompt text (repeat it for a batch)")
    g.add_argument(
        "--max-batch", type=_int_range(1, _MAX_BATCH), default=8, help="prompts per forward pass of a batch (default 8)"
    )
    g.add_argument("--stream", action="store_true", help="print tokens as they are decoded")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    _add_sampling_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_model_args(c)
    c.add_argument("--system", type=_text, default=None, help="system message")
    _add_sampling_args(c)
    c.set_defaults(func=cmd_chat)
    i = sub.add_parser("info", help="describe a model folder")
    i.add_argument("--model", required=True)
    i.add_argument(
        "--max-length",
        type=_int_range(1, _INT32_MAX),
        default=None,
        help="for the KV estimate (default min(context, 4096))",
    )
    i.add_argument("--max-batch", type=_int_range(1, _MAX_BATCH), default=1, help="for the KV estimate (default 1)")
    i.set_defaults(func=cmd_info)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_int_range(0, 65535), default=8000)
    s.add_argument(
        "--max-batch",
        type=_int_range(1, _MAX_BATCH),
        default=8,
        help="rows decoded together; 1 serves one request at a time (default 8)",
    )
    s.add_argument("--max-queue", type=_int_range(0, 1_000_000), default=64, help="waiting requests before 429")
    s.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is cancelled")
    s.add_argument("--max-body-bytes", type=_int_range(1, 2**30), default=1 << 20, help="largest request body")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set ENGINE_API_KEY)")
    s.add_argument("--model-name", default=None, help="the model id clients use (default: the folder's name)")
    s.add_argument(
        "--spinning", action="store_true", help="let idle ORT threads spin (off: the event loop needs the cores)"
    )
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)
    return parser


def _print_error(message: object) -> None:
    """``error: message`` on one line of stderr (a broken stderr is ignored: nothing to tell then)."""
    text = " ".join(str(message).split()) or "unknown error"
    with contextlib.suppress(OSError, ValueError):
        print(f"error: {text}", file=sys.stderr, flush=True)


def _reader_gone() -> int:
    """stdout (or stderr) lost its reader: point both at /dev/null so that the final flush at exit
    cannot fail again, and end with SIGPIPE's status."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            os.dup2(devnull, stream.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptors (a test's capture)
        pass
    return _EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 for a usage, model or request error, 1 for an
    unexpected one, 141 when stdout's reader went away, 130 on Ctrl-C)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except BrokenPipeError:
        return _reader_gone()
    except EngineError as e:
        _print_error(e)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a user gets one line, not a traceback, whatever went wrong
        _print_error(f"{type(e).__name__}: {e}")
        return 1
