"""The Engine facade: load a model once, then generate / stream / stream_batch / chat / close.

Requests are checked and prepared in engine/request.py, run by the loops of engine/decode.py and
scheduled by engine/scheduler.py (the engine lock, streams' leases, the auto_batch worker). This
file wires them together at load and holds the public API.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import warnings
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast, overload

import numpy as np

from .binding import StepState
from .chat import load_chat_template, render_chat
from .config import DEFAULT_MAX_LENGTH, KVLayout, ModelSpec, entry_kind, load_model_spec
from .decode import DecodeContext, evict, generate_single, run_requests, run_to_end
from .errors import InsufficientMemoryError, InvalidRequestError, ModelLoadError, UnsupportedModelError
from .graph import load_for_generation
from .kv_cache import kv_cache_bytes_needed
from .memory import MemoryEstimate, estimate_memory
from .prefix_cache import PrefixCache
from .providers import CUDA_EP, SessionConfig, create_session, proc_kib_field, resolve_provider, session_options
from .request import TOKENIZER_FILES, GenerationResult, Request, RequestPreparer, StreamChunk, is_batch
from .request import GenerationStats as GenerationStats  # re-exported: part of the public API
from .sampling import Sampler
from .scheduler import CLOSED, AutoBatcher, EngineLock, Stream, Ticket
from .speculation import PromptLookupDrafter, SpeculationConfig, check_mode, load_for_verify, logits_positions_pruned
from .tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from .cuda import DeviceSampler, DeviceStepState

_log = logging.getLogger("engine")

Prompt = str | Sequence[int] | np.ndarray


def estimate_kv_cache_bytes(
    model_dir: str | os.PathLike[str], max_length: int | None = None, max_batch: int = 1
) -> int:
    """Bytes of KV cache ``Engine(model_dir, max_length=..., max_batch=...)`` would need, from the
    model's config alone (nothing is allocated). ``max_length`` defaults as in :class:`Engine`."""
    spec = load_model_spec(model_dir)
    length = min(spec.context_length, DEFAULT_MAX_LENGTH) if max_length is None else max_length
    return kv_cache_bytes_needed(spec, length, max_batch)


