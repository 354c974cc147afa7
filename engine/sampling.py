"""Token sampling: request parameters, the preallocated :class:`Sampler`, and a numpy reference of every step.

Definition (the compiled kernels in ``kernels/sampling.pyx`` and the numpy reference below compute the
same numbers, bit for bit on x86-64 builds, so a seed gives the same tokens on either path):

1. **Read.** float16 logits are widened to float32 exactly; NaN is read as ``-inf``.
2. **Penalties** (only for tokens whose count in prompt + generated tokens is > 0, float32 arithmetic):
   repetition ``x = x / r if x > 0 else x * r``; then OpenAI presence/frequency
   ``x = x - (presence + frequency * count)``.
3. **Logit bias**: ``x = x + bias[token]``.
4. **Temperature**: ``z = x / T`` in float32, with ``T`` the temperature as float32 (``T = 1`` for
   greedy rows). ``z`` are the *prepared logits*; their maximum is ``m``.
5. **Greedy** (``do_sample`` false, temperature below ``GREEDY_TEMPERATURE``, or ``top_k == 1``): the
   token is the first index of ``m`` (lowest id among ties). No random number is drawn.
6. **Weights**: ``e = exp32(rel(z, m))`` where ``rel(z, m) = 0 if z == m else z - m`` (so a ``+inf``
   logit has weight 1 and every finite one 0) and ``exp32`` is the float32 routine :func:`ref_exp_rel`
   (relative error below 1e-7, 0 below -87). Each weight becomes the integer ``w = rint(e * 2**Q)``
   (round half to even) with ``Q = min(51, 62 - vocab.bit_length())`` (44 for 200,064), so every sum
   is an exact int64 whatever the order it is taken in. A token with ``w == 0`` (probability below
   ~2**-Q of the top token's) cannot be drawn.
7. **Rank**: tokens ordered by ``z`` descending, ties by id ascending.
8. **Top-k** keeps the first ``k`` ranks (``0`` or ``k >= vocab`` = off).
9. **Top-p** keeps the shortest rank prefix whose weight ``c`` satisfies
   ``float64(c) >= top_p * float64(W_k)``, ``W_k`` being the weight of the top-k set; ``1`` = off.
10. **Min-p** keeps tokens with ``rel(z, m) >= log(min_p)`` (the top token always stays); ``0`` = off.
11. **Draw**: ``U`` = the top 53 bits of the next output of the row's splitmix64 stream (``u = U / 2**53``
    for the reference functions); ``S`` = weight of the kept tokens; ``t = (U * S) >> 53``, an integer in
    ``[0, S)``; walking the kept tokens in *increasing id*, the token is the first whose running weight
    exceeds ``t``. Every sampled (non-greedy) row draws exactly one ``U`` per call.
12. **Nothing possible**: when every prepared logit is ``-inf`` (or NaN) the token is 0 and every
    log-probability is ``-inf``.

Log-probabilities (``SamplingParams.logprobs``) are the log-softmax of the prepared logits ``z``: after
penalties, bias and temperature, before top-k/top-p/min-p truncation:
``lp = float32(rel(z, m) - log(W * 2**-Q))`` with ``W`` the weight of the whole row. The top-n
alternatives are the first n ranks.

The compiled path never sorts the vocabulary: top-k uses a heap, top-p first tries the best 64
candidates, then 1,024, and for flat distributions a linear-time radix select on the exact weights.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine._kernels import warn_not_built
from engine.errors import InvalidRequestError

try:
    from engine._kernels import sampling as _ckernels
except ImportError:  # the extension is not built: the numpy reference takes over (with one warning)
    _ckernels = None

__all__ = [
    "GREEDY_TEMPERATURE",
    "MAX_LOGPROBS",
    "Sampler",
    "SamplingParams",
    "argmax",
    "min_p_threshold",
    "ref_apply_logit_bias",
    "ref_apply_penalties",
    "ref_apply_temperature",
    "ref_argmax",
    "ref_exp_rel",
    "ref_log_softmax",
    "ref_min_p_filter",
    "ref_prepare_logits",
    "ref_sample",
    "ref_top_k_filter",
    "ref_top_logprobs",
    "ref_top_p_filter",
    "seed_state",
    "splitmix64_next",
    "weight_bits",
]

MAX_LOGPROBS = 20
"""Most alternatives ``SamplingParams.logprobs`` may ask for."""

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this are treated as 0 (greedy): dividing by them overflows float32 logits."""

