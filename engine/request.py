"""Requests: the result types, and the one place a request is checked and prepared.

Everything that can be wrong with a request (prompt, lengths, sampling parameters, stop strings)
is found here, before any engine state is touched; the loops in engine/decode.py trust what
they get. Below this layer only the kernels' own argument checks remain.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ContextLengthError, InvalidRequestError, ModelLoadError
from .sampling import SamplingParams
from .speculation import check_mode
from .text import IncrementalDetokenizer, StopStringMatcher

if TYPE_CHECKING:
    from .config import ModelSpec
    from .tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
SAMPLING_KEYS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
ENGINE_KEYS = frozenset({"speculation", "prefix_cache"})  # per-request overrides of Engine options
# stop strings are matched against every new piece of text while the engine is held: bound them
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 16384


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
    drafted_tokens: int = 0  # speculation: drafts verified
    accepted_tokens: int = 0  # speculation: drafts kept (each saved a forward pass)
    cached_prompt_tokens: int = 0  # prefix cache: prompt positions reused from the previous request


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
    stop string is still incomplete; always empty for a model without a tokenizer); the chunks'
    texts joined equal ``GenerationResult.text``.
    """

    text: str
    token_id: int
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None  # with logprobs: the top-n alternatives at this token


@dataclass(eq=False)  # compared by identity (queues hold them; numpy fields have no == of one bool)
class Request:
    """One checked request, ready for a decode loop. The loops read it; only the text state
    (detokenizer, stop matcher), ``cancelled`` and ``resume`` change while it runs."""

    prompt_ids: np.ndarray  # (P,) int64, every id in the vocabulary
    max_new_tokens: int  # >= 1 and P + max_new_tokens <= the engine's max_length
    params: SamplingParams  # validated
    stop: StopStringMatcher | None
    detok: IncrementalDetokenizer | None  # set when text is wanted token by token (streams, stop strings)
    t_start: float  # perf_counter() at the call
    tokenize_s: float
    cancelled: bool = False  # its caller left: its row stops at the next step, with no result
    resume: Any = None  # set while an evicted stream waits to resume (see decode.evict)
    speculation: str | None = None  # 'prompt_lookup': a single request drafts and verifies (batches: plain steps)
    prefix_cache: bool = False  # reuse the cached prefix the previous request left on row 0

    def cancel(self) -> None:
        """Stop this request at the next decode step (a batch row is freed; no result is made)."""
        self.cancelled = True


def is_batch(prompt: object) -> bool:
    """A list/tuple holding prompts (strs, sequences of ids or arrays), or a 2-D array of ids.

    One such element makes the whole list a batch, so that a bad element is reported as a bad
    prompt of the batch, by its index."""
    if isinstance(prompt, np.ndarray):
        return prompt.ndim == 2
    return isinstance(prompt, (list, tuple)) and any(isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt)


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise InvalidRequestError(f"{name} must be a positive int, got {value!r}")
    value = int(value)  # a Python int from here on: numpy integers overflow in the length arithmetic
    if value <= 0:
        raise InvalidRequestError(f"{name} must be >= 1, got {value}")
    return value


def _stop_matcher(stop: Sequence[str] | str | None, has_tokenizer: bool) -> StopStringMatcher | None:
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise InvalidRequestError(f"stop must be a str or a list of strs, got {type(stop).__name__}")
    if not stop:
        return None
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"{len(stop)} stop strings given; allowed: at most {MAX_STOP_STRINGS}")
    total = sum(len(s) for s in stop if isinstance(s, str))
    if total > MAX_STOP_CHARS:
        raise InvalidRequestError(f"the stop strings hold {total} characters in all; allowed: at most {MAX_STOP_CHARS}")
    if not has_tokenizer:
        raise InvalidRequestError("stop strings need a tokenizer, and this model folder has none")
    return StopStringMatcher(stop)


