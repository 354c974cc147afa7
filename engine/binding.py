"""IOBinding of one step: every buffer the decode loop touches, allocated once and bound once.

:class:`StepState` is the engine's ``RunState``: it owns the input ids, the attention mask, the
position ids, the logits and the KV cache of one Engine, binds them to the session once, and
exposes the two phases of a request:

* :meth:`StepState.prefill` runs the whole prompt once (KV written into the cache) and returns
  the last position's logits;
* :meth:`StepState.decode_one_token` runs the token that the sampler has already written into
  ``next_ids`` (a view of the bound ``input_ids`` buffer) and returns the new logits.

A decode step writes values only: on the CPU it binds a precreated OrtValue view of the mask at
the current width and, for models with ``position_ids``, writes one position.

The CUDA twin of this class, with every buffer on the device, is
:class:`engine.cuda.DeviceStepState`; both give the generation loop ``next_ids`` (where the sampler
writes) and ``host_ids`` (where the loop reads the token; here the same array).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .config import ModelSpec
from .conv_state import ConvStateCache
from .iobinding import FastBinding
from .kv_cache import GrowingKVCache, StaticKVCache, make_kv_cache
from .masks import advance_packed, prepare_left_padded

_MAX_CACHED = 64  # row-range OrtValues kept for reuse before the cache is emptied
_PACKED_ROW_COUNTS = 4  # batch sizes whose packed-mask views are kept


def check_join(
    row: int, rows: int, batch: int, finished: bool, width: int, p: int, max_steps: int, max_length: int
) -> None:
    """The rule both step states (CPU and device) apply before a prompt of ``p`` tokens joins row
    ``row`` of a running batch of ``rows`` rows and ``width`` columns: a stopped row or the next
    one, a prompt no wider than the batch, and room for ``max_steps`` more steps. ValueError
    otherwise."""
    if not 0 <= row <= rows or row >= batch:
        raise ValueError(f"row {row} is neither a row of the running batch (0..{rows - 1}) nor the next one")
    if row < rows and not finished:
        raise ValueError(f"row {row} is still running")
    if not 1 <= p <= width or width + max_steps > max_length:
        raise ValueError(
            f"a prompt of {p} tokens with {max_steps} more steps does not fit the batch "
            f"(width {width}, max_length {max_length})"
        )


class StepState:
    """Preallocated, pre-bound buffers of one Engine: up to ``batch`` rows, fixed max length.

    One request (:meth:`prefill` then :meth:`decode_one_token`) uses row 0. A batch of ``n`` rows
    (:meth:`prefill_rows` then :meth:`decode_rows`) uses rows ``0:n`` of the same buffers, bound as
    contiguous views of their leading rows; its mask is kept gap-free at the start of a flat buffer
    (:func:`engine.masks.advance_packed`) so that a ``(n, width)`` OrtValue over it exists for every
    width.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        spec: ModelSpec,
        *,
        batch: int,
        max_length: int,
        last_token_logits: bool,
        device: str = "cpu",
    ) -> None:
        self.session = session
        self.spec = spec
        self.batch = batch
        self.max_length = max_length
        self.last_token_logits = last_token_logits
        self.io = session.io_binding()
        self.bind = FastBinding(session, self.io, None)
        bind = self.bind
        self.length = 0  # tokens in the KV cache (valid positions) after the last run; a batch: its width
        self.rows = 1  # rows of the current request

        def handles(array: np.ndarray) -> list:
            """[None, view of row 0, rows 0:2, ..., rows 0:batch] as bindable handles (kept alive)."""
            values = [ort.OrtValue.ortvalue_from_numpy(array[:n]) for n in range(1, batch + 1)]
            self._keep.extend(values)
            return [None] + [bind.value(v) for v in values]

        self._keep: list[ort.OrtValue] = []
        ids_dtype = spec.input_ids.dtype
        # (batch, 1) int64/int32, cpu: the decode step's input; the sampler writes into next_ids
        self.input_ids = np.zeros((batch, 1), dtype=ids_dtype)
        self.next_ids = self.input_ids[:, 0]  # (batch,) view of input_ids
        # (batch,) the ids the generation loop reads; on the CPU they are next_ids itself (no copy)
        self.host_ids = self.next_ids
        self._ids_handles = handles(self.input_ids)

        # (1, max_length) int64/int32, cpu: all ones; a single request binds a view of the current width
        self.mask = None
        self._mask_values: list[ort.OrtValue] = []
        self._mask_handles: list = []
        if spec.attention_mask is not None:
            self.mask = np.ones((1, max_length), dtype=spec.attention_mask.dtype)
            # OrtValues over mask[:, :w] for every width w, made once (a view of a (1, max) row is contiguous)
            self._mask_values = [ort.OrtValue.ortvalue_from_numpy(self.mask[:, :w]) for w in range(max_length + 1)]
            self._mask_handles = [bind.value(v) for v in self._mask_values]
        # (batch * max_length,) int64/int32, cpu: a batch's (rows, width) mask, packed at the start;
        # (rows, width) views and their handles are made per row count up to the widths a request needs
        self.packed_mask = None
        self._packed: dict[int, tuple[list[np.ndarray], list[ort.OrtValue], list]] = {}
        if spec.attention_mask is not None and batch > 1:
            self.packed_mask = np.zeros(batch * max_length, dtype=spec.attention_mask.dtype)
        self.lengths = np.zeros(batch, np.int64)  # (batch,) tokens each row holds (padding not counted)
        self._views_end = 0  # a running batch: the widest mask any of its rows may still need
        self.finished = np.zeros(batch, np.uint8)  # (batch,) 1 for rows that stopped: masked from then on

        # (batch, 1) int64/int32, cpu: position of the decoded token
        self.position_ids = None
        self._position_flat = None
        if spec.position_ids is not None:
            self.position_ids = np.zeros((batch, 1), dtype=spec.position_ids.dtype)
            self._position_flat = self.position_ids.reshape(-1)  # (batch,) view written per step
            self._position_handles = handles(self.position_ids)

        # (batch, 1, vocab) float32/float16, cpu: logits of the last position, written by ORT
        self.logits = np.zeros((batch, 1, spec.vocab_size), dtype=spec.logits.dtype)
        self.logits_2d = self.logits[:, 0, :]  # (batch, vocab) view handed to the sampler
        self._logits_handles = handles(self.logits)
        self._logits_one = self.logits_2d[:1]  # (1, vocab) view: what a single request's steps return
        # (start, stop) -> (OrtValue, handle) of logits[start:stop] (the prefill of a run of rows)
        self._logits_range_handles: dict[tuple[int, int], tuple] = {}

        # use_cache_branch (1,) bool of merged Optimum decoders: False for the prompt, True after
        self._cache_branch: dict[bool, ort.OrtValue] = {}
        if any(info.name == "use_cache_branch" for info in spec.extra_inputs):
            self._cache_branch = {
                flag: ort.OrtValue.ortvalue_from_numpy(np.array([flag], dtype=np.bool_)) for flag in (False, True)
            }

        self.kv: StaticKVCache | GrowingKVCache = make_kv_cache(spec, batch, max_length, device)
        # hybrid models (LFM2): the conv layers' fixed-size states, zeroed per request and per row
        self.conv = ConvStateCache(spec, batch) if spec.conv_names else None
        self._static = isinstance(self.kv, StaticKVCache)
        self._grows = not self._static  # presents must be handed back as past each step
        self._mask_name = spec.attention_mask.name if spec.attention_mask is not None else ""
        bind.bind_output(spec.logits.name, self._logits_handles[1])
        self.kv.bind(bind, outputs_before=1)  # rows 0:1 of a static cache: a single request
        self._bound_rows = 1  # rows the logits output and the KV cache are bound for
        self._released = False

    def release(self) -> None:
        """Let go of every bound input and output (the growing layouts' ORT-allocated presents too),
        as :meth:`engine.cuda.DeviceStepState.release` does; called by ``Engine.close()``. Calling it
        again does nothing; the state is unusable afterwards (nothing is bound)."""
        if self._released:
            return
        self._released = True
        self.io.clear_binding_inputs()
        self.io.clear_binding_outputs()

    # ----------------------------------------------------------------------------------------
    @property
    def kv_nbytes(self) -> int:
        """Bytes of KV cache held now (static: the whole preallocated buffer), conv states included."""
        conv = self.conv.nbytes if self.conv is not None else 0
        if isinstance(self.kv, StaticKVCache):
            return self.kv.nbytes + conv
        return self.spec.kv_bytes_per_token * self.rows * self.length + conv

    def _bind_rows(self, n: int) -> None:
        """Bind the logits output and the static KV cache for rows 0:n (no-op when already so)."""
        if self._bound_rows != n:
            self.bind.bind_output(self.spec.logits.name, self._logits_handles[n])
            if self._static:
                self.kv.bind_rows(self.bind, 0, n)
            self._bound_rows = n

    def _bind_decode_inputs(self, n: int) -> None:
        """The decode-step bindings that stay fixed for the rest of a request of ``n`` rows."""
        bind = self.bind
        bind.bind_input(self.spec.input_ids.name, self._ids_handles[n])
        if self.position_ids is not None:
            bind.bind_input(self.spec.position_ids.name, self._position_handles[n])
        if self._cache_branch:
            bind.bind_input("use_cache_branch", bind.value(self._cache_branch[True]))

    def _run_prompt(self, ids: np.ndarray, mask, positions: np.ndarray | None, logits_row: int) -> None:
        """Run prompt ids ``(rows, P)`` with the bound KV; the last position's logits land in
        ``logits[logits_row:logits_row + rows]`` (the bound logits output, or copied when ORT returns
        every position because the graph was not edited). ``mask``: a handle or an array."""
        spec, io, bind = self.spec, self.io, self.bind
        io.bind_cpu_input(spec.input_ids.name, ids)
        if self.mask is not None:
            if isinstance(mask, np.ndarray):
                io.bind_cpu_input(spec.attention_mask.name, mask)
            else:
                bind.bind_input(spec.attention_mask.name, mask)
        if positions is not None:
            io.bind_cpu_input(spec.position_ids.name, positions)
        if self._cache_branch:
            bind.bind_input("use_cache_branch", bind.value(self._cache_branch[False]))
        if not self.last_token_logits:
            bind.bind_output_device(spec.logits.name, "cpu")  # (rows, P, vocab) allocated by ORT for this run only
        bind.run()
        if not self.last_token_logits:
            full = io.get_outputs()[0].numpy()
            rows = ids.shape[0]
            self.logits[logits_row : logits_row + rows, 0, :] = full[:, -1, :]
            self._bound_rows = 0  # the logits output is bound to ORT's memory: rebind before the next run

    def _logits_range(self, start: int, stop: int):
        """Handle of ``logits[start:stop]`` (the prefill of a run of rows); a bounded cache."""
        handle = self._logits_range_handles.get((start, stop))
        if handle is None:
            if len(self._logits_range_handles) >= _MAX_CACHED:
                self._logits_range_handles.clear()
            value = ort.OrtValue.ortvalue_from_numpy(self.logits[start:stop])
            handle = self._logits_range_handles[start, stop] = (value, self.bind.value(value))
        return handle[1]

    def _positions(self, n: int, start: int = 0) -> np.ndarray | None:
        """(1, n - start) positions start..n-1 of a prompt, or None for models without position_ids."""
        if self.position_ids is None:
            return None
        return np.arange(start, n, dtype=self.spec.position_ids.dtype)[None, :]

    def prefill(self, prompt_ids: np.ndarray) -> np.ndarray:
        """Run the prompt ``(1, P)`` through the model; returns the last position's logits ``(1, vocab)``."""
        n = prompt_ids.shape[1]
        self.rows = 1
        self._bind_rows(1)
        self.kv.start(self.bind, 1)
        if self.conv is not None:
            self.conv.start_rows(self.bind, 0, 1)
        # (1, P) int64/int32, cpu: made per request (prefill may allocate; the decode loop may not)
        ids = np.ascontiguousarray(prompt_ids, dtype=self.spec.input_ids.dtype)
        self._run_prompt(ids, self._mask_handles[n] if self._mask_handles else None, self._positions(n), 0)
        self._bind_rows(1)
        self.length = n
        self.kv.advance(self.bind)
        self._bind_decode_inputs(1)
        return self._logits_one

    def decode_one_token(self) -> np.ndarray:
        """Run the token in ``next_ids[0]`` at position ``length``; returns the new logits ``(1, vocab)``."""
        length = self.length
        bind = self.bind
        if self._mask_handles:
            bind.bind_input(self._mask_name, self._mask_handles[length + 1])
        if self._position_flat is not None:
            self._position_flat[0] = length
        if self.conv is not None:
            self.conv.step(bind, 1)
        bind.run()
        self.length = length + 1
        if self._grows:
            self.kv.advance(bind)
        return self._logits_one

    # ----------------------------------------------------------------------------------------
    # several new tokens over the cache (row 0, share-buffer GQA caches): a speculative verify
    # step, or a prompt's suffix after a cached prefix

    def enable_multi_token(self, width: int) -> None:
        """Make the buffers of :meth:`decode_tokens` for up to ``width`` tokens per run (once per
        Engine; the graph must return logits for every new position). Share-buffer caches only:
        tokens rejected later are dropped by :meth:`rewind` (bookkeeping, no KV copy)."""
        if not self._static or self.mask is None:
            raise ValueError("several tokens per step need a share-buffer GQA cache with an attention_mask input")
        spec = self.spec
        # (1, width) int64/int32, cpu: the pending token then the drafts; the loop writes multi_ids[0, :n]
        self.multi_ids = np.zeros((1, width), dtype=spec.input_ids.dtype)
        # (1, width, vocab) float32/float16, cpu: logits of every new position, written by ORT
        self.multi_logits = np.zeros((1, width, spec.vocab_size), dtype=spec.logits.dtype)
        self._multi_logits_2d = self.multi_logits[0]  # (width, vocab) view handed to the sampler
        self._arange = np.arange(width, dtype=np.int64)  # (width,) 0..width-1, for positions

        def views(array: np.ndarray) -> list:
            """[None, handle of array[:, :1], ..., array[:, :width]] (views of one row are contiguous)."""
            values = [ort.OrtValue.ortvalue_from_numpy(array[:, :n]) for n in range(1, width + 1)]
            self._keep.extend(values)
            return [None] + [self.bind.value(v) for v in values]

        self._multi_ids_handles = views(self.multi_ids)
        self._multi_logits_handles = views(self.multi_logits)
        self._multi_positions = None
        if spec.position_ids is not None:
            # (1, width) int64/int32, cpu: positions of the new tokens
            self._multi_positions = np.zeros((1, width), dtype=spec.position_ids.dtype)
            self._multi_position_handles = views(self._multi_positions)
        self.multi_width = width

    def decode_tokens(self, n: int) -> np.ndarray:
        """Run ``multi_ids[0, :n]`` at positions ``length .. length + n - 1`` in one pass; returns
        the logits of every one of them ``(n, vocab)`` (a view) and leaves the single-token step
        bound again. ``length`` grows by ``n``; :meth:`rewind` drops the tokens not kept."""
        length, bind, spec = self.length, self.bind, self.spec
        bind.bind_input(spec.input_ids.name, self._multi_ids_handles[n])
        bind.bind_input(self._mask_name, self._mask_handles[length + n])
        if self._multi_positions is not None:
            np.add(self._arange[:n], length, out=self._multi_positions[0, :n], casting="unsafe")
            bind.bind_input(spec.position_ids.name, self._multi_position_handles[n])
        bind.bind_output(spec.logits.name, self._multi_logits_handles[n])
        bind.run()
        self.length = length + n
        bind.bind_output(spec.logits.name, self._logits_handles[1])  # back to the single-token step
        self._bind_decode_inputs(1)
        return self._multi_logits_2d[:n]

    def rewind(self, length: int) -> None:
        """Keep only the first ``length`` cached positions (share buffer: the next step's shorter
        mask hides the rest, and later steps overwrite them)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind to {length}: the cache holds {self.length} positions")
        self.length = length

    def prefill_from(self, prompt_ids: np.ndarray, start: int) -> np.ndarray:
        """Run ``prompt_ids[:, start:]`` over the first ``start`` cached positions (which must hold
        ``prompt_ids[:, :start]``): a prompt whose prefix is cached. Returns the last position's
        logits ``(1, vocab)``, as :meth:`prefill` does."""
        n = prompt_ids.shape[1]
        if not self._static or self.mask is None or not 0 < start < n or start > self.length:
            raise ValueError(f"cannot continue a prompt of {n} tokens from {start} cached positions")
        self.rows = 1
        self._run_row(0, prompt_ids[0], start)
        self._bound_rows = 0  # _run_row bound row 0's KV and logits range: rebind the step's
        self._bind_rows(1)
        self.length = n
        self._bind_decode_inputs(1)
        return self._logits_one

    # ----------------------------------------------------------------------------------------
    # batches

    def _packed_views(self, n: int, max_width: int) -> tuple[list[np.ndarray], list]:
        """(n, w) views of the packed mask and their handles for w = 0..max_width (extended on demand;
        kept for the last few row counts used)."""
        assert self.packed_mask is not None
        entry = self._packed.pop(n, None)
        if entry is None:
            while len(self._packed) >= _PACKED_ROW_COUNTS:
                self._packed.pop(next(iter(self._packed)))  # the least recently used row count
            entry = ([], [], [])
        self._packed[n] = entry  # most recently used last
        views, values, handles = entry
        # an interrupt between the three appends below leaves them of unequal length: cut them back
        # to the widths all three hold, so that the cache heals instead of failing every later batch
        done = min(len(views), len(values), len(handles))
        del views[done:], values[done:], handles[done:]
        for w in range(done, max_width + 1):
            view = self.packed_mask[: n * w].reshape(n, w)
            value = ort.OrtValue.ortvalue_from_numpy(view)
            views.append(view)
            values.append(value)
            handles.append(self.bind.value(value))
        return views, handles

    def prefill_rows(self, prompts: list[np.ndarray], max_steps: int, starts: list[int] | None = None) -> np.ndarray:
        """Prefill a batch of ``n`` prompts (1-D int64 arrays); returns the logits ``(n, vocab)``.

        No padding enters a forward pass: each run of consecutive prompts of the same length is one
        pass of its own, exactly the single-request prefill of those rows. Share-buffer GQA caches
        run it on the rows' own cache rows (in the decode steps ``seqlens_k``, the mask's row sums,
        gives every row its own length, so the cache holds no padding at all). Growing caches copy
        each run's presents into a zero-filled ``(n, ..., width, ...)`` past, right-aligned: the
        padding is masked and finite. After it, the mask is the left-padded ``(n, width)`` one
        (packed) and :meth:`decode_rows` may run ``max_steps`` times.

        ``starts`` (share-buffer caches; the prefix cache): row ``b``'s first ``starts[b]`` positions
        are cached in its own row already (``0 <= starts[b] < len(prompts[b])``); a row with a
        cached prefix runs the rest of its prompt alone, from that offset (as :meth:`prefill_from`
        does on row 0).
        """
        if self.packed_mask is None:
            raise ValueError("prefill_rows needs a StepState with batch > 1 and an attention_mask input")
        spec, bind = self.spec, self.bind
        n = len(prompts)
        if not 1 <= n <= self.batch:
            raise ValueError(f"prefill_rows takes 1 to {self.batch} prompts, got {n}")
        if starts is not None:
            if len(starts) != n or not all(0 <= s < p.size for s, p in zip(starts, prompts, strict=True)):
                raise ValueError(f"starts {starts} do not fit prompts of {[p.size for p in prompts]} tokens")
            if any(starts) and not self._static:
                raise ValueError("cached prefixes need a share-buffer GQA cache")
        lengths = self.lengths[:n]
        lengths[:] = [p.size for p in prompts]
        width = int(lengths.max())
        if width + max_steps > self.max_length:
            raise ValueError(f"width {width} + {max_steps} steps exceeds max_length {self.max_length}")
        views, handles = self._packed_views(n, width + max_steps)
        self._views_end = width + max_steps  # the widest mask a row of this batch may still need
        self.rows = n
        self._bound_rows = 0  # the runs below bind other rows: rebind rows 0:n after them
        # growing caches: (n, ..., width, ...) pasts, one per layer (and K/V), zero on the padding
        merged = [] if self._static else [np.zeros(spec.kv_shape(n, width), spec.kv_dtype) for _ in spec.past_names]
        start = 0
        while start < n:  # each run of consecutive prompts of one length: one forward pass
            p = prompts[start].size
            cached = starts[start] if starts is not None else 0
            if cached:  # a cached prefix: the rest of this row's prompt, alone
                self._run_row(start, prompts[start], cached)
                start += 1
                continue
            stop = start + 1
            while stop < n and prompts[stop].size == p and (starts is None or not starts[stop]):
                stop += 1
            rows = stop - start
            if self._static:
                self.kv.bind_rows(bind, start, stop)
            else:
                self.kv.start(bind, rows)
            if self.conv is not None:
                self.conv.start_rows(bind, start, stop)
            bind.bind_output(spec.logits.name, self._logits_range(start, stop))
            ids = np.stack(prompts[start:stop]).astype(spec.input_ids.dtype)  # (rows, P)
            mask = self._mask_handles[p] if rows == 1 else np.ones((rows, p), spec.attention_mask.dtype)
            positions = self._positions(p)
            if positions is not None and rows > 1:
                positions = np.repeat(positions, rows, axis=0)  # (rows, P)
            self._run_prompt(ids, mask, positions, start)
            if not self._static:
                self.kv.copy_presents_into(bind, merged, start, width)
            start = stop
        if not self._static:
            self.kv.start_from(bind, merged)
        prepare_left_padded(lengths, views[width])
        self.finished[:n] = 0
        self._batch_views = (
            self.position_ids[:n] if self.position_ids is not None else None,
            lengths,
            self.finished[:n],
        )
        self._packed_handles = handles
        self.length = width
        self._bind_rows(n)
        self._bind_decode_inputs(n)
        return self.logits_2d[:n]

    def decode_rows(self) -> np.ndarray:
        """One step of the batch: rows' tokens in ``next_ids[:n]``; rows with ``finished[b]`` set are
        masked from now on. Returns the logits ``(batch, vocab)`` (rows 0:n valid)."""
        width = self.length
        positions, lengths, finished = self._batch_views
        advance_packed(self.packed_mask, width, positions, lengths, finished)
        self.bind.bind_input(self._mask_name, self._packed_handles[width + 1])
        if self.conv is not None:
            self.conv.step(self.bind, self.rows)
        self.bind.run()
        self.length = width + 1
        if self._grows:
            self.kv.advance(self.bind)
        return self.logits_2d

    def _run_row(self, row: int, prompt: np.ndarray, start: int = 0) -> None:
        """Run ``prompt[start:]`` (1-D) alone on KV row ``row``, over its first ``start`` cached
        positions (0: a fresh prompt, conv states reset); the last position's logits land in
        ``logits[row]``. Share-buffer caches. The caller rebinds the rows it runs afterwards."""
        spec, bind, p = self.spec, self.bind, int(prompt.size)
        self.kv.bind_rows(bind, row, row + 1)
        if self.conv is not None and start == 0:
            self.conv.start_rows(bind, row, row + 1)
        bind.bind_output(spec.logits.name, self._logits_range(row, row + 1))
        # (1, p - start) int64/int32, cpu: made per row, as a prefill's ids are
        ids = np.ascontiguousarray(prompt[None, start:], dtype=spec.input_ids.dtype)
        self._run_prompt(ids, self._mask_handles[p], self._positions(p, start), row)

    def swap_rows(self, a: int, b: int, length: int) -> None:
        """Swap the first ``length`` cached positions of KV rows ``a`` and ``b`` (share-buffer
        caches; rows outside any running batch): the prefix cache's routing brings a row's
        record to a row a batch starts or grows on."""
        if not self._static or self.spec.window_caches or self.conv is not None:
            raise ValueError("swap_rows needs a full-length share-buffer GQA cache and no conv states")
        if not (0 <= a < self.batch and 0 <= b < self.batch and 0 <= length <= self.max_length):
            raise ValueError(f"cannot swap {length} positions of rows {a} and {b} (batch {self.batch})")
        if a == b or length == 0:
            return
        for buf in self.kv.buffers:  # (batch, kv_heads, max_length, head_size)
            held = buf[a, :, :length].copy()
            buf[a, :, :length] = buf[b, :, :length]
            buf[b, :, :length] = held

    def join_row(self, row: int, prompt: np.ndarray, max_steps: int, start: int = 0) -> None:
        """Start a new prompt (1-D int64) on ``row`` of the running batch, between two decode steps:
        a stopped row, or row ``rows`` to grow the batch by one. Share-buffer GQA caches only.

        The prompt is prefilled alone on its own KV row and its last position's logits land in
        ``logits[row]`` (call it after :meth:`decode_rows`, before sampling: the row's junk logits
        of that step are replaced). Its mask row becomes the prompt left-padded to the current
        width, so ``len(prompt) <= length`` is required, and the batch may then run ``max_steps``
        more steps for it (``length + max_steps <= max_length``). Raises ValueError otherwise.
        ``start`` (the prefix cache): the row holds the prompt's first ``start`` positions
        already; only the rest is run.
        """
        if not self._static or self.packed_mask is None:
            raise ValueError("join_row needs a share-buffer GQA cache and a StepState with batch > 1")
        n, width, p = self.rows, self.length, int(prompt.size)
        check_join(
            row, n, self.batch, bool(self.finished[row]) if row < n else True, width, p, max_steps, self.max_length
        )
        if not 0 <= start < p:
            raise ValueError(f"cannot continue a prompt of {p} tokens from {start} cached positions")
        rows = max(n, row + 1)
        # views for the new row count as wide as any row of the batch may still need (review: a
        # joiner shorter than the other rows left them too short)
        self._views_end = max(self._views_end, width + max_steps)
        views, handles = self._packed_views(rows, self._views_end)
        self._bound_rows = 0  # rebound below
        self._run_row(row, prompt, start)
        mask = views[width]  # (rows, width): the rows before keep their columns
        mask[row, : width - p] = 0
        mask[row, width - p :] = 1
        self.lengths[row] = p
        self.finished[row] = 0
        self.rows = rows
        self._batch_views = (
            self.position_ids[:rows] if self.position_ids is not None else None,
            self.lengths[:rows],
            self.finished[:rows],
        )
        self._packed_handles = handles
        self._bind_rows(rows)
        self._bind_decode_inputs(rows)