MAX_PENALTY = 2.0
"""Presence and frequency penalties are limited to [-2, 2], as in the OpenAI API."""

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15


MAX_LOGIT_BIAS = 1e30  # |bias| above this is no longer a finite float32 once added to a logit


def _warn_fallback() -> None:
    warn_not_built("sampling", "sampling")


# ------------------------------------------------------------------------------------------------------
# random numbers: splitmix64, identical to eng_next53 in kernels/sampling.pyx


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def splitmix64_next(state: int) -> tuple[int, float]:
    """Advance a splitmix64 state; return ``(new_state, u)`` with ``u`` uniform in [0, 1) (53 bits)."""
    state = (state + _GAMMA) & _MASK64
    return state, (_mix64(state) >> 11) * 2.0**-53


def seed_state(seed: int | None, stream: int = 0) -> int:
    """Initial splitmix64 state of ``stream`` (a row index) for ``seed``; ``None`` draws from os.urandom."""
    if seed is None:
        return int.from_bytes(os.urandom(8), "little")
    return _mix64((int(seed) + _mix64((stream * _GAMMA + _GAMMA) & _MASK64)) & _MASK64)


# ------------------------------------------------------------------------------------------------------
# parameters


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _bad(name: str, value: object, allowed: str) -> InvalidRequestError:
    return InvalidRequestError(f"{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to choose the next token of one request (see the module docstring for the exact order)."""

    do_sample: bool = False
    temperature: float = 1.0  # >= 0; 0 (or below GREEDY_TEMPERATURE) means greedy
    top_k: int = 0  # >= 0; 0 = off
    top_p: float = 1.0  # (0, 1]
    min_p: float = 0.0  # [0, 1]
    repetition_penalty: float = 1.0  # > 0
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    logit_bias: Mapping[int, float] | None = None  # token id in [0, vocab) -> finite bias
    seed: int | None = None  # [0, 2**64); None = a fresh seed from os.urandom per request
    logprobs: int | None = None  # None = off; n: chosen token's logprob plus top-n alternatives

    def validate(self, vocab_size: int) -> None:
        """Raise :class:`InvalidRequestError` naming the first bad parameter, its value and the range."""
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise _bad("do_sample", self.do_sample, "a bool")
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            raise _bad("temperature", t, "a finite number >= 0")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise _bad("top_k", self.top_k, "an integer >= 0 (0 = off)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise _bad("top_p", self.top_p, "a number in (0, 1]")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise _bad("min_p", self.min_p, "a number in [0, 1]")
        r = self.repetition_penalty
        if not _is_number(r) or not math.isfinite(r) or r <= 0:
            raise _bad("repetition_penalty", r, "a finite number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                raise _bad(name, v, f"a number in [{-MAX_PENALTY:g}, {MAX_PENALTY:g}]")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise _bad("logit_bias", self.logit_bias, "a mapping of token id to bias, or None")
            for tok, bias in self.logit_bias.items():
                if not _is_int(tok) or not 0 <= tok < vocab_size:
                    raise _bad("logit_bias token id", tok, f"an integer in [0, {vocab_size})")
                # applied in float32: a larger magnitude would become +-inf there
                if not _is_number(bias) or not math.isfinite(bias) or abs(bias) > MAX_LOGIT_BIAS:
                    raise _bad(
                        f"logit_bias[{tok}]", bias, f"a finite number in [{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
                    )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise _bad("seed", self.seed, "None or an integer in [0, 2**64)")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise _bad("logprobs", self.logprobs, f"None or an integer in [0, {MAX_LOGPROBS}]")

    @classmethod
    def from_search_config(cls, search: Mapping[str, Any], **overrides: Any) -> SamplingParams:
        """Defaults from a genai_config.json ``search`` section; keyword overrides win.

        Reads do_sample, temperature, top_k, top_p and repetition_penalty; other keys (max_length,
        num_beams, ...) belong to the generation loop. genai's greedy configs carry ``top_k: 1`` next to
        ``do_sample: false`` as a second way of saying greedy; that ``top_k`` is dropped so that an
        override ``do_sample=True`` samples instead of silently staying greedy.
        """
        values: dict[str, Any] = {}
        if "do_sample" in search:
            flag = search["do_sample"]
            if not isinstance(flag, (bool, np.bool_)):  # "false" would read as True
                raise InvalidRequestError(
                    f"genai_config.json search.do_sample must be true or false, got {flag!r} ({type(flag).__name__})"
                )
            values["do_sample"] = bool(flag)
        for key in ("temperature", "top_p", "repetition_penalty"):
            if key in search and _is_number(search[key]):
                values[key] = float(search[key])
        if "top_k" in search and _is_int(search["top_k"]):
            top_k = int(search["top_k"])
            if not (top_k == 1 and not values.get("do_sample", False)):
                values["top_k"] = top_k
        values.update(overrides)
        return cls(**values)

    @property
    def _has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass(frozen=True)
class _RowConfig:
    """One row's derived settings, shared by both implementations (the kernel gets the same values)."""

    greedy: bool = True
    penalties: bool = False
    # the float fields hold float32 values (float(np.float32(...))), exactly what the kernel stores
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p_threshold: float = -math.inf
    logprobs: int = -1
    bias_ids: np.ndarray | None = None  # (n,) int64, sorted
    bias_values: np.ndarray | None = None  # (n,) float32

    @classmethod
    def from_params(cls, p: SamplingParams, vocab_size: int) -> _RowConfig:
        greedy = not p.do_sample or p.temperature < GREEDY_TEMPERATURE or p.top_k == 1
        ids = values = None
        if p.logit_bias:
            ids = np.array(sorted(int(t) for t in p.logit_bias), dtype=np.int64)
            values = np.array([float(p.logit_bias[t]) for t in ids.tolist()], dtype=np.float32)
        return cls(
            greedy=greedy,
            penalties=p._has_penalties,
            # top_k == 1 rows are greedy over z = x / T; other greedy rows use T = 1
            temperature=_f32(p.temperature if p.do_sample and p.temperature >= GREEDY_TEMPERATURE else 1.0),
            repetition_penalty=_f32(p.repetition_penalty),
            presence_penalty=_f32(p.presence_penalty),
            frequency_penalty=_f32(p.frequency_penalty),
            top_k=int(p.top_k) if 0 < p.top_k < vocab_size else 0,
            top_p=float(p.top_p),
            min_p_threshold=float(min_p_threshold(float(p.min_p))),
            logprobs=-1 if p.logprobs is None else int(p.logprobs),
            bias_ids=ids,
            bias_values=values,
        )


def _f32(value: float) -> float:
    return float(np.float32(value))


def min_p_threshold(min_p: float) -> np.float32:
    """Smallest float32 ``t`` with ``t >= log(min_p)``: ``rel(z, m) >= t`` is the min-p test (-inf = off)."""
    if min_p <= 0:
        return np.float32(-np.inf)
    lmp = math.log(min_p)
    t = np.float32(lmp)
    if float(t) < lmp:
        t = np.nextafter(t, np.float32(np.inf))
    return np.float32(t)


# ------------------------------------------------------------------------------------------------------
# numpy reference of every step (one row at a time; allocates freely)

_F32 = np.float32
_EXP_FLOOR = _F32(-87.0)
_LOG2E = _F32(float.fromhex("0x1.715476p+0"))
_MAGIC = _F32(12582912.0)
_LN2_HI = _F32(float.fromhex("0x1.63p-1"))
_LN2_LO = _F32(float.fromhex("-0x1.bd0106p-13"))
# degree-7 Taylor coefficients 1/7!, 1/6!, ..., 1/0! rounded to float32, highest first (Horner)
_POLY = (
    _F32(float.fromhex("0x1.a01a02p-13")),
    _F32(float.fromhex("0x1.6c16c2p-10")),
    _F32(float.fromhex("0x1.111112p-7")),
    _F32(float.fromhex("0x1.555556p-5")),
    _F32(float.fromhex("0x1.555556p-3")),
    _F32(0.5),
    _F32(1.0),
    _F32(1.0),
)


def _row(logits: np.ndarray) -> np.ndarray:
    """float32 copy of a 1-D row with NaN replaced by -inf."""
    x = np.array(logits, dtype=np.float32, copy=True).reshape(-1)
    x[np.isnan(x)] = -np.inf
    return x


def ref_exp_rel(d: np.ndarray) -> np.ndarray:
    """float32 exp(d) for d <= 0 (never NaN), the kernel's routine step for step; 0 below -87."""
    d = np.asarray(d, dtype=np.float32)
    x = np.maximum(d, _EXP_FLOOR)
    n = (x * _LOG2E + _MAGIC) - _MAGIC
    r = x - n * _LN2_HI
    r = r - n * _LN2_LO
    p = np.full_like(x, _POLY[0])
    for c in _POLY[1:]:
        p = p * r + c
    scale = ((n.astype(np.int32) + np.int32(127)) << np.int32(23)).view(np.float32)
    return np.where(d >= _EXP_FLOOR, p * scale, _F32(0.0)).astype(np.float32)


def _rel(z: np.ndarray, m: np.float32) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.where(z == m, _F32(0.0), z - m).astype(np.float32)


def weight_bits(vocab_size: int) -> int:
    """Q of the integer weights ``rint(exp(z - max) * 2**Q)``: the largest with ``vocab * 2**Q < 2**62``,
    at most 51."""
    return min(51, 62 - int(vocab_size).bit_length())


def _weights(z: np.ndarray, m: np.float32) -> np.ndarray:
    """int64 weights of a prepared row (step 6)."""
    e = ref_exp_rel(_rel(z, m))
    return np.rint(e.astype(np.float64) * 2.0 ** weight_bits(z.size)).astype(np.int64)


def _order(z: np.ndarray) -> np.ndarray:
    """Token ids by z descending, ties by id ascending."""
    return np.argsort(-z, kind="stable")


def ref_apply_penalties(
    logits: np.ndarray,
    counts: np.ndarray | None,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> np.ndarray:
    """Penalise the tokens with ``counts > 0`` (prompt + generated occurrences); float32 copy."""
    x = _row(logits)
    if counts is None:
        return x
    c = np.asarray(counts).reshape(-1)
    rep, pres, freq = _F32(repetition_penalty), _F32(presence_penalty), _F32(frequency_penalty)
    with np.errstate(over="ignore", invalid="ignore"):
        p = np.where(x > 0, x / rep, x * rep).astype(np.float32)
        p = p - (pres + freq * c.astype(np.float32))
    return np.where(c > 0, p, x).astype(np.float32)


def ref_apply_logit_bias(logits: np.ndarray, logit_bias: Mapping[int, float] | None) -> np.ndarray:
    """Add ``logit_bias[token]`` to each listed token; float32 copy."""
    x = _row(logits)
    for tok, bias in (logit_bias or {}).items():
        x[int(tok)] = x[int(tok)] + _F32(bias)
    return x


def ref_apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Divide by the temperature as float32; float32 copy."""
    x = _row(logits)
    with np.errstate(over="ignore"):
        return (x / _F32(temperature)).astype(np.float32)


def ref_prepare_logits(logits: np.ndarray, counts: np.ndarray | None, cfg: _RowConfig) -> np.ndarray:
    """Steps 1-4 of the definition for one row: the prepared logits ``z`` (float32)."""
    x = ref_apply_penalties(
        logits,
        counts if cfg.penalties else None,
        cfg.repetition_penalty,
        cfg.presence_penalty,
        cfg.frequency_penalty,
    )
    if cfg.bias_ids is not None:
        x = ref_apply_logit_bias(x, dict(zip(cfg.bias_ids.tolist(), cfg.bias_values.tolist(), strict=True)))
    return ref_apply_temperature(x, cfg.temperature)


def ref_argmax(z: np.ndarray) -> int:
    """First index of the maximum, NaN read as -inf; 0 when nothing is above -inf."""
    z = _row(z)
    m = z.max()
    return 0 if m == -np.inf else int(np.argmax(z == m))


def ref_top_k_filter(z: np.ndarray, k: int) -> np.ndarray:
    """Keep the k best ranks, set the rest to -inf (k = 0 or k >= vocab: no change)."""
    z = _row(z)
    if 0 < k < z.size:
        z[_order(z)[k:]] = -np.inf
    return z


def ref_top_p_filter(z: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the shortest rank prefix whose running weight reaches ``top_p`` of the total; rest -inf."""
    z = _row(z)
    m = z.max()
    if top_p >= 1 or m == -np.inf:
        return z
    w = _weights(z, m)
    order = _order(z)
    cum = np.cumsum(w[order]).astype(np.float64)
    keep = int(np.searchsorted(cum, top_p * float(w.sum()), side="left")) + 1
    z[order[keep:]] = -np.inf
    return z


def ref_min_p_filter(z: np.ndarray, min_p: float) -> np.ndarray:
    """Keep tokens whose probability is at least ``min_p`` times the top one's; rest -inf."""
    z = _row(z)
    m = z.max()
    t = min_p_threshold(min_p)
    if t == -np.inf or m == -np.inf:
        return z
    z[_rel(z, m) < t] = -np.inf
    return z


def ref_sample(z: np.ndarray, u: float) -> int:
    """Inverse-CDF draw at ``u`` in [0, 1) over the tokens of ``z`` that are not -inf, in increasing id."""
    z = _row(z)
    m = z.max()
    if m == -np.inf:
        return 0
    w = _weights(z, m)
    cum = np.cumsum(w)
    target = (int(u * 2.0**53) * int(cum[-1])) >> 53
    return int(np.searchsorted(cum, target, side="right"))


def ref_log_softmax(z: np.ndarray) -> np.ndarray:
    """float32 log-softmax with the kernel's weights: ``rel(z, m) - log(W * 2**-Q)``; all -inf if none."""
    z = _row(z)
    m = z.max()
    if m == -np.inf:
        return np.full(z.size, -np.inf, dtype=np.float32)
    log_z = math.log(math.ldexp(float(_weights(z, m).sum()), -weight_bits(z.size)))
    return (_rel(z, m).astype(np.float64) - log_z).astype(np.float32)


def ref_top_logprobs(z: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` best ranks of ``z`` and their log-probabilities: ``(ids int64, logprobs float32)``."""
    z = _row(z)
    ids = _order(z)[:n].astype(np.int64)
    return ids, ref_log_softmax(z)[ids]


def _ref_choose(z: np.ndarray, cfg: _RowConfig, u: float) -> int:
    """Steps 5-12 for one prepared row."""
    if cfg.greedy:
        return ref_argmax(z)
    z = ref_top_k_filter(z, cfg.top_k)
    z = ref_top_p_filter(z, cfg.top_p)
    if cfg.min_p_threshold != -math.inf:
        m = z.max()
        if m != -np.inf:
            z[_rel(z, m) < _F32(cfg.min_p_threshold)] = -np.inf
    return ref_sample(z, u)


# ------------------------------------------------------------------------------------------------------
# the sampler


class Sampler:
    """Preallocated sampling state for up to `batch_size` rows over `vocab_size` logits.

    ``reset`` once per request (validates, seeds, counts the prompt tokens), then ``sample`` once per
    decode step. Everything ``sample`` touches is allocated here; the compiled path allocates nothing
    per call and releases the GIL while it works. One Sampler serves one decode loop at a time: its
    scratch buffers are shared by all calls.
    """

    impl: str
    """"cython" or "numpy": the implementation in use."""

    def __init__(self, batch_size: int, vocab_size: int, impl: str = "auto") -> None:
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not _is_int(vocab_size) or not 1 <= vocab_size < 2**31:
            raise ValueError(f"vocab_size must be an integer in [1, 2**31), got {vocab_size!r}")
        if impl not in ("auto", "cython", "numpy"):
            raise ValueError(f"impl must be 'auto', 'cython' or 'numpy', got {impl!r}")
        if impl == "cython" and _ckernels is None:
            raise ImportError(
                "impl='cython' but engine._kernels.sampling is not built (run `python setup.py build_ext --inplace`)"
            )
        if impl == "auto":
            impl = "cython" if _ckernels is not None else "numpy"
            if impl == "numpy":
                _warn_fallback()
        self.impl = impl
        self.batch_size = int(batch_size)
        self.vocab_size = int(vocab_size)
        self.logprobs = np.zeros(batch_size, np.float32)  # (batch,) chosen-token log-probability
        self.top_logprobs = np.full((batch_size, MAX_LOGPROBS), -np.inf, np.float32)  # (batch, 20)
        self.top_ids = np.full((batch_size, MAX_LOGPROBS), -1, np.int64)  # (batch, 20), first n valid
        self._counts = np.zeros((batch_size, vocab_size), np.int32)  # (batch, vocab) prompt+generated
        self._rng = np.zeros(batch_size, np.uint64)  # (batch,) splitmix64 states
        self._rows = [_RowConfig()] * batch_size
        self._kernel = None
        if impl == "cython":
            self._kernel = _ckernels.SamplerKernel(
                batch_size,
                vocab_size,
                self._counts,
                self._rng,
                self.logprobs,
                self.top_logprobs,
                self.top_ids,
            )
            self._sample = self._kernel.sample
        else:
            self._sample = self._sample_numpy

    @property
    def on_device(self) -> bool:
        """False: the ids are chosen on the host (the device sampler's twin property says whether a
        decode loop may run one step ahead)."""
        return False

    def reset(
        self,
        params: SamplingParams | Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        *,
        checked: bool = False,
    ) -> None:
        """Start a request: one row per prompt; ``params`` shared by all rows or one per row.

        Raises InvalidRequestError (state untouched) on a bad parameter or prompt. ``checked``: the
        params and prompts were validated already (engine/request.py), so they are not again. A shared seed gives
        row ``i`` the stream ``(seed, i)``, so rows differ; per-row params give each row the stream
        ``(seed, 0)``, so a request's tokens do not depend on its position in the batch.
        """
        n = len(prompt_ids)
        if not 1 <= n <= self.batch_size:
            raise InvalidRequestError(f"prompt_ids must hold 1 to {self.batch_size} rows, got {n}")
        shared = isinstance(params, SamplingParams)
        per_row = [params] * n if shared else list(params)
        if len(per_row) != n or not all(isinstance(p, SamplingParams) for p in per_row):
            raise InvalidRequestError(
                f"params must be one SamplingParams or a sequence of {n} SamplingParams, got {params!r}"
            )
        if not checked:
            for p in {id(p): p for p in per_row}.values():
                p.validate(self.vocab_size)
        prompts = [self._prompt(ids, f"prompt_ids[{i}]", checked) for i, ids in enumerate(prompt_ids)]
        self._rows = list(self._rows)
        for r in range(self.batch_size):
            if r < n:
                self._configure(r, per_row[r], prompts[r], r if shared else 0)
            else:
                self._set_config(r, _RowConfig())

    def reset_row(
        self, row: int, params: SamplingParams, prompt_ids: Sequence[int] | np.ndarray, *, checked: bool = False
    ) -> None:
        """Start a new request on one row, the others untouched (a row joining a running batch):
        validates (unless ``checked``), seeds the stream ``(seed, 0)`` as a request alone does,
        counts the prompt."""
        if not _is_int(row) or not 0 <= row < self.batch_size:
            raise ValueError(f"row must be in [0, {self.batch_size}), got {row!r}")
        if not checked:
            params.validate(self.vocab_size)
        prompt = self._prompt(prompt_ids, "prompt_ids", checked)
        self._rows = list(self._rows)
        self._configure(int(row), params, prompt, 0)

    def save_row(self, row: int) -> int:
        """The row's random state (a stream evicted between chunks resumes from it)."""
        return int(self._rng[row])

    def restore_row(self, row: int, saved: int) -> None:
        """Put back a random state from :meth:`save_row` (after ``reset`` for the same request)."""
        self._rng[row] = saved

    def _prompt(self, ids: Sequence[int] | np.ndarray, name: str, checked: bool = False) -> np.ndarray:
        """``ids`` as a 1-D int64 array of token ids in the vocabulary (InvalidRequestError otherwise)."""
        a = np.asarray(ids)
        if checked:
            return a.astype(np.int64, copy=False)
        if a.ndim != 1 or (a.size and (a.dtype.kind not in "iu" or a.min() < 0 or a.max() >= self.vocab_size)):
            raise InvalidRequestError(f"{name} must be a sequence of token ids in [0, {self.vocab_size})")
        return a.astype(np.int64, copy=False)

    def _configure(self, r: int, p: SamplingParams, prompt: np.ndarray, stream: int) -> None:
        cfg = _RowConfig.from_params(p, self.vocab_size)
        self._rng[r] = seed_state(p.seed, stream)
        if cfg.penalties:
            self._counts[r] = 0
            np.add.at(self._counts[r], prompt, 1)
        self._set_config(r, cfg)

    def _set_config(self, r: int, cfg: _RowConfig) -> None:
        self._rows[r] = cfg
        if self._kernel is not None:
            self._kernel.set_row(
                r,
                greedy=cfg.greedy,
                penalties=cfg.penalties,
                temperature=cfg.temperature,
                repetition_penalty=cfg.repetition_penalty,
                presence_penalty=cfg.presence_penalty,
                frequency_penalty=cfg.frequency_penalty,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                min_p_threshold=cfg.min_p_threshold,
                logprobs=cfg.logprobs,
                bias_ids=cfg.bias_ids,
                bias_values=cfg.bias_values,
            )

    def sample(self, logits: np.ndarray, out: np.ndarray, rows: int | None = None) -> None:
        """Write the next token of each row into ``out`` and count it for the penalties.

        logits: (batch, vocab) float32 or float16 with contiguous rows (a view of the engine's logits
        buffer); out: (batch,) int64 or int32, any stride (e.g. ``input_ids[:, 0]``); rows: sample only
        the first ``rows`` rows (default: all of ``logits``). When a row asked for logprobs,
        ``self.logprobs[row]`` and the first n entries of ``self.top_logprobs[row]`` /
        ``self.top_ids[row]`` are written too. The compiled path allocates nothing.
        """
        self._sample(logits, out, rows)

    def _sample_numpy(self, logits: np.ndarray, out: np.ndarray, rows: int | None = None) -> None:
        _check_call(logits, out, rows, self.vocab_size, self.batch_size)
        n = logits.shape[0] if rows is None else rows
        for r in range(n):
            cfg = self._rows[r]
            u = 0.0
            if not cfg.greedy:
                state, u = splitmix64_next(int(self._rng[r]))
                self._rng[r] = state
            z = ref_prepare_logits(logits[r], self._counts[r], cfg)
            tok = _ref_choose(z, cfg, u)
            out[r] = tok
            if cfg.logprobs >= 0:
                lp = ref_log_softmax(z)
                self.logprobs[r] = lp[tok]
                k = min(cfg.logprobs, self.vocab_size)
                ids = _order(z)[:k] if z.max() != -np.inf else np.arange(k)
                self.top_ids[r, :k] = ids
                self.top_logprobs[r, :k] = lp[ids]
                self.top_ids[r, k:] = -1
                self.top_logprobs[r, k:] = -np.inf
            if cfg.penalties:
                self._counts[r, tok] += 1


def _check_call(logits: np.ndarray, out: np.ndarray, rows: int | None, vocab: int, batch: int) -> None:
    """The compiled wrappers' argument checks, for the numpy path."""
    if not isinstance(logits, np.ndarray) or not isinstance(out, np.ndarray):
        raise TypeError("logits and out must be numpy arrays")
    if logits.dtype not in (np.float32, np.float16):
        raise ValueError(f"logits must be float32 or float16, got {logits.dtype}")
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (batch, vocab), got shape {logits.shape}")
    if logits.shape[1] > 1 and logits.strides[1] != logits.itemsize:
        raise ValueError("logits rows must be contiguous (pass np.ascontiguousarray(logits))")
    if vocab >= 0 and logits.shape[1] != vocab:
        raise ValueError(f"logits have {logits.shape[1]} columns but the sampler was built for vocab {vocab}")
    n = logits.shape[0] if rows is None else rows
    if not 0 <= n <= min(logits.shape[0], batch):
        raise ValueError(f"rows must be in [0, {min(logits.shape[0], batch)}], got {rows}")
    if out.dtype not in (np.int64, np.int32) or out.ndim != 1 or not out.flags.writeable:
        raise ValueError(f"out must be a writeable 1-D int64 or int32 array, got {out.dtype} with shape {out.shape}")
    if out.shape[0] < n:
        raise ValueError(f"out has {out.shape[0]} entries, fewer than the {n} rows to sample")


def _argmax_numpy(logits: np.ndarray, out: np.ndarray) -> None:
    """numpy reference of the compiled ``argmax`` over rows."""
    _check_call(logits, out, None, -1, logits.shape[0] if isinstance(logits, np.ndarray) else 0)
    for r in range(logits.shape[0]):
        out[r] = ref_argmax(logits[r])


if _ckernels is not None:
    argmax = _ckernels.argmax
else:

    def argmax(logits: np.ndarray, out: np.ndarray) -> None:
        """Greedy token of every row: out[i] = argmax(logits[i]), NaN read as -inf, ties -> lowest id."""
        _warn_fallback()
        _argmax_numpy(logits, out)