class RequestPreparer:
    """Checks and prepares requests for one engine (its vocabulary, tokenizer and max_length)."""

    def __init__(
        self,
        spec: ModelSpec,
        tokenizer: Tokenizer | None,
        max_length: int,
        *,
        speculation: str | None = None,
        prefix_cache: bool = False,
        no_speculation: str | None = "this Engine cannot run speculation",
        no_prefix_cache: str | None = "this Engine has no prefix cache",
    ) -> None:
        """``speculation`` and ``prefix_cache``: the Engine's defaults for requests;
        ``no_speculation`` / ``no_prefix_cache``: why a request cannot turn them on (None: it can)."""
        self.speculation = speculation
        self.prefix_cache = prefix_cache
        self.no_speculation = no_speculation
        self.no_prefix_cache = no_prefix_cache
        self.spec = spec
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.vocab_size = spec.vocab_size
        try:  # the config's search defaults, checked at load rather than at every request
            SamplingParams.from_search_config(spec.search)
        except (InvalidRequestError, TypeError) as e:
            raise ModelLoadError(f"{spec.model_dir}: genai_config.json search section: {e}") from e

    # ----------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | Sequence[int] | np.ndarray) -> np.ndarray:
        """``prompt`` as a 1-D int64 array of ids in the vocabulary (text is tokenized, BOS added)."""
        if isinstance(prompt, str):
            ids = self._encode(prompt)
            what = "the tokenizer produced token id"
        elif isinstance(prompt, np.ndarray):
            if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
                raise InvalidRequestError(
                    f"a token-id prompt must be a 1-D integer array, got shape {prompt.shape} dtype {prompt.dtype}"
                )
            if prompt.dtype.kind == "u" and prompt.size and int(prompt.max()) >= self.vocab_size:
                raise InvalidRequestError(
                    f"token id {int(prompt.max())} is outside the vocabulary; allowed: 0..{self.vocab_size - 1}"
                )
            ids = prompt.astype(np.int64)
            what = "token id"
        elif isinstance(prompt, (list, tuple)):
            bad = [t for t in prompt if not isinstance(t, (int, np.integer)) or isinstance(t, (bool, np.bool_))]
            if bad:
                raise InvalidRequestError(
                    f"token ids must be ints, found {bad[0]!r} ({type(bad[0]).__name__}); "
                    "a batch is a list of prompts, each a str or a list of ints"
                )
            try:
                ids = np.asarray(prompt, dtype=np.int64)
            except OverflowError:
                big = max((int(t) for t in prompt), key=abs)
                raise InvalidRequestError(
                    f"token id {big} is outside the vocabulary; allowed: 0..{self.vocab_size - 1}"
                ) from None
            what = "token id"
        else:
            raise InvalidRequestError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if ids.size == 0:
            raise InvalidRequestError("prompt has no tokens; give at least one token id")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            extra = " (the tokenizer and the model disagree)" if isinstance(prompt, str) else ""
            raise InvalidRequestError(
                f"{what} {lo if lo < 0 else hi} is outside the vocabulary; allowed: 0..{self.vocab_size - 1}{extra}"
            )
        return ids

    def _encode(self, text: str) -> np.ndarray:
        if not text:
            raise InvalidRequestError("prompt is an empty string; give text or a non-empty list of token ids")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequestError(
                f"prompt is not valid Unicode text ({e.reason} at index {e.start}); lone surrogates cannot be tokenized"
            ) from None
        if self.tokenizer is None:
            raise InvalidRequestError(
                f"{self.spec.model_dir} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): pass token ids"
            )
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=True)
        except (RuntimeError, TypeError, ValueError) as e:  # the tokenizers' own errors on odd text
            raise InvalidRequestError(f"the tokenizer cannot encode the prompt: {e}") from e
        return np.asarray(ids, dtype=np.int64)

    # ----------------------------------------------------------------------------------------
    def one(
        self,
        prompt: str | Sequence[int] | np.ndarray,
        max_new_tokens: int | None,
        stop: Sequence[str] | str | None,
        sampling: Mapping[str, Any],
        *,
        text: bool,
        ids: np.ndarray | None = None,
        t_start: float | None = None,
    ) -> Request:
        """One request. ``text``: its text is wanted token by token (a stream). ``ids``: the prompt
        already tokenized (a batch tokenizes every row first)."""
        t_start = time.perf_counter() if t_start is None else t_start
        speculation, prefix_cache = self._engine_options(sampling)
        sampling = {k: v for k, v in sampling.items() if k not in ENGINE_KEYS}
        unknown = set(sampling) - SAMPLING_KEYS
        if unknown:
            raise InvalidRequestError(
                f"unknown argument(s) {', '.join(sorted(unknown))}; "
                f"sampling arguments are {', '.join(sorted(SAMPLING_KEYS))} "
                f"(and {', '.join(sorted(ENGINE_KEYS))})"
            )
        if ids is None:
            ids = self.prompt_ids(prompt)
        tokenize_s = time.perf_counter() - t_start
        n = int(ids.size)
        room = self.max_length - n
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {n} tokens but max_length is {self.max_length}: it leaves no room for a new token; "
                f"shorten the prompt or create the Engine with a larger max_length (<= {self.spec.context_length})"
            )
        new = room if max_new_tokens is None else _positive_int("max_new_tokens", max_new_tokens)
        if n + new > self.max_length:
            raise ContextLengthError(
                f"prompt ({n} tokens) + max_new_tokens ({new}) = {n + new} exceeds "
                f"max_length {self.max_length}; allowed max_new_tokens here: 1..{room}"
            )
        params = SamplingParams.from_search_config(self.spec.search, **sampling)
        params.validate(self.vocab_size)
        matcher = _stop_matcher(stop, self.tokenizer is not None)
        detok = None
        if self.tokenizer is not None and (text or matcher is not None):
            detok = IncrementalDetokenizer(self.tokenizer, ids.tolist())
        return Request(
            ids, new, params, matcher, detok, t_start, tokenize_s, speculation=speculation, prefix_cache=prefix_cache
        )

    def _engine_options(self, sampling: Mapping[str, Any]) -> tuple[str | None, bool]:
        """The request's speculation mode and prefix-cache switch (the Engine's unless given)."""
        speculation = self.speculation
        if "speculation" in sampling:
            speculation = check_mode(sampling["speculation"])
            if speculation is not None and self.no_speculation is not None:
                raise InvalidRequestError(self.no_speculation)
        prefix_cache = self.prefix_cache
        if "prefix_cache" in sampling:
            prefix_cache = sampling["prefix_cache"]
            if not isinstance(prefix_cache, bool):
                raise InvalidRequestError(f"prefix_cache must be True or False, got {prefix_cache!r}")
            if prefix_cache and self.no_prefix_cache is not None:
                raise InvalidRequestError(self.no_prefix_cache)
        return speculation, prefix_cache

    def batch(
        self,
        prompts: Sequence[Any] | np.ndarray,
        max_new_tokens: int | Sequence[int] | None,
        stop: Sequence[str] | str | None,
        sampling: Mapping[str, Any],
        *,
        text: bool,
    ) -> list[Request]:
        """Every row of a batch checked before anything runs; per-row values are lists of one per
        prompt. An error names its row."""
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
        rows_sampling: list[dict[str, Any]] = [{} for _ in range(n)]
        for key, value in sampling.items():
            for row, v in zip(rows_sampling, per_row(key, value), strict=True):
                row[key] = v
        ids = [_in_row(b, self.prompt_ids, prompts[b]) for b in range(n)]  # each prompt tokenized once
        if max_new_tokens is None:
            # one default for the whole batch: the room its longest prompt leaves
            room = self.max_length - max(i.size for i in ids)
            rows_new = [room if room >= 1 else None] * n
        reqs = [
            _in_row(b, self.one, None, rows_new[b], stop, rows_sampling[b], text=text, ids=ids[b], t_start=t_start)
            for b in range(n)
        ]
        tokenize_s = time.perf_counter() - t_start
        for req in reqs:  # the batch's tokenization counts in every row
            req.tokenize_s = tokenize_s
        return reqs


def _in_row(b: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args)`` for row ``b`` of a batch: its InvalidRequestError names the row."""
    try:
        return fn(*args, **kwargs)
    except InvalidRequestError as e:
        raise type(e)(f"prompt {b} of the batch: {e}") from e
