"""Device step state: every buffer of the decode loop on the device, allocated once, bound by pointer.

:class:`DeviceStepState` is the twin of :class:`engine.binding.StepState`: KV (share-buffer models:
:class:`DeviceKVCache`), input ids, attention mask, position ids and logits live on the device and
are bound to the IOBinding by address. The only host copy of a step is the chosen ids.

With a CUDA graph the decode step's bindings never change: a static ``(rows, max_length)`` mask
with zeros past each row's valid length, fixed input ids / positions / logits / KV addresses (rows
``0:n`` of the buffers), so ORT captures the step once per row count ``n`` (``gpu_graph_id`` n;
a single request is n = 1) and replays it; prompts run outside the graph (``gpu_graph_id`` -1).
``Run`` is told not to wait for the device when every consumer shares the engine's stream
(:func:`decode_run_options`).

Batches (share-buffer models): each row keeps its tokens in its own leading mask columns and KV
positions, with no padding; a kernel before each step marks each running row's next column and
writes its position (GroupQueryAttention reads only the mask's row sums). The host keeps the CPU
state's batch width (``length``) so that requests join a running batch where they join on the CPU.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import onnxruntime as ort

from ..binding import check_join
from ..config import KVLayout, ModelSpec
from ..iobinding import FastBinding
from ..kv_cache import GrowingKVCache
from .ops import DeviceOps

__all__ = ["DeviceKVCache", "DeviceStepState", "decode_run_options"]

DECODE_GRAPH_ID = "1"  # gpu_graph_id of the captured single-request step (a batch of n rows: n)
SKIP_GRAPH_ID = "-1"  # gpu_graph_id that runs without capture/replay (the prompt)


def decode_run_options(*, graph: bool, asynchronous: bool, rows: int = 1) -> tuple[ort.RunOptions, ort.RunOptions]:
    """RunOptions of the prompt and of the decode steps of ``rows`` rows.

    ``graph``: the prompt runs outside the graph (gpu_graph_id -1), the decode step of ``rows`` rows
    is graph ``rows`` (1: a single request). ``asynchronous``: ``Run`` returns once the work is
    enqueued (every consumer is on the same stream).
    """
    prefill, decode = ort.RunOptions(), ort.RunOptions()
    if graph:
        prefill.add_run_config_entry("gpu_graph_id", SKIP_GRAPH_ID)
        decode.add_run_config_entry("gpu_graph_id", str(rows))
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
        self._row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        self.nbytes = len(self.names) * math.prod(self.shape) * self.dtype.itemsize

    def bind(self, bind: FastBinding, outputs_before: int = 0) -> None:
        """Bind row 0 of every buffer as past and present (a single request)."""
        self.bind_rows(bind, 0, 1)

    def bind_rows(self, bind: FastBinding, start: int, stop: int) -> None:
        """Bind rows ``start:stop`` of every buffer as past and present (leading-row views: contiguous).
        A batch of ``n`` rows decodes on rows ``0:n``; a row's own prompt is prefilled on ``b:b+1``."""
        shape = (stop - start, *self.shape[1:])
        offset = start * self._row_bytes
        for (past, present), ptr in zip(self.names, self._ptrs, strict=True):
            bind.bind_input_ptr(past, self.device, self.dtype, shape, ptr + offset)
            bind.bind_output_ptr(present, self.device, self.dtype, shape, ptr + offset)

    def start(self, bind: FastBinding) -> None:
        """Nothing to reset: the attention mask says which rows are valid."""

    def advance(self, bind: FastBinding) -> None:
        """Nothing to do: the kernel wrote the new rows in place."""


