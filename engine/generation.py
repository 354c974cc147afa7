"""The hot path: ``prefill``, ``decode_one_token`` and ``generate``.

One request::

    prompt -> tokenizer -> prompt ids
      prefill: one run over the prompt, KV written into the cache, last position's logits
      decode loop: sampler writes the next id straight into the bound input_ids buffer
                   -> stop checks -> decode_one_token (bind mask view of the new width, run)
      -> GenerationResult, or StreamChunks as tokens arrive

Everything the loop touches belongs to the Engine's :class:`~engine.binding.StepState` and
:class:`~engine.sampling.Sampler`, allocated once in ``Engine.__init__`` and reused by every
request. One Engine serves one request at a time; concurrent calls wait on a lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast, overload

import numpy as np

from .binding import StepState
from .chat import load_chat_template, render_chat
from .config import DEFAULT_MAX_LENGTH, KVLayout, ModelSpec, load_model_spec
from .errors import (
    ContextLengthError,
    EngineError,
    InsufficientMemoryError,
    InvalidRequestError,
)
from .graph import load_for_generation
from .kv_cache import kv_cache_bytes_needed
from .providers import CUDA_EP, SessionConfig, create_session, proc_kib_field, resolve_provider, session_options
from .sampling import Sampler, SamplingParams
from .text import IncrementalDetokenizer, StopStringMatcher
from .tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from .cuda import DeviceSampler, DeviceStepState

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_SAMPLING_KEYS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


@dataclass
class GenerationStats:
    """Timings and counts of one request (seconds; ``ttft_s`` counts from the call, tokenization included)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    tokenize_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_s: float = 0.0
    kv_cache_bytes: int = 0


@dataclass
class GenerationResult:
    """What ``generate()`` returns. ``token_ids`` are the new tokens only (the EOS id included when hit)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # 'eos' | 'length' | 'stop'
    stats: GenerationStats
    prompt_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None  # chosen token's log-probability per new token
    top_logprobs: list[dict[int, float]] | None = None  # top-n alternatives per new token


@dataclass
class StreamChunk:
    """One generated token as it arrives; ``finish_reason`` is set on the last chunk only.

    ``text`` is the newly final text (possibly empty while a multi-byte character or a possible
    stop string is still incomplete); the chunks' texts joined equal ``GenerationResult.text``.
    """

    text: str
    token_id: int
    finish_reason: str | None = None
    logprob: float | None = None


@dataclass(eq=False)  # compared by identity (queues hold them; numpy fields have no == of one bool)
class _Request:
    prompt_ids: np.ndarray  # (P,) int64
    max_new_tokens: int
    params: SamplingParams
    stop: StopStringMatcher | None
    detok: IncrementalDetokenizer | None
    t_start: float
    tokenize_s: float
    pieces: list[str] = field(default_factory=list)
    result: GenerationResult | None = None
    error: BaseException | None = None  # set when a batch this request was coalesced into failed
    abandoned: bool = False  # its caller left (interrupted): do not run it


_log = logging.getLogger("engine")
_CLOSED = "this Engine is closed; create a new one"


def estimate_kv_cache_bytes(
    model_dir: str | os.PathLike[str], max_length: int | None = None, max_batch: int = 1
) -> int:
    """Bytes of KV cache ``Engine(model_dir, max_length=..., max_batch=...)`` would need, from the
    model's config alone (nothing is allocated). ``max_length`` defaults as in :class:`Engine`."""
    spec = load_model_spec(model_dir)
    length = min(spec.context_length, DEFAULT_MAX_LENGTH) if max_length is None else max_length
    return kv_cache_bytes_needed(spec, length, max_batch)


def _top_logprobs(sampler: Any, row: int, k: int) -> dict[int, float]:
    """The ``k`` best alternatives the sampler recorded for ``row``: {token id: log-probability}."""
    return {int(i): float(v) for i, v in zip(sampler.top_ids[row, :k], sampler.top_logprobs[row, :k], strict=True)}


