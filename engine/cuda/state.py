"""Device step state: every buffer of the decode loop on the device, allocated once, bound by pointer.

:class:`DeviceStepState` is the twin of :class:`engine.binding.StepState`: KV (share-buffer models:
:class:`DeviceKVCache`), input ids, attention mask, position ids and logits live on the device and
are bound to the IOBinding by address. The only host copy of a step is the chosen ids.

With a CUDA graph the decode step's bindings never change: a static ``(batch, max_length)`` mask
with zeros past the valid length, fixed input ids / positions / logits / KV addresses, so ORT
captures the step once (``gpu_graph_id`` 1) and replays it; the prompt runs outside the graph
(``gpu_graph_id`` -1). ``Run`` is told not to wait for the device when every consumer shares the
engine's stream (:func:`decode_run_options`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import onnxruntime as ort

from ..config import KVLayout, ModelSpec
from ..iobinding import FastBinding
from ..kv_cache import GrowingKVCache
from .ops import DeviceOps

__all__ = ["DeviceKVCache", "DeviceStepState", "decode_run_options"]

DECODE_GRAPH_ID = "1"  # gpu_graph_id of the captured decode step
SKIP_GRAPH_ID = "-1"  # gpu_graph_id that runs without capture/replay (the prompt)


def decode_run_options(*, graph: bool, asynchronous: bool) -> tuple[ort.RunOptions, ort.RunOptions]:
    """RunOptions of the prompt and of the decode steps.

    ``graph``: the prompt runs outside the graph (gpu_graph_id -1), the decode step is graph 1.
    ``asynchronous``: ``Run`` returns once the work is enqueued (every consumer is on the same stream).
    """
    prefill, decode = ort.RunOptions(), ort.RunOptions()
    if graph:
        prefill.add_run_config_entry("gpu_graph_id", SKIP_GRAPH_ID)
        decode.add_run_config_entry("gpu_graph_id", DECODE_GRAPH_ID)
    if asynchronous:
        for options in (prefill, decode):
            options.add_run_config_entry("disable_synchronize_execution_providers", "1")
    return prefill, decode


class DeviceKVCache:
    """Share-buffer (GroupQueryAttention) KV on the device: one buffer per layer and K/V, bound by
    pointer as both past input and present output; ORT writes the new rows in place."""

    def __init__(self, spec: ModelSpec, ops: DeviceOps, batch: int, max_length: int) -> None:
        self.names = list(zip(spec.past_names, spec.present_names, strict=True))
        self.shape = spec.kv_shape(batch, max_length)
        self.dtype = spec.kv_dtype
        self.device = ops.device
        # (batch, kv_heads, max_length, head_size) kv_dtype, device: one per layer and K/V
        self.buffers = [ops.zeros(self.shape, self.dtype) for _ in self.names]
        self._ptrs = [ops.ptr(b) for b in self.buffers]
        self.nbytes = len(self.names) * math.prod(self.shape) * self.dtype.itemsize

    def bind(self, bind: FastBinding, outputs_before: int = 0) -> None:
        """Bind every buffer as past and present (done once; the addresses never change)."""
        for (past, present), ptr in zip(self.names, self._ptrs, strict=True):
            bind.bind_input_ptr(past, self.device, self.dtype, self.shape, ptr)
            bind.bind_output_ptr(present, self.device, self.dtype, self.shape, ptr)

    def start(self, bind: FastBinding) -> None:
        """Nothing to reset: the attention mask says which rows are valid."""

    def advance(self, bind: FastBinding) -> None:
        """Nothing to do: the kernel wrote the new rows in place."""


class DeviceStepState:
    """Every buffer of the decode loop on the device, allocated once and bound by pointer.

    The interface of :class:`engine.binding.StepState`: ``prefill``, ``decode_one_token``, ``length``,
    ``next_ids`` (device, where the sampler writes), ``host_ids`` (page-locked host copy the loop
    reads), ``logits_2d``, ``kv_nbytes``. The mask lives on the device with ones on the valid
    positions and zeros past them; before each decode step a kernel sets the new token's column and
    writes its position. ``graph``: the decode step binds the full-width mask and never rebinds
    anything (what CUDA graph replay needs); otherwise it binds the mask view of the current width,
    as the CPU does (GroupQueryAttention's work grows with the mask width). Batch 1 (the Engine's).
    """

    packed_mask = None  # no batched steps on the device yet (the CPU StepState's batch mask)

    def __init__(
        self,
        session: ort.InferenceSession,
        spec: ModelSpec,
        ops: DeviceOps,
        *,
        batch: int = 1,
        max_length: int,
        last_token_logits: bool,
        graph: bool,
    ) -> None:
        if batch != 1:
            raise ValueError(f"DeviceStepState serves batch 1 (the Engine's), got batch={batch}")
        self.session = session
        self.spec = spec
        self.ops = ops
        self.batch = batch
        self.max_length = max_length
        self.last_token_logits = last_token_logits
        self.graph = graph
        self.length = 0  # tokens in the KV cache after the last run
        self.io = session.io_binding()
        self._prefill_options, self._decode_options = decode_run_options(graph=graph, asynchronous=ops.asynchronous)
        self.bind = FastBinding(session, self.io, self._decode_options)
        # ORT runs on the engine's stream (user_compute_stream) and touches it when its binding and
        # session are destroyed (arena frees of ORT-allocated outputs): each of them keeps the stream
        # alive, as the last attribute set so that its ORT object goes first when it is collected
        for holder in (session, self.io, self.bind):
            holder._engine_stream = getattr(ops, "stream", None)
        self._device = ops.device
        xp = ops.xp

        self._ids_dtype = spec.input_ids.dtype
        self._mask_dtype = spec.attention_mask.dtype if spec.attention_mask is not None else np.dtype(np.int64)
        self._pos_dtype = spec.position_ids.dtype if spec.position_ids is not None else self._ids_dtype
        with ops.scope():
            # (batch, 1) ids dtype, device: the decode step's input; the sampler writes next_ids
            self.input_ids = ops.zeros((batch, 1), self._ids_dtype)
            self.next_ids = self.input_ids.reshape(batch)  # (batch,) view of input_ids
            # (batch, max_length) ids dtype, device: the prompt; its (batch, P) prefix is bound at prefill
            self.prompt_ids = ops.zeros((batch, max_length), self._ids_dtype)
            # (batch, max_length) mask dtype, device: 1 on valid positions, 0 past them
            # (scratch for models without attention_mask)
            self.mask = ops.zeros((batch, max_length), self._mask_dtype)
            # (batch, max_length) position dtype, device: 0..max_length-1; the prefill binds a (batch, P) prefix
            self.prompt_positions = xp.arange(max_length, dtype=self._pos_dtype).reshape(batch, max_length)
            # (batch, 1) position dtype, device: position of the decoded token, written per step
            # (scratch for models without position_ids)
            self.position_ids = ops.zeros((batch, 1), self._pos_dtype)
            # (batch, 1, vocab) logits dtype, device: the last position's logits, written by ORT
            self.logits = ops.zeros((batch, 1, spec.vocab_size), spec.logits.dtype)
            self.logits_2d = self.logits[:, 0, :]  # (batch, vocab) view handed to the sampler
        # (batch,) ids dtype, page-locked host: the chosen ids, the one copy per step
        self.host_ids = ops.pinned_zeros((batch,), self._ids_dtype)

        self._ptr = {
            "ids": ops.ptr(self.input_ids),
            "prompt": ops.ptr(self.prompt_ids),
            "mask": ops.ptr(self.mask),
            "prompt_pos": ops.ptr(self.prompt_positions),
            "pos": ops.ptr(self.position_ids),
            "logits": ops.ptr(self.logits),
        }
        self._write_step = ops.step_writer(self._mask_dtype, self._pos_dtype)
        self._has_mask = spec.attention_mask is not None
        self._bind_mask_view = self._has_mask and not graph
        self._mask_name = spec.attention_mask.name if spec.attention_mask is not None else ""
        self._mask_ptr = self._ptr["mask"]

        # use_cache_branch (1,) bool of merged Optimum decoders, host OrtValues (the If condition lives on the CPU)
        self._cache_branch: dict[bool, Any] = {}
        if any(info.name == "use_cache_branch" for info in spec.extra_inputs):
            self._cache_branch = {
                flag: self.bind.value(ort.OrtValue.ortvalue_from_numpy(np.array([flag], dtype=np.bool_)))
                for flag in (False, True)
            }

        if spec.layout is KVLayout.GQA_SHARED:
            self.kv: DeviceKVCache | GrowingKVCache = DeviceKVCache(spec, ops, batch, max_length)
        else:
            self.kv = GrowingKVCache(spec, batch, device=ops.device)
        self._bind_logits()
        self.kv.bind(self.bind, outputs_before=1)
        ops.synchronize()  # the zero fills are done before ORT's first run
        self._released = False

    def release(self) -> None:
        """Let go of every bound value while the session is still alive: tensors ORT allocated on the
        device (the concat layouts' presents) must go back to its arena before the session that owns
        it is destroyed. Called by ``Engine.close()`` and when the state is collected; the state is
        unusable afterwards (nothing is bound)."""
        if getattr(self, "_released", True):
            return
        self._released = True
        with contextlib.suppress(Exception):  # also runs at interpreter exit, when anything may be gone
            self.ops.synchronize()
        with contextlib.suppress(Exception):
            self.io.clear_binding_inputs()
            self.io.clear_binding_outputs()

    def __del__(self) -> None:
        self.release()

    # ----------------------------------------------------------------------------------------
    @property
    def kv_nbytes(self) -> int:
        """Bytes of KV cache held now (share buffer: the whole preallocated buffer)."""
        if isinstance(self.kv, DeviceKVCache):
            return self.kv.nbytes
        return self.kv.bytes_per_token * self.length

    def _bind_logits(self) -> None:
        logits = self.spec.logits
        shape = (self.batch, 1, self.spec.vocab_size)
        self.bind.bind_output_ptr(logits.name, self._device, logits.dtype, shape, self._ptr["logits"])

    def _bind_decode_inputs(self) -> None:
        """The decode step's bindings; in graph mode they stay as they are for the rest of the request."""
        spec, bind, device, b = self.spec, self.bind, self._device, self.batch
        bind.bind_input_ptr(spec.input_ids.name, device, self._ids_dtype, (b, 1), self._ptr["ids"])
        if spec.position_ids is not None:
            bind.bind_input_ptr(spec.position_ids.name, device, self._pos_dtype, (b, 1), self._ptr["pos"])
        if self._has_mask and self.graph:
            bind.bind_input_ptr(self._mask_name, device, self._mask_dtype, (b, self.max_length), self._mask_ptr)
        if self._cache_branch:
            bind.bind_input("use_cache_branch", self._cache_branch[True])

    def prefill(self, prompt_ids: np.ndarray) -> Any:
        """Run the prompt ``(1, P)`` (host ids, copied once); returns the last position's logits ``(1, vocab)``."""
        spec, bind, ops, device = self.spec, self.bind, self.ops, self._device
        n = int(prompt_ids.shape[1])
        with ops.scope():
            ops.upload(self.prompt_ids[:, :n], np.ascontiguousarray(prompt_ids, dtype=self._ids_dtype))
            self.mask[:, :n] = 1
            self.mask[:, n:] = 0
        self.kv.start(bind)
        bind.bind_input_ptr(spec.input_ids.name, device, self._ids_dtype, (1, n), self._ptr["prompt"])
        if self._has_mask:
            bind.bind_input_ptr(self._mask_name, device, self._mask_dtype, (1, n), self._mask_ptr)
        if spec.position_ids is not None:
            bind.bind_input_ptr(spec.position_ids.name, device, self._pos_dtype, (1, n), self._ptr["prompt_pos"])
        if self._cache_branch:
            bind.bind_input("use_cache_branch", self._cache_branch[False])
        if not self.last_token_logits:
            bind.bind_output_device(spec.logits.name, device)  # (1, P, vocab) allocated by ORT for this run only
        bind.run_with(self._prefill_options)
        if not self.last_token_logits:
            full = bind.outputs()[0]
            with ops.scope():
                whole = ops.wrap(full.data_ptr(), tuple(full.shape()), spec.logits.dtype, full)
                self.logits[:, 0, :] = whole[:, -1, :]
            self._bind_logits()
        self.length = n
        self.kv.advance(bind)
        self._bind_decode_inputs()
        return self.logits_2d

    def decode_one_token(self) -> Any:
        """Run the token in ``next_ids`` at position ``length``; returns the new logits ``(batch, vocab)``."""
        length = self.length
        self._write_step(self.mask, self.position_ids, length)
        if self._bind_mask_view:
            self.bind.bind_input_ptr(self._mask_name, self._device, self._mask_dtype, (1, length + 1), self._mask_ptr)
        self.bind.run()
        self.length = length + 1
        self.kv.advance(self.bind)
        return self.logits_2d