class DeviceStepState:
    """Every buffer of the decode loop on the device, allocated once and bound by pointer.

    The interface of :class:`engine.binding.StepState` (``prefill``, ``decode_one_token``, ``length``,
    ``next_ids`` (device, where the sampler writes), ``host_ids`` (page-locked host copy the loop
    reads), ``logits_2d``, ``kv_nbytes``) and, with ``batch > 1`` on a share-buffer model, of its
    batches (``prefill_rows``, ``decode_rows``, ``join_row``, ``finished``). The mask lives on the
    device with ones on each row's valid positions and zeros past them; before each decode step a
    kernel sets the new token's column and writes its position. ``graph``: the decode step binds
    the full-width mask and never rebinds anything (what CUDA graph replay needs); otherwise a single
    request binds the mask view of the current width, as the CPU does (GroupQueryAttention's work
    grows with the mask width), and a batch the full width (its rows are not contiguous otherwise).
    """

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
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if batch > 1 and spec.layout is not KVLayout.GQA_SHARED:
            raise ValueError(
                f"DeviceStepState runs batches on share-buffer GQA models only; this one is {spec.layout.value}"
            )
        self.session = session
        self.spec = spec
        self.ops = ops
        self.batch = batch
        self.max_length = max_length
        self.last_token_logits = last_token_logits
        self.graph = graph
        self.length = 0  # tokens in the KV cache after the last run; a batch: the CPU state's width
        self.rows = 1  # rows of the current request
        self.io = session.io_binding()
        self._prefill_options, self._decode_options = decode_run_options(graph=graph, asynchronous=ops.asynchronous)
        self._rows_options: dict[int, ort.RunOptions] = {1: self._decode_options}  # decode steps of n rows
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
        flat = batch * max_length
        with ops.scope():
            # (batch, 1) ids dtype, device: the decode step's input; the sampler writes next_ids
            self.input_ids = ops.zeros((batch, 1), self._ids_dtype)
            self.next_ids = self.input_ids.reshape(batch)  # (batch,) view of input_ids
            # (batch * max_length,) ids dtype, device: prompts; a prefill binds its (rows, P) prefix
            self.prompt_ids = ops.zeros((flat,), self._ids_dtype)
            # (batch, max_length) mask dtype, device: 1 on each row's valid positions, 0 past them
            # (scratch for models without attention_mask)
            self.mask = ops.zeros((batch, max_length), self._mask_dtype)
            # (batch * max_length,) mask dtype, device: ones; a prefill of several rows binds a (rows, P) prefix
            self.prompt_mask = xp.ones((flat,), dtype=self._mask_dtype)
            # (max_length,) position dtype, device: 0..max_length-1; a prompt of one row binds a (1, P) prefix
            self.prompt_positions = xp.arange(max_length, dtype=self._pos_dtype)
            # (batch * max_length,) position dtype, device: (rows, P) positions of a several-row prompt
            self.grid_positions = ops.zeros((flat,), self._pos_dtype)
            # (batch, 1) position dtype, device: position of each row's decoded token, written per step
            # (scratch for models without position_ids)
            self.position_ids = ops.zeros((batch, 1), self._pos_dtype)
            # (batch,) int64, device: tokens each row holds (a batch's rows; the per-row kernel counts them)
            self.lengths = ops.zeros((batch,), np.int64)
            # (batch,) uint8, device: the host's finished flags as of the last step
            self.finished_device = ops.zeros((batch,), np.uint8)
            # (batch, 1, vocab) logits dtype, device: the last position's logits, written by ORT
            self.logits = ops.zeros((batch, 1, spec.vocab_size), spec.logits.dtype)
            self.logits_2d = self.logits[:, 0, :]  # (batch, vocab) view handed to the sampler
            self._logits_one = self.logits_2d[:1]  # (1, vocab): what a single request's steps return
            self._mask_one, self._position_one = self.mask[:1], self.position_ids[:1]  # row 0: a single request
        # (batch,) ids dtype, page-locked host: the chosen ids, the one copy per step
        self.host_ids = ops.pinned_zeros((batch,), self._ids_dtype)
        # (batch,) uint8, page-locked host: 1 for rows masked from the next step on (the loop writes it);
        # the copy last sent to the device beside it (sent again only when a row finishes or joins)
        self.finished = ops.pinned_zeros((batch,), np.uint8)
        self._finished_sent = ops.pinned_zeros((batch,), np.uint8)
        self._finished_view = memoryview(self.finished)
        self._sent_view = memoryview(self._finished_sent)

        self._ptr = {
            "ids": ops.ptr(self.input_ids),
            "prompt": ops.ptr(self.prompt_ids),
            "mask": ops.ptr(self.mask),
            "prompt_mask": ops.ptr(self.prompt_mask),
            "prompt_pos": ops.ptr(self.prompt_positions),
            "grid_pos": ops.ptr(self.grid_positions),
            "pos": ops.ptr(self.position_ids),
            "logits": ops.ptr(self.logits),
        }
        self._mask_row_bytes = max_length * self._mask_dtype.itemsize
        self._logits_row_bytes = spec.vocab_size * spec.logits.dtype.itemsize
        self._write_step = ops.step_writer(self._mask_dtype, self._pos_dtype)
        self._write_rows = ops.rows_writer(self._mask_dtype, self._pos_dtype)
        self._has_mask = spec.attention_mask is not None
        self._bind_mask_view = self._has_mask and not graph
        self._mask_name = spec.attention_mask.name if spec.attention_mask is not None else ""
        self._mask_ptr = self._ptr["mask"]
        # a batch's mask, for the loops' "does this state run batches" (None: it runs none)
        self.packed_mask = self.mask if batch > 1 and self._has_mask else None

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
        self._bind_logits(0, 1)
        self.kv.bind(self.bind, outputs_before=1)
        self._bound_rows = 1  # rows the logits output and the KV cache are bound for
        ops.synchronize()  # the fills are done before ORT's first run
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

    def _bind_logits(self, start: int, stop: int) -> None:
        """Bind the logits output to rows ``start:stop`` of the logits buffer."""
        logits = self.spec.logits
        shape = (stop - start, 1, self.spec.vocab_size)
        ptr = self._ptr["logits"] + start * self._logits_row_bytes
        self.bind.bind_output_ptr(logits.name, self._device, logits.dtype, shape, ptr)

    def _bind_rows(self, n: int) -> None:
        """Bind the logits output and the KV cache for rows 0:n (no-op when already so)."""
        if self._bound_rows != n:
            self._bind_logits(0, n)
            if isinstance(self.kv, DeviceKVCache):
                self.kv.bind_rows(self.bind, 0, n)
            self._bound_rows = n

    def _bind_decode_inputs(self, n: int, batched: bool) -> None:
        """The decode step's bindings for ``n`` rows; in graph mode and for batches (``batched``: the
        full-width mask) they stay as they are for the rest of the request."""
        spec, bind, device = self.spec, self.bind, self._device
        bind.bind_input_ptr(spec.input_ids.name, device, self._ids_dtype, (n, 1), self._ptr["ids"])
        if spec.position_ids is not None:
            bind.bind_input_ptr(spec.position_ids.name, device, self._pos_dtype, (n, 1), self._ptr["pos"])
        if self._has_mask and (self.graph or batched):
            bind.bind_input_ptr(self._mask_name, device, self._mask_dtype, (n, self.max_length), self._mask_ptr)
        if self._cache_branch:
            bind.bind_input("use_cache_branch", self._cache_branch[True])

    def _run_prompt(self, start: int, prompts: list[np.ndarray]) -> None:
        """Run ``rows`` prompts of one length ``P`` on rows ``start:start + rows`` of the KV cache (the
        prompt runs outside any graph); their last position's logits land in those rows of ``logits``."""
        spec, bind, ops, device = self.spec, self.bind, self.ops, self._device
        rows, p = len(prompts), int(prompts[0].size)
        with ops.scope():
            ops.upload(self.prompt_ids[: rows * p], np.concatenate(prompts).astype(self._ids_dtype, copy=False))
        if isinstance(self.kv, DeviceKVCache):
            self.kv.bind_rows(bind, start, start + rows)
        else:
            self.kv.start(bind)
        self._bind_logits(start, start + rows)
        self._bound_rows = 0  # rebound for the decode steps after it
        bind.bind_input_ptr(spec.input_ids.name, device, self._ids_dtype, (rows, p), self._ptr["prompt"])
        if self._has_mask:
            bind.bind_input_ptr(self._mask_name, device, self._mask_dtype, (rows, p), self._ptr["prompt_mask"])
        if spec.position_ids is not None:
            positions = "prompt_pos"
            if rows > 1:  # (rows, P): each row 0..P-1
                with ops.scope():
                    grid = self.grid_positions[: rows * p].reshape(rows, p)
                    grid[...] = self.prompt_positions[:p]
                positions = "grid_pos"
            bind.bind_input_ptr(spec.position_ids.name, device, self._pos_dtype, (rows, p), self._ptr[positions])
        if self._cache_branch:
            bind.bind_input("use_cache_branch", self._cache_branch[False])
        if not self.last_token_logits:
            bind.bind_output_device(spec.logits.name, device)  # (rows, P, vocab) allocated by ORT for this run only
        bind.run_with(self._prefill_options)
        if not self.last_token_logits:
            full = bind.outputs()[0]
            with ops.scope():
                whole = ops.wrap(full.data_ptr(), tuple(full.shape()), spec.logits.dtype, full)
                self.logits[start : start + rows, 0, :] = whole[:, -1, :]
        self.kv.advance(bind)

    def _set_mask_row(self, row: int, p: int) -> None:
        """Row ``row`` of the mask: ones on its ``p`` tokens, zeros past them."""
        with self.ops.scope():
            self.mask[row, :p] = 1
            self.mask[row, p:] = 0

    # ----------------------------------------------------------------------------------------
    # one request (row 0)

    def prefill(self, prompt_ids: np.ndarray) -> Any:
        """Run the prompt ``(1, P)`` (host ids, copied once); returns the last position's logits ``(1, vocab)``."""
        n = int(prompt_ids.shape[1])
        self._set_mask_row(0, n)
        self.rows = 1
        self._run_prompt(0, [np.asarray(prompt_ids[0])])
        self._bind_rows(1)
        self.length = n
        self._bind_decode_inputs(1, batched=False)
        self.bind.run_options = self._decode_options
        return self._logits_one

    def decode_one_token(self) -> Any:
        """Run the token in ``next_ids[0]`` at position ``length``; returns the new logits ``(1, vocab)``."""
        length = self.length
        self._write_step(self._mask_one, self._position_one, length)
        if self._bind_mask_view:
            self.bind.bind_input_ptr(self._mask_name, self._device, self._mask_dtype, (1, length + 1), self._mask_ptr)
        self.bind.run()
        self.length = length + 1
        self.kv.advance(self.bind)
        return self._logits_one

    # ----------------------------------------------------------------------------------------
    # batches (share-buffer models, batch > 1)

    def _check_batches(self) -> None:
        if self.packed_mask is None:
            raise ValueError("batches need a DeviceStepState with batch > 1 on a share-buffer model with a mask")

    def _send_finished(self) -> None:
        """Copy the host's finished flags to the device when they changed since the last copy (a row
        ended or joined: rare, and the step before has been waited for by then)."""
        if self._finished_view != self._sent_view:
            self.ops.synchronize()  # an earlier copy out of the page-locked flags has been made
            self._sent_view[:] = self._finished_view
            self.ops.upload(self.finished_device, self._finished_sent)

    def _start_rows(self, n: int) -> None:
        """Rows 0:n run from here on: their bindings, graph and finished flags."""
        self.rows = n
        options = self._rows_options.get(n)
        if options is None:
            options = self._rows_options[n] = decode_run_options(
                graph=self.graph, asynchronous=self.ops.asynchronous, rows=n
            )[1]
        self.bind.run_options = options
        self._bind_rows(n)
        self._bind_decode_inputs(n, batched=True)

    def prefill_rows(self, prompts: list[np.ndarray], max_steps: int, starts: list[int] | None = None) -> Any:
        """Prefill a batch of ``n`` prompts (1-D int64 arrays), each on its own KV row; returns the
        logits ``(n, vocab)``. Each run of consecutive prompts of the same length is one pass, as on
        the CPU (engine.binding.StepState.prefill_rows). After it :meth:`decode_rows` may run
        ``max_steps`` times (``max(len) + max_steps <= max_length``, else ValueError). ``starts``
        must be all 0: the prefix cache runs on the CPU state only."""
        _no_cached_prefix(starts or [0])
        self._check_batches()
        n = len(prompts)
        if not 1 <= n <= self.batch:
            raise ValueError(f"prefill_rows takes 1 to {self.batch} prompts, got {n}")
        sizes = [int(p.size) for p in prompts]
        width = max(sizes)
        if min(sizes) < 1:
            raise ValueError("prefill_rows takes non-empty prompts")
        if width + max_steps > self.max_length:
            raise ValueError(f"width {width} + {max_steps} steps exceeds max_length {self.max_length}")
        start = 0
        while start < n:  # each run of consecutive prompts of one length: one forward pass
            stop = start + 1
            while stop < n and sizes[stop] == sizes[start]:
                stop += 1
            self._run_prompt(start, prompts[start:stop])
            start = stop
        host_mask = (np.arange(self.max_length)[None, :] < np.array(sizes)[:, None]).astype(self._mask_dtype)
        with self.ops.scope():
            self.ops.upload(self.mask[:n], host_mask)  # (n, max_length): ones on each row's prompt
            self.ops.upload(self.lengths[:n], np.array(sizes, np.int64))
        self.finished[:n] = 0
        self._send_finished()
        self.length = width
        self._start_rows(n)
        return self.logits_2d[:n]

    def decode_rows(self) -> Any:
        """One step of the batch: rows' tokens in ``next_ids[:n]``; rows with ``finished[b]`` set are
        masked from now on. Returns the logits ``(batch, vocab)`` (rows 0:n valid)."""
        n = self.rows
        self._send_finished()
        self._write_rows(self.mask, self.position_ids, self.lengths, self.finished_device, n)
        self.bind.run()
        self.length += 1
        return self.logits_2d

    def join_row(self, row: int, prompt: np.ndarray, max_steps: int, start: int = 0) -> None:
        """Start a new prompt (1-D int64) on ``row`` of the running batch, between two decode steps: a
        stopped row, or row ``rows`` to grow the batch by one. The checks and the result are the CPU
        state's (engine.binding.StepState.join_row): ``len(prompt) <= length`` and ``length +
        max_steps <= max_length``, else ValueError; its logits replace the row's in ``logits``.
        ``start`` must be 0 (the prefix cache runs on the CPU state only)."""
        _no_cached_prefix([start])
        self._check_batches()
        n, width, p = self.rows, self.length, int(prompt.size)
        check_join(
            row, n, self.batch, bool(self.finished[row]) if row < n else True, width, p, max_steps, self.max_length
        )
        self._set_mask_row(row, p)
        self._run_prompt(row, [prompt])
        with self.ops.scope():
            self.lengths[row : row + 1] = p
        self.finished[row] = 0
        self._send_finished()
        self._start_rows(max(n, row + 1))


def _no_cached_prefix(starts: list[int]) -> None:
    """The device state keeps no prefix records: every prompt runs whole."""
    if any(starts):
        raise ValueError(f"the device step state runs whole prompts only (cached starts {starts})")
