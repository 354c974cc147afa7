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

import functools

import numpy as np
import onnxruntime as ort

from .config import ModelSpec
from .kv_cache import GrowingKVCache, StaticKVCache, make_kv_cache


class FastBinding:
    """The IOBinding calls of the decode step, made on ORT's C-level objects.

    onnxruntime's Python wrappers add 40-100 µs per decode step on a tiny model: ``run_with_iobinding``
    looks up a ``gpu_graph_id`` run option (a C++ exception when unset) and checks WebGPU graph
    capture, and every ``bind_*`` call validates session compatibility and keeps Python-side
    bookkeeping. None of that applies here, so the step calls the pybind objects underneath
    (``session._sess``, ``io._iobinding``, ``ortvalue._ortvalue``) directly. When an onnxruntime
    version lacks them, it falls back to the public API (slower, same results).
    """

    def __init__(self, session: ort.InferenceSession, io: ort.IOBinding, run_options: ort.RunOptions | None):
        self.io = io
        self.session = session
        self.run_options = run_options
        c_sess = getattr(session, "_sess", None)
        c_io = getattr(io, "_iobinding", None)
        self.fast = c_sess is not None and c_io is not None and hasattr(c_sess, "run_with_iobinding")
        if self.fast:
            self._c_io = c_io
            self._c_run = c_sess.run_with_iobinding
            # the hot calls as C-level partials (instance attributes shadow the methods below)
            self.run = functools.partial(c_sess.run_with_iobinding, c_io, run_options)
            self.bind_input = c_io.bind_ortvalue_input
        self._devices: dict[str, object] = {}

    def value(self, ortvalue: ort.OrtValue):
        """The handle to pass to :meth:`bind_input` / :meth:`bind_output` (made once per buffer)."""
        return ortvalue._ortvalue if self.fast else ortvalue

    def bind_input(self, name: str, value) -> None:
        """Bind an input to a value from :meth:`value` (or an output handle from :meth:`outputs`)."""
        if self.fast:
            self._c_io.bind_ortvalue_input(name, value)
        else:
            self.io.bind_ortvalue_input(name, value)

    def bind_output(self, name: str, value) -> None:
        """Bind an output to a preallocated value from :meth:`value`."""
        if self.fast:
            self._c_io.bind_ortvalue_output(name, value)
        else:
            self.io.bind_ortvalue_output(name, value)

    def bind_output_device(self, name: str, device: str = "cpu") -> None:
        """Let ORT allocate the output on ``device`` at the next run."""
        if self.fast:
            c_device = self._devices.get(device)
            if c_device is None:
                c_device = self._devices[device] = ort.OrtDevice.make(device, 0)._get_c_device()
            self._c_io.bind_output(name, c_device)
        else:
            self.io.bind_output(name, device)

    def _c_device(self, device: str):
        c_device = self._devices.get(device)
        if c_device is None:
            c_device = self._devices[device] = ort.OrtDevice.make(device, 0)._get_c_device()
        return c_device

    def bind_input_ptr(self, name: str, device: str, dtype: np.dtype, shape: tuple[int, ...], ptr: int) -> None:
        """Bind an input to memory the caller owns: ``shape`` elements of ``dtype`` at ``ptr`` on ``device``."""
        if self.fast:
            self._c_io.bind_input(name, self._c_device(device), dtype, shape, ptr)
        else:
            self.io.bind_input(name, device, 0, dtype, shape, ptr)

    def bind_output_ptr(self, name: str, device: str, dtype: np.dtype, shape: tuple[int, ...], ptr: int) -> None:
        """Bind an output to memory the caller owns (ORT writes it in place)."""
        if self.fast:
            self._c_io.bind_output(name, self._c_device(device), dtype, shape, ptr)
        else:
            self.io.bind_output(name, device, 0, dtype, shape, ptr)

    def outputs(self):
        """This run's outputs as handles :meth:`bind_input` accepts (no copy)."""
        return self._c_io.get_outputs() if self.fast else self.io.get_outputs()

    def run(self) -> None:
        """Run the session on the bound inputs and outputs."""
        if self.fast:
            self._c_run(self._c_io, self.run_options)
        else:
            self.session.run_with_iobinding(self.io, self.run_options)


