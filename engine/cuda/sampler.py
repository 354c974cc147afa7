"""Device sampler: the next ids chosen on the device, only they copied to the host.

Greedy requests take one argmax kernel per step; temperature / top-k / top-p run as array ops
(:func:`sample_rows`, written for numpy and cupy alike) with a seeded device RNG. Penalties, min-p,
logit bias and logprobs fall back to the CPU :class:`~engine.sampling.Sampler` on a host copy of the
logits (:func:`sampler_mode` says which, and why).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..sampling import Sampler, SamplingParams, _RowConfig
from .ops import DeviceOps

__all__ = ["DeviceSampler", "sample_rows", "sampler_mode"]

GREEDY, DEVICE, HOST = "greedy", "device", "host"


def sampler_mode(params: SamplingParams | Sequence[SamplingParams], vocab_size: int) -> tuple[str, str | None]:
    """Where a request's tokens are chosen: ``("greedy" | "device" | "host", reason for the host fallback)``.

    greedy: one argmax kernel; device: temperature / top-k / top-p with cupy; host: everything else
    (the CPU :class:`~engine.sampling.Sampler` on a host copy of the logits row, every step).
    """
    if not isinstance(params, SamplingParams):
        return HOST, "per-row sampling parameters"
    cfg = _RowConfig.from_params(params, vocab_size)
    needs = [
        name
        for name, on in (
            ("repetition/presence/frequency penalties", cfg.penalties),
            ("logit_bias", cfg.bias_ids is not None),
            ("min_p", cfg.min_p_threshold != -math.inf),
            ("logprobs", cfg.logprobs >= 0),
        )
        if on
    ]
    if needs:
        return HOST, f"{', '.join(needs)}: sampled on the host by the CPU sampler (logits row copied per step)"
    return (GREEDY if cfg.greedy else DEVICE), None


def sample_rows(xp: Any, logits: Any, u: Any, *, temperature: float, top_k: int, top_p: float) -> Any:
    """One token per row drawn from softmax(logits / temperature) cut to top-k, then top-p; array module ``xp``.

    logits: (rows, vocab) float32/float16 (NaN read as -inf); u: (rows, 1) float64 uniforms in [0, 1).
    Returns (rows,) int64. The order of the CPU definition (engine/sampling.py): rank by logit
    descending (ties: lower id first), keep the first ``top_k`` ranks, then the shortest rank prefix
    holding ``top_p`` of their weight; the draw walks the kept tokens in rank order (the CPU sampler
    walks them by id, so one seed gives other tokens on the two paths, from the same distribution).
    Rows with nothing above -inf give token 0. Written with operations numpy and cupy share.
    """
    vocab = logits.shape[1]
    z = logits.astype(xp.float32)
    z = xp.where(xp.isnan(z), xp.float32(-xp.inf), z)
    if temperature != 1.0:
        z = z / xp.float32(temperature)
    order = xp.argsort(-z, axis=1, kind="stable")  # (rows, vocab) ids by rank
    zs = xp.take_along_axis(z, order, axis=1)  # (rows, vocab) descending
    m = zs[:, :1]  # (rows, 1) the best logit
    finite = xp.isfinite(m)
    # z - m, with 0 at the maximum when it is +inf (no inf - inf)
    rel = xp.where(
        finite,
        zs - xp.where(finite, m, xp.float32(0)),
        xp.where(zs == m, xp.float32(0), xp.float32(-xp.inf)),
    )
    w = xp.exp(rel.astype(xp.float64))  # (rows, vocab) unnormalized probabilities by rank
    if 0 < top_k < vocab:
        w[:, top_k:] = 0.0
    if top_p < 1.0:
        c = xp.cumsum(w, axis=1)
        w = xp.where(c - w < top_p * c[:, -1:], w, 0.0)  # rank r stays while the ranks before it hold < top_p
    c = xp.cumsum(w, axis=1)
    rank = xp.minimum((c <= u * c[:, -1:]).sum(axis=1), vocab - 1)  # (rows,) first rank whose sum passes u
    tokens = xp.take_along_axis(order, rank[:, None], axis=1)[:, 0]
    return xp.where(m[:, 0] > -xp.inf, tokens, 0).astype(xp.int64)


class DeviceSampler:
    """Chooses the next ids on the device and copies only them to the host.

    The interface of :class:`engine.sampling.Sampler` as the generation loop uses it: ``reset(params,
    prompt_ids)``, ``sample(logits, out)`` (logits: the device ``(batch, vocab)`` view; out: the
    device ``next_ids``), ``logprobs`` / ``top_ids`` / ``top_logprobs``. After ``sample`` the ids are
    in ``out`` and in the page-locked ``host_ids``. ``mode`` says how the request is sampled:
    ``"greedy"`` (argmax kernel), ``"device"`` (temperature / top-k / top-p as cupy array ops with a
    cupy RNG seeded from ``SamplingParams.seed``) or ``"host"`` (the CPU sampler on a copy of the
    logits; ``fallback_reason`` says why).
    """

    def __init__(
        self,
        ops: DeviceOps,
        *,
        batch: int,
        vocab_size: int,
        logits_dtype: np.dtype,
        host_ids: np.ndarray,
        impl: str = "auto",
    ) -> None:
        self.ops = ops
        self.batch = batch
        self.vocab_size = vocab_size
        self.host_ids = host_ids  # (batch,) ids dtype, page-locked host
        self._host = Sampler(batch, vocab_size, impl=impl)  # the CPU sampler of the host fallback
        # (2, batch) ids dtype, page-locked host: the two slots of the pipelined loop (enqueue / wait)
        self.slots = ops.pinned_zeros((2, batch), host_ids.dtype)
        self._argmax = ops.argmax_writer(logits_dtype, host_ids.dtype)
        self._logits_dtype = np.dtype(logits_dtype)
        self._host_logits: np.ndarray | None = None  # (batch, vocab) page-locked, made on the first host request
        self._draw: Callable[[tuple[int, ...]], Any] | None = None
        self._temperature, self._top_k, self._top_p = 1.0, 0, 1.0
        self.mode = GREEDY
        self.fallback_reason: str | None = None

    @property
    def logprobs(self) -> np.ndarray:
        """(batch,) chosen-token log-probabilities (host mode; logprobs requests always sample there)."""
        return self._host.logprobs

    @property
    def top_ids(self) -> np.ndarray:
        return self._host.top_ids

    @property
    def top_logprobs(self) -> np.ndarray:
        return self._host.top_logprobs

    def reset(
        self,
        params: SamplingParams | Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        *,
        checked: bool = False,
    ) -> None:
        """Start a request (validates like the CPU sampler unless ``checked``; raises
        InvalidRequestError with state untouched)."""
        self._host.reset(params, prompt_ids, checked=checked)
        mode, reason = sampler_mode(params, self.vocab_size)
        if mode == HOST and self._host_logits is None:
            self._host_logits = self.ops.pinned_zeros((self.batch, self.vocab_size), self._logits_dtype)
        if mode == DEVICE:
            assert isinstance(params, SamplingParams)
            cfg = _RowConfig.from_params(params, self.vocab_size)
            self._temperature, self._top_k, self._top_p = cfg.temperature, cfg.top_k, cfg.top_p
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
            self._draw = self.ops.uniform(seed)
        self.mode, self.fallback_reason = mode, reason

    @property
    def on_device(self) -> bool:
        """Whether this request's ids are chosen on the device (greedy or device mode): then
        :meth:`enqueue` / :meth:`wait` can run one step ahead of the host."""
        return self.mode != HOST

    def _choose(self, logits: Any, out: Any) -> None:
        ops = self.ops
        if self.mode == GREEDY:
            self._argmax(logits, out)
        else:
            assert self._draw is not None
            with ops.scope():
                u = self._draw((logits.shape[0], 1))
                out[...] = sample_rows(
                    ops.xp, logits, u, temperature=self._temperature, top_k=self._top_k, top_p=self._top_p
                )

    def enqueue(self, logits: Any, out: Any, slot: int) -> None:
        """Greedy / device mode: enqueue choosing the next ids into ``out`` (device) and their copy into
        ``slots[slot]`` (host) without waiting; :meth:`wait` returns them."""
        if self.mode == HOST:
            raise RuntimeError("enqueue needs the ids chosen on the device (greedy or device mode)")
        self._choose(logits, out)
        self.ops.download_async(self.slots[slot], out, slot)

    def wait(self, slot: int) -> np.ndarray:
        """The ``(batch,)`` host ids :meth:`enqueue` put in ``slot``, once they have arrived."""
        self.ops.wait(slot)
        return self.slots[slot]

    def save_row(self, row: int) -> None:
        """None: the device random generator's state is not kept (an evicted sampled stream cannot
        resume; a greedy one draws nothing and can)."""
        return None

    def restore_row(self, row: int, saved: object) -> None:
        """Nothing to restore (see :meth:`save_row`)."""

    def sample(self, logits: Any, out: Any, rows: int | None = None) -> None:
        """Write the next id of each row into ``out`` (device) and into ``host_ids``; one wait per call."""
        ops = self.ops
        if self.mode != HOST:
            self._choose(logits, out)
        else:
            assert self._host_logits is not None
            ops.download(self._host_logits, logits)
            self._host.sample(self._host_logits, self.host_ids, rows)
            ops.upload(out, self.host_ids)  # ordered before the next step's run on the same stream
            return
        ops.download(self.host_ids, out)