def _speculation_config(options: Mapping[str, object] | None) -> SpeculationConfig:
    """``Engine(speculation_options=...)`` as a checked config."""
    if options is None:
        return SpeculationConfig()
    if not isinstance(options, Mapping):
        raise InvalidRequestError(f"speculation_options must be a dict, got {type(options).__name__}")
    allowed = tuple(f.name for f in dataclasses.fields(SpeculationConfig))
    unknown = sorted(str(k) for k in options if k not in allowed)
    if unknown:
        raise InvalidRequestError(f"unknown speculation option(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return SpeculationConfig(**options)


def _inexact_speculation(spec: ModelSpec, cfg: SpeculationConfig) -> str | None:
    """Why speculation takes plain steps on this model (None: it drafts): a verify pass would not
    reproduce one-token steps exactly and ``cfg.exact`` asks for plain decoding's output."""
    if spec.coarse_activations is None or not cfg.exact:
        return None
    return (
        f"{spec.model_dir.name}: {spec.coarse_activations}, so a verify pass of several tokens rounds differently "
        "from one-token steps and could change a near-tied greedy token; requests take plain steps. Pass "
        "speculation_options={'exact': False} to draft anyway (faster; greedy output may then part from plain "
        "decoding's at a near tie)"
    )


def _multi_token_refusal(spec: ModelSpec, on_cuda: bool) -> str | None:
    """Why a pass of several new tokens over the cache (speculation, prefix reuse) cannot run on
    this engine; None when it can."""
    if on_cuda:
        return "runs on the CPU provider only for now (CUDA graphs replay fixed shapes)"
    if spec.conv_names:
        return "needs a model whose only state is KV; a hybrid model's conv states cannot be rewound or reused"
    if spec.window_caches:
        return "needs full-length KV; window-sized sliding-window caches drop positions that a rewind would need"
    if spec.layout is not KVLayout.GQA_SHARED or spec.attention_mask is None:
        return (
            f"needs a share-buffer GroupQueryAttention model; {spec.model_dir.name} has the {spec.layout.value} "
            "KV layout, where dropping rejected or stale positions would need a KV copy"
        )
    return None


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where unknown)."""
    return proc_kib_field("/proc/meminfo", "MemAvailable")


class Engine:
    """A decoder model loaded once, with every buffer of the decode loop preallocated and bound.

    Args:
        model_dir: a genai-format model folder (``genai_config.json``) or a plain Optimum export.
        provider: ``"cpu"`` or ``"cuda"``.
        max_length: the longest sequence (prompt + new tokens) a request may have; defaults to
            ``min(context_length, 4096)``. The KV cache is sized by it.
        threads: ORT intra-op threads (default: measured per model size, see docs/providers.md).
        spinning: let idle ORT threads spin (default on).
        graph_optimization: ``"all"`` (default), ``"extended"``, ``"basic"`` or ``"disable"``.
        optimized_model_path: write ORT's optimized graph here (for inspection or a load cache).
        last_token_logits: edit the graph at load so the LM head runs on the last position only.
        sampler_impl: ``"auto"`` (Cython kernels, numpy fallback), ``"cython"`` or ``"numpy"``; on
            CUDA, the sampler of the host fallback (penalties, min-p, logit bias, logprobs).
        profile: turn on ORT's profiler (``end_profiling()`` writes the JSON trace).
        warmup: run one tiny request at load so that the first real request is not slower.
        max_batch: the most prompts one forward pass serves. ``generate()`` with a list of prompts
            runs them ``max_batch`` at a time; the KV cache holds ``max_batch`` rows (the memory check
            counts them). 1 (default): a list runs prompt by prompt. On CUDA the rows run on the device
            (share-buffer models; engine/cuda/state.py), with a CUDA graph per row count.
        auto_batch: coalesce concurrent single-prompt ``generate()`` calls from several threads into
            batches of up to ``max_batch`` that later requests join between decode steps (a worker
            thread runs them; see docs/api.md, Concurrency). Off by default: on INT4 models a
            request's greedy tokens may then depend on what it was batched with.
        cuda_graph: CUDA only (ignored on the CPU): capture the decode step as a CUDA graph.
            ``None`` (default): on for float16 GroupQueryAttention share-buffer models, off otherwise
            (and off with a warning if ORT refuses to capture the model); ``True`` on a model that
            cannot have one raises InvalidRequestError. See engine/cuda/.
        speculation: ``"prompt_lookup"``: single requests draft tokens from their own prompt and
            output and verify them several per forward pass (greedy output unchanged, sampled
            output of the same distribution); ``None`` (default): off. A request may override it
            with ``speculation=``. CPU, share-buffer GroupQueryAttention models only (others raise
            InvalidRequestError); batches take plain steps. See docs/api.md, Speculation.
        speculation_options: knobs of :class:`~engine.speculation.SpeculationConfig` (``ngram``,
            ``min_ngram``, ``max_draft``, ``max_cooldown``, ``draft_cost``, ``exact``).
        prefix_cache: reuse the KV a cache row holds from an earlier request when the next prompt
            starts with the same ids (chat turns): only the rest of the prompt is prefilled. Every
            row keeps its record; auto_batch puts a request on the row holding its longest prefix.
            Off by default; a request may override it with ``prefix_cache=``. CPU, share-buffer GQA
            models only. See engine/prefix_cache.py.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        provider: str = "cpu",
        max_length: int | None = None,
        *,
        threads: int | None = None,
        spinning: bool | None = None,
        graph_optimization: str = "all",
        optimized_model_path: str | None = None,
        last_token_logits: bool = True,
        sampler_impl: str = "auto",
        profile: bool = False,
        cuda_graph: bool | None = None,
        warmup: bool = True,
        max_batch: int = 1,
        auto_batch: bool = False,
        speculation: str | None = None,
        speculation_options: Mapping[str, object] | None = None,
        prefix_cache: bool = False,
    ) -> None:
        if not isinstance(max_batch, (int, np.integer)) or isinstance(max_batch, bool) or not 1 <= max_batch <= 1024:
            raise InvalidRequestError(f"max_batch must be an int in 1..1024, got {max_batch!r}")
        self.max_batch = int(max_batch)
        if not isinstance(auto_batch, bool):
            raise InvalidRequestError(f"auto_batch must be True or False, got {auto_batch!r}")
        if auto_batch and self.max_batch < 2:
            raise InvalidRequestError(
                "auto_batch=True coalesces concurrent requests into batches: it needs max_batch >= 2"
            )
        self.auto_batch = auto_batch
        for name, flag in (("last_token_logits", last_token_logits), ("warmup", warmup), ("profile", profile)):
            if not isinstance(flag, bool):  # a string such as "no" would read as True
                raise InvalidRequestError(f"{name} must be True or False, got {flag!r}")
        if sampler_impl not in ("auto", "cython", "numpy"):
            raise InvalidRequestError(f"sampler_impl must be 'auto', 'cython' or 'numpy', got {sampler_impl!r}")
        self.speculation = check_mode(speculation)
        spec_cfg = _speculation_config(speculation_options)
        if not isinstance(prefix_cache, bool):
            raise InvalidRequestError(f"prefix_cache must be True or False, got {prefix_cache!r}")
        self.spec = load_model_spec(model_dir)
        spec = self.spec
        self.provider = resolve_provider(provider)
        on_cuda = self.provider == CUDA_EP
        if on_cuda:
            from .cuda import import_cupy, resolve_cuda_graph

            if spec.conv_names:
                raise UnsupportedModelError(
                    f"{spec.model_dir}: hybrid models with conv states (layer_types {sorted(set(spec.layer_types))}) "
                    "run on the CPU provider only for now; use provider='cpu'"
                )
            import_cupy()  # fail before loading anything when cupy or the device is missing
            resolve_cuda_graph(spec, cuda_graph)
        elif cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise InvalidRequestError(f"cuda_graph must be True, False or None (auto), got {cuda_graph!r}")
        self.max_length = self._check_max_length(max_length)
        # what the engine will hold in host memory, by part (reported by `python -m engine info`)
        self.memory_estimate: MemoryEstimate = estimate_memory(
            spec, self.max_length, self.max_batch, on_cpu=not on_cuda
        )
        if not on_cuda:
            self._check_memory()  # host memory; a CUDA engine checks the device's after loading the weights
        self.tokenizer: Tokenizer | None = None
        if any(entry_kind(spec.model_dir / f) is not None for f in TOKENIZER_FILES):
            # BOS comes from the tokenizer's own config (genai_config's bos_token_id is unreliable:
            # tiny-llama-fp16 says 0 while its tokenizer and reference prompts use <s> = 1).
            self.tokenizer = load_tokenizer(
                spec.model_dir,
                eos_token_id=list(spec.eos_token_ids) or None,
                pad_token_id=spec.pad_token_id,
            )
        eos = set(spec.eos_token_ids)
        if self.tokenizer is not None and not eos:
            eos.update(self.tokenizer.eos_token_ids)
        eos_ids = frozenset(eos)

        config = SessionConfig(
            threads=threads,
            spinning=spinning,
            graph_optimization=graph_optimization,
            optimized_model_path=optimized_model_path,
            profile=profile,
        )
        try:
            config.validate()
        except ValueError as e:
            raise InvalidRequestError(str(e)) from e
        so = session_options(config, spec.weight_bytes, spec.session_options, provider=self.provider)
        no_multi = _multi_token_refusal(spec, on_cuda)  # why several tokens per pass cannot run here
        for option, on in (("speculation", self.speculation is not None), ("prefix_cache", prefix_cache)):
            if on and no_multi is not None:
                raise InvalidRequestError(f"{option}: {no_multi}")
        # a model whose verify passes cannot reproduce one-token steps exactly takes plain steps
        self.speculation_plain: str | None = _inexact_speculation(spec, spec_cfg) if no_multi is None else None
        if self.speculation is not None and self.speculation_plain is not None:
            warnings.warn(f"speculation: {self.speculation_plain}", RuntimeWarning, stacklevel=2)
        if self.speculation is not None and last_token_logits and self.speculation_plain is None:
            model, edited = load_for_verify(spec, spec_cfg.width)  # logits of the last K + 1 positions
            last_only = False
        else:
            model, edited = load_for_generation(spec, last_token_logits)
            last_only = edited
        if edited and spec.has_external_data:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(spec.model_dir))
        self.threads = so.intra_op_num_threads
        self.last_token_logits = last_only
        self.cuda_graph = False  # whether the decode step replays a captured CUDA graph
        state: StepState | DeviceStepState
        sampler: Sampler | DeviceSampler
        if on_cuda:
            from .cuda import create_cuda_runtime

            rt = create_cuda_runtime(
                model,
                spec,
                so,
                max_length=self.max_length,
                last_token_logits=edited,
                cuda_graph=cuda_graph,
                sampler_impl=sampler_impl,
                max_batch=self.max_batch,
            )
            self.session, state, sampler, self.cuda_graph = rt.session, rt.state, rt.sampler, rt.cuda_graph
        else:
            where = str(spec.model_path) + (" (with its external data)" if spec.has_external_data else "")
            self.session = create_session(model, self.provider, so, source=where)
            state = StepState(
                self.session, spec, batch=self.max_batch, max_length=self.max_length, last_token_logits=last_only
            )
            sampler = Sampler(self.max_batch, spec.vocab_size, impl=sampler_impl)
        no_speculation = no_multi
        if no_multi is None and last_only:
            no_speculation = (
                "this Engine computes the last position's logits only (last_token_logits=True); create it with "
                "speculation='prompt_lookup' (or last_token_logits=False) to verify drafts"
            )
        elif no_multi is None and logits_positions_pruned(self.session, spec.logits.name):
            no_speculation = (
                f"{spec.model_path}: the graph's LM head returns the last position only, so drafts cannot be "
                "verified; export the model with logits for every position"
            )
            if self.speculation is not None:
                raise UnsupportedModelError(f"speculation: {no_speculation}")
        if self.speculation_plain is not None:
            no_speculation = None  # requests may ask for it: they take plain steps (drafter None)
        drafter = None
        if no_speculation is None and self.speculation_plain is None:
            cast(StepState, state).enable_multi_token(spec_cfg.width)
            drafter = PromptLookupDrafter(spec_cfg)
        self._ctx = DecodeContext(
            spec=spec,
            state=state,
            sampler=sampler,
            out_ids=np.zeros((self.max_batch, self.max_length), dtype=np.int64),  # (max_batch, max_length) int64
            eos=eos_ids,
            tokenizer=self.tokenizer,
            max_length=self.max_length,
            max_batch=self.max_batch,
            drafter=drafter,
            prefix=PrefixCache(self.max_length, spec.coarse_activations is not None) if no_multi is None else None,
        )
        self._requests = RequestPreparer(
            spec,
            self.tokenizer,
            self.max_length,
            speculation=self.speculation,
            prefix_cache=prefix_cache,
            no_speculation=no_speculation,
            no_prefix_cache=None if no_multi is None else f"prefix_cache: {no_multi}",
        )
        self._lock = EngineLock()
        self._batcher = AutoBatcher(self._lock, self._ctx) if auto_batch else None
        self._freed = False
        self.chat_template: str | None = load_chat_template(spec.model_dir)
        if warmup:
            self._warmup()

    def _warmup(self) -> None:
        """One short request at load, so the first real request does not pay ORT's first-run costs
        (lazy kernel setup, the first touch of the KV buffers)."""
        room = min(2, self.max_length - 1)
        req = self._requests.one([0] * room, 1, None, {}, text=False)
        self._lock.run(lambda: run_to_end(generate_single(self._ctx, req)))

    # ----------------------------------------------------------------------------------------
    # setup checks

    def _check_max_length(self, max_length: int | None) -> int:
        ctx = self.spec.context_length
        rows = self.spec.rope_cache_rows
        if rows is not None and rows < 2:
            raise ModelLoadError(f"{self.spec.model_path}: the GroupQueryAttention cos/sin cache has {rows} row(s)")
        if max_length is None:
            return min(ctx, DEFAULT_MAX_LENGTH, rows or ctx)
        if not isinstance(max_length, (int, np.integer)) or isinstance(max_length, bool) or max_length < 2:
            raise InvalidRequestError(f"max_length must be an int >= 2, got {max_length!r}")
        if max_length > ctx:
            what = "rows of the rotary cos/sin cache" if self.spec.layout is KVLayout.GQA_SHARED else "positions"
            raise InvalidRequestError(
                f"max_length {max_length} exceeds the model's context_length {ctx} ({what}); "
                f"allowed: 2..{min(ctx, rows or ctx)}"
            )
        if rows is not None and max_length > rows:
            raise InvalidRequestError(
                f"max_length {max_length} exceeds the {rows} rows of the model's GroupQueryAttention cos/sin "
                f"cache (its config says context_length {ctx}; positions past the cache cannot be rotated); "
                f"allowed: 2..{min(rows, ctx)}"
            )
        return max_length

    def _check_memory(self) -> None:
        est = self.memory_estimate
        _log.info("host memory for max_length %d x max_batch %d: %s", self.max_length, self.max_batch, est.describe())
        avail = _available_memory()
        if avail is not None and est.total > 0.8 * avail:
            raise InsufficientMemoryError(
                f"an engine of max_length {self.max_length} x max_batch {self.max_batch} needs {est.describe()} "
                f"({self.spec.kv_bytes_per_token} KV bytes/token/row) but only {avail / 2**30:.2f} GiB is "
                "available; pass a smaller max_length or max_batch"
            )

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of KV cache the engine holds now (the preallocated buffers for GQA models; 0 once closed)."""
        return 0 if self._freed else self._ctx.state.kv_nbytes

    @property
    def spec(self) -> ModelSpec:
        """The model's config, derived from its folder and graph at load."""
        return self._spec

    @spec.setter
    def spec(self, spec: ModelSpec) -> None:  # tests swap it (e.g. a LongRoPE switch length)
        self._spec = spec
        if hasattr(self, "_ctx"):
            self._ctx.spec = spec

    # what tests and perf tools swap or read (the loops get them through the context)
    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The ids that end a request (settable: perf runs clear it to decode exactly n tokens)."""
        return self._ctx.eos

    @eos_token_ids.setter
    def eos_token_ids(self, ids: frozenset[int]) -> None:
        self._ctx.eos = frozenset(ids)

    @property
    def _state(self) -> Any:
        return self._ctx.state

    @_state.setter
    def _state(self, state: Any) -> None:
        self._ctx.state = state

    @property
    def _sampler(self) -> Any:
        return self._ctx.sampler

    @_sampler.setter
    def _sampler(self, sampler: Any) -> None:
        self._ctx.sampler = sampler

    @property
    def _lookahead(self) -> bool:
        """CUDA: run the loop one step ahead of the host (False: every step waits; for measuring)."""
        return self._ctx.lookahead

    @_lookahead.setter
    def _lookahead(self, on: bool) -> None:
        self._ctx.lookahead = on

    # ----------------------------------------------------------------------------------------
    # public API

    @overload
    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int | None = None,
        *,
        stop: Sequence[str] | str | None = None,
        **sampling: Any,
    ) -> GenerationResult: ...

    @overload
    def generate(
        self,
        prompt: Sequence[str | Sequence[int] | np.ndarray],
        max_new_tokens: int | Sequence[int] | None = None,
        *,
        stop: Sequence[str] | str | None = None,
        **sampling: Any,
    ) -> list[GenerationResult]: ...

    @overload
    def generate(
        self,
        prompt: np.ndarray,
        max_new_tokens: int | Sequence[int] | None = None,
        *,
        stop: Sequence[str] | str | None = None,
        **sampling: Any,
    ) -> GenerationResult | list[GenerationResult]: ...

    def generate(
        self,
        prompt: Prompt | Sequence[Prompt],
        max_new_tokens: int | Sequence[int] | None = None,
        *,
        stop: Sequence[str] | str | None = None,
        **sampling: Any,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate a continuation of ``prompt`` (text, or token ids used as given: no BOS added).

        Greedy unless ``do_sample=True`` (or the model's genai_config search section says so).
        Sampling arguments: ``do_sample, temperature, top_k, top_p, min_p, repetition_penalty,
        presence_penalty, frequency_penalty, logit_bias, seed, logprobs``. ``max_new_tokens``
        defaults to the room left in ``max_length``. Stops at any EOS id, at a ``stop`` string
        (not included in the text) or after ``max_new_tokens``.

        A batch: ``prompt`` a list of prompts (strs or lists of ids, or a 2-D id array) gives a list
        of results, one per prompt, each with its own finish_reason and stats; the Engine's
        ``max_batch`` prompts share each forward pass. ``max_new_tokens`` and each sampling
        argument take one value for all rows or a list of one per row; its default is the room the
        longest prompt leaves. Every row's tokens equal those of the same request made alone (a
        seeded row draws the stream that seed gives alone: give rows different seeds for different
        samples).

        Raises :class:`~engine.errors.InvalidRequestError` (a ValueError) for bad arguments and
        :class:`~engine.errors.ContextLengthError` when the request does not fit ``max_length``.
        """
        self._check_open()
        if is_batch(prompt):
            reqs = self._requests.batch(cast(Sequence[Any], prompt), max_new_tokens, stop, sampling, text=False)
            return self._lock.run(lambda: self._run_all(reqs))
        if not isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens is not None:
            raise InvalidRequestError(
                f"max_new_tokens must be a positive int for one prompt, got {max_new_tokens!r} "
                "(a list of values is for a batch of prompts)"
            )
        req = self._requests.one(cast(Prompt, prompt), max_new_tokens, stop, sampling, text=False)
        if self._batcher is not None:
            return self._batcher.submit(req)
        return self._lock.run(lambda: run_to_end(generate_single(self._ctx, req)))

    def _run_all(self, reqs: list[Request]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(reqs)
        for i, _, _, result in run_requests(self._ctx, reqs):
            if result is not None:
                results[i] = result
        return cast(list[GenerationResult], results)

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int | None = None,
        *,
        stop: Sequence[str] | str | None = None,
        **sampling: Any,
    ) -> Stream[StreamChunk]:
        """Like :meth:`generate`, yielding a :class:`StreamChunk` per token as it is decoded.

        The arguments are checked at the call. The returned :class:`~engine.scheduler.Stream` is an
        iterator; ``close()`` it (or use ``with eng.stream(...) as s:``) to end it early, and read
        ``s.result`` after the last chunk. Between chunks the stream does not block the engine for
        good: a stream left suspended gives way to other requests and recomputes its cache when
        advanced again. One prompt only (batches go to :meth:`stream_batch`).
        """
        self._check_open()
        if is_batch(prompt):
            raise InvalidRequestError("stream() takes one prompt; pass a list of prompts to stream_batch() for a batch")
        req = self._requests.one(prompt, max_new_tokens, stop, sampling, text=True)
        return Stream(self._lock, generate_single(self._ctx, req), lambda: evict(self._ctx, req))

    def stream_batch(
        self,
        prompts: Sequence[Prompt] | np.ndarray,
        max_new_tokens: int | Sequence[int] | None = None,
        *,
        stop: Sequence[str] | str | None = None,
        **sampling: Any,
    ) -> Stream[tuple[int, StreamChunk]]:
        """A batch as :meth:`generate` runs it, yielding ``(row, chunk)`` for every token as it is
        decoded: the rows of a step in turn, then the next step. Each row's last chunk has its
        ``finish_reason``; its chunks' texts joined equal its ``text`` in ``generate()``. Arguments
        are checked at the call; ``close()`` ends the batch. ``s.results`` holds the rows' results
        after the last chunk. A batch stream left suspended while another caller needs the engine
        is ended (its next chunk raises)."""
        self._check_open()
        if not is_batch(prompts):
            raise InvalidRequestError("stream_batch() takes a list of prompts (strs or lists of ids) or a 2-D id array")
        reqs = self._requests.batch(cast(Sequence[Any], prompts), max_new_tokens, stop, sampling, text=True)
        evicted = threading.Event()
        return Stream(self._lock, self._batch_chunks(reqs, evicted), evicted.set)

    def _batch_chunks(
        self, reqs: list[Request], evicted: threading.Event
    ) -> Generator[tuple[int, StreamChunk], None, list[GenerationResult]]:
        """stream_batch's loop: ``(row, chunk)`` per token; returns the rows' results."""
        results: list[GenerationResult | None] = [None] * len(reqs)
        for i, _, chunk, result in run_requests(self._ctx, reqs):
            if result is not None:
                results[i] = result
            yield i, chunk
            if evicted.is_set():
                raise InvalidRequestError(
                    "this stream_batch was left suspended while another caller needed the engine, and was ended"
                )
        return cast(list[GenerationResult], results)

    def submit(
        self,
        prompt: Prompt,
        max_new_tokens: int | None = None,
        *,
        stop: Sequence[str] | str | None = None,
        on_chunk: Callable[[StreamChunk], None] | None = None,
        on_done: Callable[[Ticket], None] | None = None,
        **sampling: Any,
    ) -> Ticket:
        """auto_batch engines: check one request and queue it without waiting (a server's path).
        ``on_chunk(chunk)`` gets every :class:`StreamChunk` on the worker thread as it is decoded,
        ``on_done(ticket)`` its end (``ticket.result`` or ``ticket.error``); both must be quick and
        not raise. ``ticket.request.cancel()`` frees its batch row at the next step. Arguments are
        checked here and raise as in :meth:`generate`."""
        self._check_open()
        if self._batcher is None:
            raise InvalidRequestError("submit() needs an Engine created with auto_batch=True")
        if is_batch(prompt):
            raise InvalidRequestError("submit() takes one prompt (a str or a list of token ids)")
        req = self._requests.one(prompt, max_new_tokens, stop, sampling, text=on_chunk is not None)
        return self._batcher.enqueue(req, on_chunk, on_done)

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template (the Phi format when the
        folder has none), generation prompt added, tokenized without adding special tokens."""
        if self.tokenizer is None:
            raise InvalidRequestError(f"{self.spec.model_dir} has no tokenizer: chat needs one")
        tok = self.tokenizer
        bos = tok.id_to_piece(tok.bos_token_id) if tok.bos_token_id is not None else ""
        eos = tok.id_to_piece(tok.eos_token_ids[0]) if tok.eos_token_ids else ""
        text = render_chat(messages, self.chat_template, bos_token=bos, eos_token=eos)
        try:
            return tok.encode(text, add_special_tokens=False)
        except (RuntimeError, TypeError, ValueError) as e:  # the tokenizers' own errors on odd text
            raise InvalidRequestError(f"the tokenizer cannot encode the rendered chat: {e}") from e

    def chat(
        self, messages: Sequence[Mapping[str, str]], max_new_tokens: int | None = None, **kwargs: Any
    ) -> GenerationResult:
        """Answer a conversation (``[{"role": "system"|"user"|"assistant", "content": str}, ...]``).

        Takes the same keyword arguments as :meth:`generate`."""
        return self.generate(self.render_chat(messages), max_new_tokens, **kwargs)

    def stream_chat(
        self, messages: Sequence[Mapping[str, str]], max_new_tokens: int | None = None, **kwargs: Any
    ) -> Stream[StreamChunk]:
        """Streaming :meth:`chat`."""
        return self.stream(self.render_chat(messages), max_new_tokens, **kwargs)

    def _check_open(self) -> None:
        if self._lock.closed:
            raise InvalidRequestError(CLOSED)

    def close(self) -> None:
        """Free the session and every buffer, after the request or chunk running now (if any).
        Later calls raise InvalidRequestError; an open stream's next chunk too; closing again does
        nothing. ``with Engine(...) as eng:`` closes at the end of the block."""
        self._lock.close(self._free)
        if self._batcher is not None:
            self._batcher.fail_queued(InvalidRequestError(CLOSED))

    def _free(self) -> None:
        """Drop the session and buffers (the engine is held)."""
        if not self._freed:
            self._freed = True
            self._ctx.state.release()  # bound (device) tensors first
            del self._ctx.state, self._ctx.sampler, self.session
            self._ctx.prefix = None
            self._ctx.out_ids = np.zeros((0, 0), np.int64)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"Engine({str(s.model_dir)!r}, provider={self.provider!r}, layout={s.layout.value}, "
            f"layers={s.num_layers}, max_length={self.max_length}, threads={self.threads})"
        )


def generate(
    model_dir: str | os.PathLike[str],
    prompt: str | Sequence[int],
    max_new_tokens: int | None = None,
    *,
    provider: str = "cpu",
    **kwargs: Any,
) -> GenerationResult:
    """One-shot convenience: load ``model_dir``, generate once, return the result."""
    with Engine(Path(model_dir), provider=provider) as eng:
        return eng.generate(prompt, max_new_tokens, **kwargs)