class StepState:
    """Preallocated, pre-bound buffers of one Engine (batch size 1 .. ``batch``, fixed max length)."""

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
        self.length = 0  # tokens in the KV cache (valid positions) after the last run

        ids_dtype = spec.input_ids.dtype
        # (batch, 1) int64/int32, cpu: the decode step's input; the sampler writes into next_ids
        self.input_ids = np.zeros((batch, 1), dtype=ids_dtype)
        self.next_ids = self.input_ids[:, 0]  # (batch,) view of input_ids
        # (batch,) the ids the generation loop reads; on the CPU they are next_ids itself (no copy)
        self.host_ids = self.next_ids
        self._input_ids_value = ort.OrtValue.ortvalue_from_numpy(self.input_ids)

        # (batch, max_length) int64/int32, cpu: ones on valid positions; bound as a view of the current width
        self.mask = None
        self._mask_values: list[ort.OrtValue] = []
        self._mask_handles: list = []
        if spec.attention_mask is not None:
            self.mask = np.ones((batch, max_length), dtype=spec.attention_mask.dtype)
            # OrtValues over mask[:, :w] for every width w, made once (a view of a (1, max) row is contiguous)
            self._mask_values = [ort.OrtValue.ortvalue_from_numpy(self.mask[:, :w]) for w in range(max_length + 1)]
            self._mask_handles = [bind.value(v) for v in self._mask_values]

        # (batch, 1) int64/int32, cpu: position of the decoded token
        self.position_ids = None
        self._position_flat = None
        if spec.position_ids is not None:
            self.position_ids = np.zeros((batch, 1), dtype=spec.position_ids.dtype)
            self._position_flat = self.position_ids.reshape(-1)  # (batch,) view written per step
            self._position_value = ort.OrtValue.ortvalue_from_numpy(self.position_ids)

        # (batch, 1, vocab) float32/float16, cpu: logits of the last position, written by ORT
        self.logits = np.zeros((batch, 1, spec.vocab_size), dtype=spec.logits.dtype)
        self.logits_2d = self.logits[:, 0, :]  # (batch, vocab) view handed to the sampler
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)

        # use_cache_branch (1,) bool of merged Optimum decoders: False for the prompt, True after
        self._cache_branch: dict[bool, ort.OrtValue] = {}
        if any(info.name == "use_cache_branch" for info in spec.extra_inputs):
            self._cache_branch = {
                flag: ort.OrtValue.ortvalue_from_numpy(np.array([flag], dtype=np.bool_)) for flag in (False, True)
            }

        self.kv: StaticKVCache | GrowingKVCache = make_kv_cache(spec, batch, max_length, device)
        self._grows = isinstance(self.kv, GrowingKVCache)  # presents must be handed back as past each step
        self._mask_name = spec.attention_mask.name if spec.attention_mask is not None else ""
        bind.bind_output(spec.logits.name, bind.value(self._logits_value))
        self.kv.bind(bind, outputs_before=1)

    # ----------------------------------------------------------------------------------------
    @property
    def kv_nbytes(self) -> int:
        """Bytes of KV cache held now (static: the whole preallocated buffer)."""
        if isinstance(self.kv, StaticKVCache):
            return self.kv.nbytes
        return self.kv.bytes_per_token * self.length

    def prefill(self, prompt_ids: np.ndarray) -> np.ndarray:
        """Run the prompt ``(1, P)`` through the model; returns the last position's logits ``(1, vocab)``."""
        spec, io, bind = self.spec, self.io, self.bind
        n = prompt_ids.shape[1]
        self.kv.start(bind)
        # (1, P) int64/int32, cpu: made per request (prefill may allocate; the decode loop may not)
        ids = np.ascontiguousarray(prompt_ids, dtype=spec.input_ids.dtype)
        io.bind_cpu_input(spec.input_ids.name, ids)
        if self.mask is not None:
            bind.bind_input(spec.attention_mask.name, self._mask_handles[n])
        if self.position_ids is not None:
            # (1, P) positions 0..P-1
            io.bind_cpu_input(spec.position_ids.name, np.arange(n, dtype=spec.position_ids.dtype)[None, :])
        if self._cache_branch:
            bind.bind_input("use_cache_branch", bind.value(self._cache_branch[False]))
        if not self.last_token_logits:
            bind.bind_output_device(spec.logits.name, "cpu")  # (1, P, vocab) allocated by ORT for this run only
        bind.run()
        if not self.last_token_logits:
            full = io.get_outputs()[0].numpy()
            self.logits[:, 0, :] = full[:, -1, :]
            bind.bind_output(spec.logits.name, bind.value(self._logits_value))
        self.length = n
        self.kv.advance(bind)
        # decode-step bindings that stay fixed for the rest of the request
        bind.bind_input(spec.input_ids.name, bind.value(self._input_ids_value))
        if self.position_ids is not None:
            bind.bind_input(spec.position_ids.name, bind.value(self._position_value))
        if self._cache_branch:
            bind.bind_input("use_cache_branch", bind.value(self._cache_branch[True]))
        return self.logits_2d

    def decode_one_token(self) -> np.ndarray:
        """Run the token in ``next_ids`` at position ``length``; returns the new logits ``(batch, vocab)``."""
        length = self.length
        bind = self.bind
        if self._mask_handles:
            bind.bind_input(self._mask_name, self._mask_handles[length + 1])
        if self._position_flat is not None:
            self._position_flat[0] = length
        bind.run()
        self.length = length + 1
        if self._grows:
            self.kv.advance(bind)
        return self.logits_2d
