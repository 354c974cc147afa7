"""The interfaces the decode loops run against, satisfied by the CPU and the CUDA implementations.

``engine/binding.py`` (StepState) and ``engine/cuda/state.py`` (DeviceStepState) are step states;
``engine/sampling.py`` (Sampler) and ``engine/cuda/sampler.py`` (DeviceSampler) are samplers;
``engine/kv_cache.py`` and ``engine/cuda/state.py`` hold KV caches. The loops in engine/decode.py
see only these names, so that neither side needs probing for what it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from .iobinding import FastBinding
    from .sampling import SamplingParams


class KVCache(Protocol):
    """The past/present buffers of one engine, bound into its IOBinding."""

    def bind(self, bind: FastBinding, outputs_before: int = 0) -> None: ...  # bind for a request's first run

    def start(self, bind: FastBinding) -> None: ...  # a new request from position 0

    def advance(self, bind: FastBinding) -> None: ...  # after a step: presents become the next pasts


class StepState(Protocol):
    """Preallocated, pre-bound buffers of one request's forward passes (row 0)."""

    next_ids: Any  # (batch,) ids of the next step's input; the sampler writes here (host or device)
    host_ids: np.ndarray  # (batch,) host ids the loop reads after the sampler ran
    length: int  # tokens in the KV cache after the last run
    packed_mask: Any  # a batch's mask (CPU: flat, host; CUDA: (batch, max_length), device); None: runs no batches

    @property
    def kv_nbytes(self) -> int: ...

    def prefill(self, prompt_ids: np.ndarray) -> Any: ...  # (1, P) ids -> (1, vocab) logits

    def decode_one_token(self) -> Any: ...  # next_ids[0] at position ``length`` -> (1, vocab) logits

    def release(self) -> None: ...  # drop the bound buffers (engine close)


class BatchStepState(StepState, Protocol):
    """A step state that also runs batches of rows (engine/binding.py, engine/cuda/state.py)."""

    finished: np.ndarray  # (batch,) uint8: 1 for rows masked from the next step on

    # ``starts`` / ``start``: prompt positions each row holds already (the prefix cache; CPU only)
    def prefill_rows(self, prompts: list[np.ndarray], max_steps: int, starts: list[int] | None = None) -> Any: ...

    def decode_rows(self) -> Any: ...

    def join_row(self, row: int, prompt: np.ndarray, max_steps: int, start: int = 0) -> None: ...


class Sampler(Protocol):
    """Chooses each row's next id from its logits; per-row parameters, seeds and penalties."""

    logprobs: np.ndarray  # (batch,) chosen-token log-probability (rows that asked for logprobs)
    top_ids: np.ndarray  # (batch, 20) int64
    top_logprobs: np.ndarray  # (batch, 20) float32

    @property
    def on_device(self) -> bool: ...  # ids chosen on the device (then enqueue/wait exist)

    def reset(
        self,
        params: SamplingParams | Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        *,
        checked: bool = False,
    ) -> None: ...

    def sample(self, logits: Any, out: Any, rows: int | None = None) -> None: ...

    def save_row(self, row: int) -> Any: ...  # the row's random state (None: it cannot be saved)

    def restore_row(self, row: int, saved: Any) -> None: ...


class BatchSampler(Sampler, Protocol):
    """A sampler of several rows, where a request can start on one row of a running batch."""

    def reset_row(
        self, row: int, params: SamplingParams, prompt_ids: Sequence[int] | np.ndarray, *, checked: bool = False
    ) -> None: ...


class AheadSampler(Sampler, Protocol):
    """A device sampler the loop can run one step ahead of (engine/cuda/sampler.py)."""

    def enqueue(self, logits: Any, out: Any, slot: int) -> None: ...

    def wait(self, slot: int) -> np.ndarray: ...