def _is_batch(prompt: object) -> bool:
    """A list/tuple holding prompts (strs, sequences of ids or arrays), or a 2-D array of ids.

    One such element makes the whole list a batch, so that a bad element is reported as a bad
    prompt of the batch, by its index."""
    if isinstance(prompt, np.ndarray):
        return prompt.ndim == 2
    return isinstance(prompt, (list, tuple)) and any(isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt)


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
            counts them). 1 (default): a list runs prompt by prompt. CPU only for now.
        auto_batch: coalesce concurrent single-prompt ``generate()`` calls from several threads into
            batches of up to ``max_batch``: whoever gets the engine next runs every request waiting
            then, oldest first (see docs/api.md, Concurrency). Off by default: on INT4 models a
            request's greedy tokens may then depend on what it was batched with.
        cuda_graph: CUDA only (ignored on the CPU): capture the decode step as a CUDA graph.
            ``None`` (default): on for float16 GroupQueryAttention share-buffer models, off otherwise
            (and off with a warning if ORT refuses to capture the model); ``True`` on a model that
            cannot have one raises InvalidRequestError. See engine/cuda.py.
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
        if sampler_impl not in ("auto", "cython", "numpy"):
            raise InvalidRequestError(f"sampler_impl must be 'auto', 'cython' or 'numpy', got {sampler_impl!r}")
        self.spec: ModelSpec = load_model_spec(model_dir)
        spec = self.spec
        self.provider = resolve_provider(provider)
        on_cuda = self.provider == CUDA_EP
        if on_cuda and self.max_batch > 1:
            raise InvalidRequestError(
                f"max_batch={self.max_batch}: batched generation runs on the CPU provider only for now; "
                "use max_batch=1 with provider='cuda'"
            )
        if on_cuda:
            from .cuda import import_cupy, resolve_cuda_graph

            import_cupy()  # fail before loading anything when cupy or the device is missing
            resolve_cuda_graph(spec, cuda_graph)
        elif cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise InvalidRequestError(f"cuda_graph must be True, False or None (auto), got {cuda_graph!r}")
        self.max_length = self._check_max_length(max_length)
        if not on_cuda:
            self._check_memory()  # host memory; a CUDA engine checks the device's after loading the weights
        self.tokenizer: Tokenizer | None = None
        if any((spec.model_dir / f).is_file() for f in _TOKENIZER_FILES):
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
        self.eos_token_ids = frozenset(eos)

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
        model, edited = load_for_generation(spec, last_token_logits)
        if edited and spec.has_external_data:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(spec.model_dir))
        self.threads = so.intra_op_num_threads
        self.last_token_logits = edited
        self.cuda_graph = False  # whether the decode step replays a captured CUDA graph
        # CUDA: run the decode loop one step ahead of the host when the ids are chosen on the device
        # (Engine._steps_ahead); False makes every step wait for its ids (a switch for measurements)
        self._lookahead = True
        self._state: StepState | DeviceStepState
        self._sampler: Sampler | DeviceSampler
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
            )
            self.session, self._state, self._sampler, self.cuda_graph = rt.session, rt.state, rt.sampler, rt.cuda_graph
        else:
            where = str(spec.model_path) + (" (with its external data)" if spec.has_external_data else "")
            self.session = create_session(model, self.provider, so, source=where)
            self._state = StepState(
                self.session, spec, batch=self.max_batch, max_length=self.max_length, last_token_logits=edited
            )
            self._sampler = Sampler(self.max_batch, spec.vocab_size, impl=sampler_impl)
        # (max_batch, max_length) int64: new token ids of a request's rows
        self._out_ids = np.zeros((self.max_batch, self.max_length), dtype=np.int64)
        self._lock = threading.Lock()  # held by whoever runs the engine (a request, a batch, an open stream)
        self._owner: int | None = None  # thread ident of the holder (to refuse a re-entrant call, not hang)
        self._closed = False
        self._freed = False
        self._queue: list[_Request] = []  # auto_batch: single requests waiting to run, oldest first
        self._queue_cv = threading.Condition()  # guards _queue, _worker and the requests' result/error
        self._worker: threading.Thread | None = None  # auto_batch: the thread running queued requests
        self._engine_waiters = 0  # callers other than the worker waiting for the engine lock
        self._closing = False  # close() waits for the engine
        self.chat_template: str | None = load_chat_template(spec.model_dir)
        self.last_result: GenerationResult | None = None  # the latest finished request (stream() included)
        self.last_results: list[GenerationResult] = []  # the rows of the latest batch (generate(list), stream_batch)
        if warmup:
            self._warmup()

    def _warmup(self) -> None:
        """One short request at load, so the first real request does not pay ORT's first-run costs
        (lazy kernel setup, the first touch of the KV buffers). Measured once on the Phi-4-mini-shaped
        model (4 layers), 16-token prompt: first request's TTFT 189 ms without it, 141 ms with it,
        113-122 ms for the requests after."""
        room = min(2, self.max_length - 1)
        self.generate([0] * room, max_new_tokens=1)
        self.last_result = None
        self.last_results = []

    # ----------------------------------------------------------------------------------------
    # setup checks

    def _check_max_length(self, max_length: int | None) -> int:
        ctx = self.spec.context_length
        if max_length is None:
            return min(ctx, DEFAULT_MAX_LENGTH)
        if not isinstance(max_length, (int, np.integer)) or isinstance(max_length, bool) or max_length < 2:
            raise InvalidRequestError(f"max_length must be an int >= 2, got {max_length!r}")
        if max_length > ctx:
            what = "rows of the rotary cos/sin cache" if self.spec.layout is KVLayout.GQA_SHARED else "positions"
            raise InvalidRequestError(
                f"max_length {max_length} exceeds the model's context_length {ctx} ({what}); allowed: 2..{ctx}"
            )
        return max_length

    def _check_memory(self) -> None:
        need = kv_cache_bytes_needed(self.spec, self.max_length, self.max_batch)
        _log.info(
            "KV cache: %d bytes (%.1f MiB) for max_length %d x max_batch %d",
            need,
            need / 2**20,
            self.max_length,
            self.max_batch,
        )
        avail = _available_memory()
        if avail is not None and need > 0.8 * avail:
            raise InsufficientMemoryError(
                f"the KV cache for max_length {self.max_length} x max_batch {self.max_batch} needs "
                f"{need / 2**30:.2f} GiB ({self.spec.kv_bytes_per_token} bytes/token/row) but only "
                f"{avail / 2**30:.2f} GiB is available; pass a smaller max_length or max_batch"
            )

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of KV cache the engine holds now (the preallocated buffers for GQA models; 0 once closed)."""
        return 0 if self._freed else self._state.kv_nbytes

    # ----------------------------------------------------------------------------------------
    # request preparation: everything that can fail happens here, before any state is touched

    def _prompt_ids(self, prompt: str | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is an empty string; give text or a non-empty list of token ids")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InvalidRequestError(
                    f"prompt is not valid Unicode text ({e.reason} at index {e.start}); lone surrogates cannot be "
                    "tokenized"
                ) from None
            if self.tokenizer is None:
                raise InvalidRequestError(
                    f"{self.spec.model_dir} has no tokenizer ({' or '.join(_TOKENIZER_FILES)}): pass token ids"
                )
            return np.asarray(self.tokenizer.encode(prompt, add_special_tokens=True), dtype=np.int64)
        if isinstance(prompt, np.ndarray):
            if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
                raise InvalidRequestError(
                    f"a token-id prompt must be a 1-D integer array, got shape {prompt.shape} dtype {prompt.dtype}"
                )
            if prompt.dtype.kind == "u" and prompt.size and int(prompt.max()) >= self.spec.vocab_size:
                raise InvalidRequestError(
                    f"token id {int(prompt.max())} is outside the vocabulary; allowed: 0..{self.spec.vocab_size - 1}"
                )
            ids = prompt.astype(np.int64)
        elif isinstance(prompt, (list, tuple)):
            bad = [t for t in prompt if not isinstance(t, (int, np.integer)) or isinstance(t, bool)]
            if bad:
                raise InvalidRequestError(
                    f"token ids must be ints, found {bad[0]!r} ({type(bad[0]).__name__}); "
                    "a batch is a list of prompts, each a str or a list of ints"
                )
            ids = np.asarray(prompt, dtype=np.int64)
        else:
            raise InvalidRequestError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if ids.size == 0:
            raise InvalidRequestError("prompt has no tokens; give at least one token id")
        vocab = self.spec.vocab_size
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise InvalidRequestError(
                f"token id {lo if lo < 0 else hi} is outside the vocabulary; allowed: 0..{vocab - 1}"
            )
        return ids

    def _prepare(
        self,
        prompt: str | Sequence[int] | np.ndarray,
        max_new_tokens: int | None,
        stop: Sequence[str] | str | None,
        sampling: Mapping[str, Any],
        stream: bool,
    ) -> _Request:
        t_start = time.perf_counter()
        unknown = set(sampling) - _SAMPLING_KEYS
        if unknown:
            raise InvalidRequestError(
                f"unknown argument(s) {', '.join(sorted(unknown))}; "
                f"sampling arguments are {', '.join(sorted(_SAMPLING_KEYS))}"
            )
        ids = self._prompt_ids(prompt)
        tokenize_s = time.perf_counter() - t_start
        n = int(ids.size)
        room = self.max_length - n
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {n} tokens but max_length is {self.max_length}: it leaves no room for a new token; "
                f"shorten the prompt or create the Engine with a larger max_length (<= {self.spec.context_length})"
            )
        if max_new_tokens is None:
            max_new_tokens = room
        elif not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool):
            raise InvalidRequestError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        elif max_new_tokens <= 0:
            raise InvalidRequestError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        elif n + max_new_tokens > self.max_length:
            raise ContextLengthError(
                f"prompt ({n} tokens) + max_new_tokens ({max_new_tokens}) = {n + max_new_tokens} exceeds "
                f"max_length {self.max_length}; allowed max_new_tokens here: 1..{room}"
            )
        params = SamplingParams.from_search_config(self.spec.search, **sampling)
        params.validate(self.spec.vocab_size)
        if isinstance(stop, str):
            stop = [stop]
        matcher = None
        if stop:
            if self.tokenizer is None:
                raise InvalidRequestError("stop strings need a tokenizer, and this model folder has none")
            matcher = StopStringMatcher(stop)
        detok = None
        if self.tokenizer is not None and (stream or matcher is not None):
            detok = IncrementalDetokenizer(self.tokenizer, ids.tolist())
        return _Request(ids, int(max_new_tokens), params, matcher, detok, t_start, tokenize_s)

    # ----------------------------------------------------------------------------------------
    # the loop

    def _steps(self, req: _Request, stream: bool) -> Iterator[StreamChunk]:
        """Prefill, then decode until EOS, a stop string or max_new_tokens. Sets ``req.result``."""
        st, sampler, out = self._state, self._sampler, self._out_ids[0]
        host_ids = st.host_ids  # (batch,) host ids the sampler leaves; on the CPU this is next_ids itself
        eos = self.eos_token_ids
        switch = self.spec.rope_switch_length  # None for most models
        want_logprobs = req.params.logprobs is not None
        logprobs: list[float] = []
        top: list[dict[int, float]] = []
        sampler.reset(req.params, [req.prompt_ids])
        # the decode steps run at lengths P .. P + max_new_tokens - 2; one at the switch re-prefills
        crosses = switch is not None and len(req.prompt_ids) <= switch <= len(req.prompt_ids) + req.max_new_tokens - 2
        if self._lookahead and getattr(sampler, "on_device", False) and not want_logprobs and not crosses:
            yield from self._steps_ahead(req, stream)
            return

        t0 = time.perf_counter()
        logits = st.prefill(req.prompt_ids[None, :])
        sampler.sample(logits, st.next_ids)
        t_first = time.perf_counter()
        n = 0
        while True:
            tok = int(host_ids[0])
            out[n] = tok
            n += 1
            finish, last, piece = self._token_end(req, tok, n, eos)
            if want_logprobs:
                logprobs.append(float(sampler.logprobs[0]))
                k = req.params.logprobs or 0
                top.append(_top_logprobs(sampler, 0, k))
            if stream and piece is not None:
                yield StreamChunk(piece, tok, finish if last else None, logprobs[-1] if want_logprobs else None)
            if last:
                break
            if st.length == switch:
                # LongRoPE crossing: recompute the whole cache with the long-context factors
                logits = st.prefill(np.concatenate((req.prompt_ids, out[:n]))[None, :])
            else:
                logits = st.decode_one_token()
            sampler.sample(logits, st.next_ids)
        t_end = time.perf_counter()
        req.result = self._result(req, out[:n], finish, (t0, t_first, t_end), logprobs if want_logprobs else None, top)
        self.last_result = req.result

    def _steps_ahead(self, req: _Request, stream: bool) -> Iterator[StreamChunk]:
        """:meth:`_steps` for a device sampler that chooses the ids on the device (CUDA greedy / top-k /
        top-p): the loop runs one step ahead of the host. The step for token ``n + 1`` (it reads
        token ``n`` from the device ids buffer) is enqueued before the host waits for token ``n``,
        so the GPU works while the host handles a token (stop checks, text, the caller's
        stream). The ids alternate between two page-locked slots. When token ``n`` ends the request
        (EOS, a stop string) the step enqueued after it is dropped: its KV row lies past the
        request's end, and the next request's prompt overwrites it. The first token is waited for
        before step 1 is queued, so the time to first token does not include queueing a step (without
        CUDA graphs that is ORT launching every kernel from the host)."""
        st, sampler, out = self._state, self._sampler, self._out_ids[0]
        eos = self.eos_token_ids
        limit = req.max_new_tokens
        t0 = time.perf_counter()
        sampler.enqueue(st.prefill(req.prompt_ids[None, :]), st.next_ids, 0)
        t_first = 0.0
        n = 0
        while True:
            if n == 0:
                tok = int(sampler.wait(0)[0])
                t_first = time.perf_counter()
                if limit > 1:
                    sampler.enqueue(st.decode_one_token(), st.next_ids, 1)
            else:
                if n + 1 < limit:  # token n + 1 may be wanted: enqueue its step now
                    sampler.enqueue(st.decode_one_token(), st.next_ids, (n + 1) & 1)
                tok = int(sampler.wait(n & 1)[0])
            out[n] = tok
            n += 1
            finish, last, piece = self._token_end(req, tok, n, eos)
            if stream and piece is not None:
                yield StreamChunk(piece, tok, finish if last else None, None)
            if last:
                break
        t_end = time.perf_counter()
        req.result = self._result(req, out[:n], finish, (t0, t_first, t_end), None, [])
        self.last_result = req.result

    def _batch_steps(
        self, reqs: list[_Request], stream: bool = False, joining: bool = False
    ) -> Iterator[tuple[int, StreamChunk]]:
        """Prefill ``reqs`` together, then decode them one forward per step until every row has
        stopped; a stopped row is masked and no longer counted, and its result is set at once.
        With ``stream``, yields ``(row, chunk)`` for every token as it is decoded.

        ``joining`` (the auto_batch worker, share-buffer GQA caches): waiting requests join the
        running batch between steps, on stopped rows or new ones (appended to ``reqs`` when taken
        from the queue), each finished row wakes its caller, and a row whose caller has left
        (``abandoned``) stops at once."""
        st, sampler, out, finished = self._state, self._sampler, self._out_ids, self._state.finished
        host_ids = st.host_ids
        eos = self.eos_token_ids
        n = len(reqs)
        sampler.reset([r.params for r in reqs], [r.prompt_ids for r in reqs])
        rows = list(reqs)  # row -> the request on it (a stopped row's may be replaced by a joining one)
        want = [r.params.logprobs is not None for r in rows]
        logprobs: list[list[float]] = [[] for _ in rows]
        top: list[list[dict[int, float]]] = [[] for _ in rows]
        counts = [0] * n
        finish = ["length"] * n
        max_steps = max(r.max_new_tokens for r in reqs) - 1

        t0 = time.perf_counter()
        logits = st.prefill_rows([r.prompt_ids for r in reqs], max_steps)
        sampler.sample(logits, st.next_ids, n)
        t_first = time.perf_counter()
        times = [(t0, t_first)] * n  # per row: its prefill start, its first token
        live = n
        while True:
            for b in range(n):
                if finished[b]:
                    continue
                req = rows[b]
                if req.abandoned:  # its caller left: stop the row, no result
                    finished[b] = 1
                    live -= 1
                    continue
                tok = int(host_ids[b])
                out[b, counts[b]] = tok
                counts[b] += 1
                last = False
                if tok in eos:
                    finish[b], last = "eos", True
                elif counts[b] >= req.max_new_tokens:
                    last = True
                if want[b]:
                    logprobs[b].append(float(sampler.logprobs[b]))
                    top[b].append(_top_logprobs(sampler, b, req.params.logprobs or 0))
                if req.detok is not None:
                    piece, stopped = self._text_of(req, tok, last)
                    if stopped:
                        finish[b], last = "stop", True
                    req.pieces.append(piece)
                if last:
                    finished[b] = 1  # masked from the next step on
                    lp = logprobs[b] if want[b] else None
                    ids = out[b, : counts[b]]
                    req.result = self._result(req, ids, finish[b], (*times[b], time.perf_counter()), lp, top[b])
                    live -= 1
                    if joining:
                        with self._queue_cv:
                            self._queue_cv.notify_all()  # its caller returns now
                if stream:
                    lp_b = logprobs[b][-1] if want[b] else None
                    text = req.pieces[-1] if req.detok is not None else ""  # no tokenizer: ids only
                    yield b, StreamChunk(text, tok, finish[b] if last else None, lp_b)
            if not live and not (joining and self._joiners(finished, n, st.length + 1, take=False)):
                break
            logits = st.decode_rows()
            joiners = self._joiners(finished, n, st.length, take=True) if joining else []
            reqs.extend(r for _, r in joiners)  # in the group from now on (an error reaches them too)
            t_join = time.perf_counter()
            for b, req in joiners:
                st.join_row(b, req.prompt_ids, req.max_new_tokens - 1)
                sampler.reset_row(b, req.params, req.prompt_ids)
                if b == n:
                    n += 1
                    rows.append(req)
                    for lst, empty in ((want, False), (counts, 0), (finish, "")):
                        lst.append(empty)
                    logprobs.append([])
                    top.append([])
                    times.append((t_join, t_join))
                rows[b], want[b], counts[b], finish[b] = req, req.params.logprobs is not None, 0, "length"
                logprobs[b], top[b] = [], []
                live += 1
            sampler.sample(logits, st.next_ids, n)
            for b, _ in joiners:
                times[b] = (t_join, time.perf_counter())
        self.last_result = reqs[-1].result

    def _joiners(self, finished: np.ndarray, n: int, width: int, take: bool) -> list[tuple[int, _Request]]:
        """Waiting requests that can join the running batch at ``width``, oldest first, each with
        its row (a stopped row or a new one); with ``take``, taken out of the queue. None while a
        caller or close() waits for the engine: the batch then drains and lets it go."""
        if not self._queue or self._make_way():
            return []
        free = [b for b in range(n) if finished[b]] + list(range(n, self.max_batch))
        switch = self.spec.rope_switch_length
        joiners = []
        with self._queue_cv:
            for r in list(self._queue):
                if not free:
                    break
                end = width + r.max_new_tokens - 1  # the width when its last token is decoded
                if r.abandoned:
                    if take:
                        self._queue.remove(r)
                elif r.prompt_ids.size <= width and end <= self.max_length and (switch is None or end <= switch):
                    if take:
                        self._queue.remove(r)
                    joiners.append((free.pop(0), r))
        return joiners

    def _batchable(self, reqs: list[_Request]) -> bool:
        """Whether ``reqs`` can share forward passes (else they run one by one, with the same results)."""
        if len(reqs) < 2 or self._state.packed_mask is None:
            return False
        if self.spec.layout is not KVLayout.GQA_SHARED and self.spec.position_ids is None:
            # a growing-cache model without position_ids takes positions from the past length,
            # which left padding would shift for every row shorter than the longest
            return False
        width = max(r.prompt_ids.size for r in reqs)
        steps = max(r.max_new_tokens for r in reqs)
        # left padding: the batch is as long as its longest prompt plus its longest generation
        if width + steps > self.max_length:
            return False
        switch = self.spec.rope_switch_length
        # a LongRoPE switch applies to the whole batch at once: keep batches below it
        return switch is None or width + steps <= switch

    def _joinable(self, group: list[_Request]) -> bool:
        """Whether a coalesced group can run as a batch that other requests join while it runs."""
        if self.spec.layout is not KVLayout.GQA_SHARED or self._state.packed_mask is None:
            return False
        if len(group) > 1:
            return self._batchable(group)
        switch = self.spec.rope_switch_length
        r = group[0]
        return switch is None or r.prompt_ids.size + r.max_new_tokens <= switch

    def _prepare_batch(
        self,
        prompts: Sequence[Any] | np.ndarray,
        max_new_tokens: int | Sequence[int] | None,
        stop: Sequence[str] | str | None,
        sampling: Mapping[str, Any],
        stream: bool = False,
    ) -> list[_Request]:
        """Check every row of a batch before anything runs; per-row values are lists of one per prompt."""
        t_start = time.perf_counter()
        n = len(prompts)
        if n == 0:
            raise InvalidRequestError("the batch is empty; give at least one prompt")

        def per_row(name: str, value: Any) -> list[Any]:
            if isinstance(value, np.ndarray) and value.ndim == 1:
                value = value.tolist()
            if isinstance(value, (list, tuple)):
                if len(value) != n:
                    raise InvalidRequestError(
                        f"{name} has {len(value)} entries for {n} prompts; give one value, or one per prompt"
                    )
                return list(value)
            return [value] * n

        rows_new = per_row("max_new_tokens", max_new_tokens)
        rows_sampling = [dict.fromkeys(sampling) for _ in range(n)]
        for key, value in sampling.items():
            for row, v in zip(rows_sampling, per_row(key, value), strict=True):
                row[key] = v
        ids = [self._in_row(b, self._prompt_ids, prompts[b]) for b in range(n)]  # each prompt tokenized once
        tokenize_s = time.perf_counter() - t_start
        if max_new_tokens is None:
            # one default for the whole batch: the room its longest prompt leaves
            room = self.max_length - max(i.size for i in ids)
            rows_new = [room if room >= 1 else None] * n
        reqs = [self._in_row(b, self._prepare, ids[b], rows_new[b], stop, rows_sampling[b], stream) for b in range(n)]
        for req in reqs:  # every row's clock starts at the call, and the batch's tokenization counts in it
            req.t_start, req.tokenize_s = t_start, tokenize_s
        return reqs

    @staticmethod
    def _in_row(b: int, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` for row ``b`` of a batch: its InvalidRequestError names the row."""
        try:
            return fn(*args)
        except InvalidRequestError as e:
            raise type(e)(f"prompt {b} of the batch: {e}") from e

    def _run_batch_iter(self, reqs: list[_Request], stream: bool) -> Iterator[tuple[int, StreamChunk]]:
        """Run ``reqs`` in groups of ``max_batch`` (the caller holds the engine); with ``stream``,
        yield ``(index in reqs, chunk)`` per token."""
        self.last_results = []
        for start in range(0, len(reqs), self.max_batch):
            group = reqs[start : start + self.max_batch]
            if self._batchable(group):
                for b, chunk in self._batch_steps(group, stream):
                    yield start + b, chunk
            else:
                for i, req in enumerate(group):
                    if req.abandoned:  # auto_batch: its caller left while it waited
                        continue
                    for chunk in self._steps(req, stream):
                        yield start + i, chunk
        self.last_results = [r.result for r in reqs if r.result is not None]

    def _run_batch(self, reqs: list[_Request]) -> list[GenerationResult]:
        """Run ``reqs`` to the end (the caller holds the engine); their results in order."""
        for _ in self._run_batch_iter(reqs, stream=False):
            pass
        results = []
        for r in reqs:
            assert r.result is not None
            results.append(r.result)
        return results

    def _result(
        self,
        req: _Request,
        ids: np.ndarray,
        finish: str,
        times: tuple[float, float, float],
        logprobs: list[float] | None,
        top: list[dict[int, float]],
    ) -> GenerationResult:
        """The finished request's text, ids and stats (``ids``: its new tokens; ``times``: prefill
        start, first token, end)."""
        t0, t_first, t_end = times
        new_ids = ids.tolist()
        n = len(new_ids)
        if req.detok is not None:
            text = "".join(req.pieces)
        elif self.tokenizer is not None:
            text = IncrementalDetokenizer.continuation(self.tokenizer, req.prompt_ids.tolist(), new_ids)
        else:
            text = ""
        decode_s = t_end - t_first
        stats = GenerationStats(
            prompt_tokens=int(req.prompt_ids.size),
            new_tokens=n,
            tokenize_s=req.tokenize_s,
            prefill_s=t_first - t0,
            ttft_s=t_first - req.t_start,
            decode_s=decode_s,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            total_s=t_end - req.t_start,
            kv_cache_bytes=self._state.kv_nbytes,
        )
        return GenerationResult(
            text=text,
            token_ids=new_ids,
            finish_reason=finish,
            stats=stats,
            prompt_ids=req.prompt_ids.tolist(),
            logprobs=logprobs,
            top_logprobs=top if logprobs is not None else None,
        )

    def _token_end(self, req: _Request, tok: int, n: int, eos: frozenset[int]) -> tuple[str, bool, str | None]:
        """After ``tok``, the request's ``n``-th new token: ``(finish reason so far, whether it ends
        the request, its text piece)``. The piece (None without a detokenizer) is appended to
        ``req.pieces``; stop strings are matched in it. Shared by both single-request loops."""
        finish, last = "length", n >= req.max_new_tokens
        if tok in eos:
            finish, last = "eos", True
        piece = None
        if req.detok is not None:
            piece, stopped = self._text_of(req, tok, last)
            if stopped:
                finish, last = "stop", True
            req.pieces.append(piece)
        return finish, last, piece

    @staticmethod
    def _text_of(req: _Request, tok: int, last: bool) -> tuple[str, bool]:
        """Newly final text after ``tok`` (stop strings held back and cut) and whether a stop string hit."""
        assert req.detok is not None
        text = req.detok.push(tok)
        if last:
            text += req.detok.flush()
        if req.stop is None:
            return text, False
        safe, stopped = req.stop.push(text)
        if last and not stopped:
            safe += req.stop.flush()
        return safe, stopped

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
        prompt: str | Sequence[int] | Sequence[str | Sequence[int] | np.ndarray] | np.ndarray,
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
        if _is_batch(prompt):
            reqs = self._prepare_batch(cast(Sequence[Any], prompt), max_new_tokens, stop, sampling)
            with self._engine():
                return self._run_batch(reqs)
        if not isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens is not None:
            raise InvalidRequestError(
                f"max_new_tokens must be a positive int for one prompt, got {max_new_tokens!r} "
                "(a list of values is for a batch of prompts)"
            )
        req = self._prepare(cast(Any, prompt), max_new_tokens, stop, sampling, stream=False)
        if self.auto_batch:
            return self._coalesced(req)
        with self._engine():
            for _ in self._steps(req, stream=False):
                pass
        assert req.result is not None
        return req.result

    @contextlib.contextmanager
    def _engine(self) -> Iterator[None]:
        """Hold the engine (its buffers) for one request, batch or open stream."""
        self._check_usable()
        worker = threading.current_thread() is self._worker
        if not worker:  # counted, so that the auto_batch worker makes way (no starving under load)
            with self._queue_cv:
                self._engine_waiters += 1
        try:
            self._lock.acquire()
        finally:
            if not worker:
                with self._queue_cv:
                    self._engine_waiters -= 1
                    self._queue_cv.notify_all()
        try:
            if self._closed:  # closed while this caller waited
                raise InvalidRequestError(_CLOSED)
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None
                if self._closed:  # close() was called from the thread that held an open stream
                    self._free()
        finally:
            self._lock.release()

    def _check_usable(self) -> None:
        """Refuse a request on a closed Engine, or from the thread that holds an open stream of it
        (which would wait for itself forever)."""
        if self._closed:
            raise InvalidRequestError(_CLOSED)
        if self._owner == threading.get_ident():
            raise InvalidRequestError(
                "this thread already holds the engine (an open stream() not finished or closed): finish or "
                "close it before starting another request on the same Engine"
            )

    def _make_way(self) -> bool:
        """auto_batch: whether the worker should stop taking requests and let the engine go (a
        caller or close() waits for it)."""
        return self._engine_waiters > 0 or self._closing

    def _coalesced(self, req: _Request) -> GenerationResult:
        """auto_batch: queue ``req`` for the worker thread and wait until it has run.

        The worker (started on demand, gone when the queue is empty) holds the engine and runs the
        oldest waiting request with the later ones that can share its batch, which others may
        join while it runs; every caller returns as soon as its own request has finished. A caller
        interrupted while it waits leaves: its request is dropped (or its row stopped)."""
        self._check_usable()
        with self._queue_cv:
            self._queue.append(req)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="engine-auto-batch", daemon=True)
                self._worker.start()
            try:
                while req.result is None and req.error is None:
                    # timed, so that an interrupt aimed at this thread is taken within a quarter second
                    self._queue_cv.wait(0.25)
            except BaseException:  # KeyboardInterrupt while waiting: the request is dropped
                req.abandoned = True
                if req in self._queue:
                    self._queue.remove(req)
                raise
        if req.result is None:
            assert req.error is not None
            raise req.error
        return req.result

    def _work(self) -> None:
        """The auto_batch worker: run queued requests until the queue is empty, then end."""
        while True:
            try:
                with self._engine():
                    while not self._make_way():
                        group = self._next_group()
                        if not group:
                            break
                        self._run_group(group)
            except BaseException as e:  # the engine was closed (or the worker itself failed)
                with self._queue_cv:
                    failed = e if isinstance(e, EngineError) else EngineError(f"{type(e).__name__}: {e}")
                    for r in self._queue:
                        r.error = failed
                    self._queue.clear()
                    self._worker = None
                    self._queue_cv.notify_all()
                return
            with self._queue_cv:
                # a caller (or close()) waiting for the engine takes it before more requests run
                while self._make_way() and not self._closed:
                    self._queue_cv.wait(0.05)
                if not self._queue:  # decided under the lock the callers enqueue with
                    self._worker = None
                    return

    def _next_group(self) -> list[_Request]:
        """Take the oldest waiting request and the later ones that can share its batch (up to
        ``max_batch``) out of the queue."""
        with self._queue_cv:
            group: list[_Request] = []
            for r in list(self._queue):
                if len(group) == self.max_batch:
                    break
                if r.abandoned:
                    self._queue.remove(r)
                elif not group or self._batchable([*group, r]):
                    group.append(r)
                    self._queue.remove(r)
            return group

    def _run_group(self, group: list[_Request]) -> None:
        """Run a coalesced group (the worker holds the engine): on a share-buffer GQA cache as a
        batch that later requests may join (appended to ``group``). A failure is given to every
        request of the group that has no result, as an EngineError, and the worker goes on."""
        try:
            steps = (
                self._batch_steps(group, joining=True) if self._joinable(group) else self._run_batch_iter(group, False)
            )
            for _ in steps:
                pass
        except Exception as e:
            with self._queue_cv:
                for r in group:
                    if r.result is None:
                        err = EngineError(f"the batch this request was coalesced into failed: {type(e).__name__}: {e}")
                        err.__cause__ = e
                        r.error = err
        finally:
            with self._queue_cv:
                self._queue_cv.notify_all()

    def stream(
        self,
        prompt: str | Sequence[int] | np.ndarray,
        max_new_tokens: int | None = None,
        *,
        stop: Sequence[str] | str | None = None,
        **sampling: Any,
    ) -> Iterator[StreamChunk]:
        """Like :meth:`generate`, yielding a :class:`StreamChunk` per token as it is decoded.

        The arguments are checked before the first chunk (errors raise at the call). Leaving the
        loop early (or ``close()`` on the iterator) ends the request and frees the engine.
        One prompt only (batches go to :meth:`generate`).
        """
        if _is_batch(prompt):
            raise InvalidRequestError("stream() takes one prompt; pass a list of prompts to generate() for a batch")
        req = self._prepare(prompt, max_new_tokens, stop, sampling, stream=True)
        return self._stream(req)

    def stream_batch(
        self,
        prompts: Sequence[str | Sequence[int] | np.ndarray] | np.ndarray,
        max_new_tokens: int | Sequence[int] | None = None,
        *,
        stop: Sequence[str] | str | None = None,
        **sampling: Any,
    ) -> Iterator[tuple[int, StreamChunk]]:
        """A batch as :meth:`generate` runs it, yielding ``(row, chunk)`` for every token as it is
        decoded: the rows of a step in turn, then the next step. Each row's last chunk has its
        ``finish_reason``; its chunks' texts joined equal its ``text`` in ``generate()``. Rows that
        must run one by one (see :meth:`generate`) stream one after the other. Arguments are checked
        at the call; leaving the loop early (or ``close()``) ends the batch and frees the engine.
        ``eng.last_results`` holds the rows' results after the last chunk."""
        if not _is_batch(prompts):
            raise InvalidRequestError("stream_batch() takes a list of prompts (strs or lists of ids) or a 2-D id array")
        reqs = self._prepare_batch(cast(Sequence[Any], prompts), max_new_tokens, stop, sampling, stream=True)
        return self._stream_batch(reqs)

    def _stream_batch(self, reqs: list[_Request]) -> Iterator[tuple[int, StreamChunk]]:
        with self._engine():
            yield from self._run_batch_iter(reqs, stream=True)

    def _stream(self, req: _Request) -> Iterator[StreamChunk]:
        with self._engine():
            yield from self._steps(req, stream=True)

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template (the Phi format when the
        folder has none), generation prompt added, tokenized without adding special tokens."""
        if self.tokenizer is None:
            raise InvalidRequestError(f"{self.spec.model_dir} has no tokenizer: chat needs one")
        tok = self.tokenizer
        bos = tok.id_to_piece(tok.bos_token_id) if tok.bos_token_id is not None else ""
        eos = tok.id_to_piece(tok.eos_token_ids[0]) if tok.eos_token_ids else ""
        text = render_chat(messages, self.chat_template, bos_token=bos, eos_token=eos)
        return tok.encode(text, add_special_tokens=False)

    def chat(
        self, messages: Sequence[Mapping[str, str]], max_new_tokens: int | None = None, **kwargs: Any
    ) -> GenerationResult:
        """Answer a conversation (``[{"role": "system"|"user"|"assistant", "content": str}, ...]``).

        Takes the same keyword arguments as :meth:`generate`."""
        return self.generate(self.render_chat(messages), max_new_tokens, **kwargs)

    def stream_chat(
        self, messages: Sequence[Mapping[str, str]], max_new_tokens: int | None = None, **kwargs: Any
    ) -> Iterator[StreamChunk]:
        """Streaming :meth:`chat`."""
        return self.stream(self.render_chat(messages), max_new_tokens, **kwargs)

    def close(self) -> None:
        """Free the session and every buffer, after the request running now (if any). Later calls
        raise InvalidRequestError; closing again does nothing. Called from the thread that holds an
        open stream, it refuses new requests at once and frees everything when that stream ends.
        ``with Engine(...) as eng:`` closes at the end of the block."""
        if self._owner == threading.get_ident():  # an open stream of this thread holds the engine
            self._closed = True  # _engine() frees the buffers when the stream releases it
            return
        self._closing = True  # the auto_batch worker stops taking requests and lets the engine go
        with self._lock:
            if self._closed and self._freed:
                return
            self._closed = True
            self._free()

    def _free(self) -> None:
        """Drop the session and buffers (the caller holds the engine lock)."""
        if not self._freed:
            self._freed = True
            release = getattr(self._state, "release", None)  # the CUDA state: bound device tensors first
            if release is not None:
                release()
            del self._state, self._sampler, self.session, self._out_ids
        with self._queue_cv:
            self._queue_cv.notify_all()  # auto_batch callers waiting: they now get "closed"

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
    return Engine(Path(model_dir), provider=provider).generate(prompt, max_new_tokens, **kwargs)
