"""Device sampler: the next ids chosen on the device, only they copied to the host.

Every row (a request alone is row 0; a batch has one per request) has its own mode. Greedy rows
take one argmax kernel per step; temperature / top-k / top-p rows run as array ops
(:func:`sample_rows`, written for numpy and cupy alike) with per-row parameters and a per-row
splitmix64 stream on the device (:func:`splitmix_draw`: the CPU sampler's generator and seeding,
so a seeded row draws the same numbers alone and in any batch row). Penalties, min-p, logit bias
and logprobs fall back to the CPU :class:`~engine.sampling.Sampler` on a host copy of the logits
(:func:`sampler_mode` says which, and why).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..sampling import _GAMMA, Sampler, SamplingParams, _RowConfig, seed_state
from .ops import DeviceOps

__all__ = ["DeviceSampler", "sample_rows", "sampler_mode", "splitmix_draw"]

GREEDY, DEVICE, HOST = "greedy", "device", "host"


def sampler_mode(params: SamplingParams | Sequence[SamplingParams], vocab_size: int) -> tuple[str, str | None]:
    """Where a request's tokens are chosen: ``("greedy" | "device" | "host", reason for the host fallback)``.

    greedy: one argmax kernel; device: temperature / top-k / top-p with cupy; host: everything else
    (the CPU :class:`~engine.sampling.Sampler` on a host copy of the logits, every step). A sequence
    (one per row of a batch): the mode of the row that needs the most (host, then device).
    """
    if not isinstance(params, SamplingParams):
        modes = [sampler_mode(p, vocab_size) for p in params]
        for want in (HOST, DEVICE):
            for mode, reason in modes:
                if mode == want:
                    return mode, reason
        return GREEDY, None
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


def sample_rows(xp: Any, logits: Any, u: Any, *, temperature: float | Any, top_k: int | Any, top_p: float | Any) -> Any:
    """One token per row drawn from softmax(logits / temperature) cut to top-k, then top-p; array module ``xp``.

    logits: (rows, vocab) float32/float16 (NaN read as -inf); u: (rows, 1) float64 uniforms in [0, 1).
    The parameters are one value for every row, or per row: temperature (rows, 1) float32, top_k
    (rows,) int64 (0: off), top_p (rows, 1) float64 (1: off).
    Returns (rows,) int64. The order of the CPU definition (engine/sampling.py): rank by logit
    descending (ties: lower id first), keep the first ``top_k`` ranks, then the shortest rank prefix
    holding ``top_p`` of their weight; the draw walks the kept tokens in rank order (the CPU sampler
    walks them by id, so one seed gives other tokens on the two paths, from the same distribution).
    Rows with nothing above -inf give token 0. Written with operations numpy and cupy share.
    """
    vocab = logits.shape[1]
    z = logits.astype(xp.float32)
    z = xp.where(xp.isnan(z), xp.float32(-xp.inf), z)
    if not isinstance(temperature, (int, float)):
        z = z / temperature  # (rows, 1) float32: each row's own
    elif temperature != 1.0:
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
    if not isinstance(top_k, int):
        k = top_k[:, None]  # (rows, 1): each row keeps its first k ranks (0: all)
        w = xp.where((k <= 0) | (xp.arange(vocab)[None, :] < k), w, 0.0)
    elif 0 < top_k < vocab:
        w[:, top_k:] = 0.0
    if not isinstance(top_p, (int, float)):
        c = xp.cumsum(w, axis=1)
        w = xp.where((top_p >= 1.0) | (c - w < top_p * c[:, -1:]), w, 0.0)  # as below, per row
    elif top_p < 1.0:
        c = xp.cumsum(w, axis=1)
        w = xp.where(c - w < top_p * c[:, -1:], w, 0.0)  # rank r stays while the ranks before it hold < top_p
    c = xp.cumsum(w, axis=1)
    rank = xp.minimum((c <= u * c[:, -1:]).sum(axis=1), vocab - 1)  # (rows,) first rank whose sum passes u
    tokens = xp.take_along_axis(order, rank[:, None], axis=1)[:, 0]
    return xp.where(m[:, 0] > -xp.inf, tokens, 0).astype(xp.int64)


_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64's multipliers (engine/sampling.py)


def splitmix_draw(xp: Any, states: Any, active: Any) -> Any:
    """One uniform in [0, 1) per row from its splitmix64 state, as the CPU sampler draws them.

    states: (rows,) uint64, advanced in place for the ``active`` (rows,) bool rows only (a greedy row
    draws nothing); returns (rows, 1) float64 (the top 53 bits of each row's next output).
    """
    advanced = states + xp.uint64(_GAMMA)  # uint64 arithmetic wraps, as splitmix64 wants
    z = advanced
    z = (z ^ (z >> xp.uint64(30))) * xp.uint64(_C1)
    z = (z ^ (z >> xp.uint64(27))) * xp.uint64(_C2)
    z = z ^ (z >> xp.uint64(31))
    states[...] = xp.where(active, advanced, states)
    return ((z >> xp.uint64(11)).astype(xp.float64) * (2.0**-53))[:, None]


class DeviceSampler:
    """Chooses the next ids on the device and copies only them to the host.

    The interface of :class:`engine.sampling.Sampler` as the decode loops use it (a single request on
    row 0, a batch on rows ``0:n``, a request joining a running batch with :meth:`reset_row`):
    ``reset``, ``reset_row``, ``sample(logits, out, rows)`` (logits: the device ``(batch, vocab)``
    view; out: the device ``next_ids``), ``save_row`` / ``restore_row``, ``logprobs`` / ``top_ids`` /
    ``top_logprobs``. After ``sample`` the ids are in ``out`` and in the page-locked ``host_ids``.

    Each row has a mode (``modes``): ``"greedy"`` (the argmax kernel), ``"device"`` (temperature /
    top-k / top-p as array ops, the row's own parameters and splitmix64 stream on the device) or
    ``"host"`` (the CPU sampler on a host copy of the logits; ``fallback_reason`` says why). ``mode``
    sums them up: ``"host"`` when any row is, else ``"device"`` when any row is, else greedy.
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
        self._host = Sampler(batch, vocab_size, impl=impl)  # the CPU sampler of the host rows
        # (2, batch) ids dtype, page-locked host: the two slots of the pipelined loop (enqueue / wait)
        self.slots = ops.pinned_zeros((2, batch), host_ids.dtype)
        self._argmax = ops.argmax_writer(logits_dtype, host_ids.dtype)
        self._logits_dtype = np.dtype(logits_dtype)
        self._host_logits: np.ndarray | None = None  # (batch, vocab) page-locked, made at the first host row
        self._device_ids: np.ndarray | None = None  # (batch,) page-locked: device choices beside host rows
        self.modes = [GREEDY] * batch  # (batch,) each row's mode
        self._reasons: list[str | None] = [None] * batch
        # per-row parameters of the device-sampled rows: host staging copies (uploaded at reset)
        self._temperature = np.ones((batch, 1), np.float32)  # (batch, 1) float32
        self._top_k = np.zeros(batch, np.int64)  # (batch,) int64, 0: off
        self._top_p = np.ones((batch, 1), np.float64)  # (batch, 1) float64, 1: off
        self._sampled = np.zeros(batch, np.bool_)  # (batch,) rows in device mode
        self._rng_host = np.zeros(batch, np.uint64)  # (batch,) splitmix64 states, staging
        with ops.scope():
            self._d_temperature = ops.zeros((batch, 1), np.float32)  # device twins of the above
            self._d_top_k = ops.zeros((batch,), np.int64)
            self._d_top_p = ops.zeros((batch, 1), np.float64)
            self._d_sampled = ops.zeros((batch,), np.bool_)
            self._rng = ops.zeros((batch,), np.uint64)  # (batch,) uint64, device: each row's stream
        self._n_device = self._n_host = 0  # rows in device / host mode
        self._device_params = False  # whether the device parameter arrays hold a sampled row's values
        self.mode = GREEDY
        self.fallback_reason: str | None = None

    @property
    def logprobs(self) -> np.ndarray:
        """(batch,) chosen-token log-probabilities (host rows; logprobs requests always sample there)."""
        return self._host.logprobs

    @property
    def top_ids(self) -> np.ndarray:
        return self._host.top_ids

    @property
    def top_logprobs(self) -> np.ndarray:
        return self._host.top_logprobs

    # ----------------------------------------------------------------------------------------
    # rows

    def reset(
        self,
        params: SamplingParams | Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        *,
        checked: bool = False,
    ) -> None:
        """Start a request on rows ``0:n`` (validates like the CPU sampler unless ``checked``; raises
        InvalidRequestError with state untouched). One SamplingParams for all rows gives row ``i`` the
        stream ``(seed, i)``; one per row gives each the stream ``(seed, 0)``, as the CPU sampler does."""
        self._host.reset(params, prompt_ids, checked=checked)
        n = len(prompt_ids)
        shared = isinstance(params, SamplingParams)
        per_row = [params] * n if shared else list(params)
        for r in range(self.batch):
            if r < n:
                self._configure(r, per_row[r], r if shared else 0)
            else:
                self._configure(r, None, 0)
        sampled = bool(self._sampled.any())
        if sampled or self._device_params:  # all-greedy after all-greedy: nothing to copy
            ops = self.ops
            with ops.scope():
                ops.upload(self._d_temperature, self._temperature)
                ops.upload(self._d_top_k, self._top_k)
                ops.upload(self._d_top_p, self._top_p)
                ops.upload(self._d_sampled, self._sampled)
                ops.upload(self._rng, self._rng_host)
        self._device_params = sampled
        self._summarize()

    def reset_row(
        self, row: int, params: SamplingParams, prompt_ids: Sequence[int] | np.ndarray, *, checked: bool = False
    ) -> None:
        """Start a new request on one row, the others untouched (a row joining a running batch):
        validates (unless ``checked``), seeds the stream ``(seed, 0)`` as a request alone does."""
        self._host.reset_row(row, params, prompt_ids, checked=checked)  # checks row and params first
        was = bool(self._sampled[row])
        self._configure(row, params, 0)
        if was or self._sampled[row]:  # a greedy row after a greedy row: nothing to copy
            ops, r = self.ops, slice(row, row + 1)
            with ops.scope():
                ops.upload(self._d_temperature[r], self._temperature[r])
                ops.upload(self._d_top_k[r], self._top_k[r])
                ops.upload(self._d_top_p[r], self._top_p[r])
                ops.upload(self._d_sampled[r], self._sampled[r])
                ops.upload(self._rng[r], self._rng_host[r])
            self._device_params = True
        self._summarize()

    def _configure(self, r: int, p: SamplingParams | None, stream: int) -> None:
        """Row ``r``'s mode and device parameters on the host staging arrays (None: an idle row, greedy)."""
        mode, reason = (GREEDY, None) if p is None else sampler_mode(p, self.vocab_size)
        cfg = _RowConfig() if p is None else _RowConfig.from_params(p, self.vocab_size)
        on = mode == DEVICE
        self._temperature[r, 0] = cfg.temperature if on else 1.0
        self._top_k[r] = cfg.top_k if on else 0
        self._top_p[r, 0] = cfg.top_p if on else 1.0
        self._sampled[r] = on
        self._rng_host[r] = seed_state(p.seed, stream) if on and p is not None else 0
        self.modes[r], self._reasons[r] = mode, reason
        if mode == HOST and self._host_logits is None:
            self._host_logits = self.ops.pinned_zeros((self.batch, self.vocab_size), self._logits_dtype)
            self._device_ids = self.ops.pinned_zeros((self.batch,), self.host_ids.dtype)

    def _summarize(self) -> None:
        self._n_device = self.modes.count(DEVICE)
        self._n_host = self.modes.count(HOST)
        self.mode = HOST if self._n_host else DEVICE if self._n_device else GREEDY
        self.fallback_reason = next((why for why in self._reasons if why is not None), None)

    def save_row(self, row: int) -> tuple[int, int]:
        """The row's random states (its device stream and the host sampler's), for a stream evicted
        between chunks to resume from (one small copy, at eviction only)."""
        one = self.ops.pinned_zeros((1,), np.uint64)
        self.ops.download(one, self._rng[row : row + 1])
        return int(one[0]), self._host.save_row(row)

    def restore_row(self, row: int, saved: tuple[int, int] | int) -> None:
        """Put back what :meth:`save_row` returned (after ``reset`` for the same request); a plain int
        (a greedy stream's placeholder) leaves the device stream as it is."""
        if isinstance(saved, tuple):
            device, host = saved
            self._rng_host[row] = device
            with self.ops.scope():
                self.ops.upload(self._rng[row : row + 1], self._rng_host[row : row + 1])
            saved = host
        self._host.restore_row(row, saved)

    # ----------------------------------------------------------------------------------------
    # choosing

    @property
    def on_device(self) -> bool:
        """Whether every row's ids are chosen on the device (no host row): then :meth:`enqueue` /
        :meth:`wait` can run one step ahead of the host."""
        return self._n_host == 0

    def _choose(self, logits: Any, out: Any) -> None:
        """The ids of the rows of ``logits`` into ``out`` (device): argmax, then the sampled rows'
        draws over it."""
        self._argmax(logits, out)
        if self._n_device:
            ops, xp, n = self.ops, self.ops.xp, logits.shape[0]
            with ops.scope():
                u = splitmix_draw(xp, self._rng[:n], self._d_sampled[:n])
                drawn = sample_rows(
                    xp,
                    logits,
                    u,
                    temperature=self._d_temperature[:n],
                    top_k=self._d_top_k[:n],
                    top_p=self._d_top_p[:n],
                )
                out[...] = xp.where(self._d_sampled[:n], drawn, out)

    def enqueue(self, logits: Any, out: Any, slot: int) -> None:
        """No host rows: enqueue choosing the next ids of the rows of ``logits`` into ``out`` (device)
        and their copy into ``slots[slot]`` (host) without waiting; :meth:`wait` returns them."""
        if self._n_host:
            raise RuntimeError("enqueue needs the ids chosen on the device (greedy or device mode)")
        n = logits.shape[0]
        self._choose(logits, out[:n])
        self.ops.download_async(self.slots[slot, :n], out[:n], slot)

    def wait(self, slot: int) -> np.ndarray:
        """The host ids :meth:`enqueue` put in ``slot``, once they have arrived."""
        self.ops.wait(slot)
        return self.slots[slot]

    def sample(self, logits: Any, out: Any, rows: int | None = None) -> None:
        """Write the next id of each of the first ``rows`` rows (default: all of ``logits``) into ``out``
        (device) and into ``host_ids``; one wait per call."""
        ops = self.ops
        n = logits.shape[0] if rows is None else rows
        logits, dev_out, host_out = logits[:n], out[:n], self.host_ids[:n]
        self._choose(logits, dev_out)
        if not self._n_host:
            ops.download(host_out, dev_out)
            return
        # host rows: the CPU sampler on a host copy of the logits; the other rows keep the device's ids
        assert self._host_logits is not None and self._device_ids is not None
        ops.download(self._host_logits[:n], logits)
        ops.download(self._device_ids[:n], dev_out)
        self._host.sample(self._host_logits[:n], host_out, n)
        for b in range(n):
            if self.modes[b] != HOST:
                host_out[b] = self._device_ids[b]
        ops.upload(dev_out, host_out)  # ordered before the next step's run on the same stream
