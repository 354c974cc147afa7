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
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .config import KVLayout, ModelSpec
from .kv_cache import GrowingKVCache, StaticKVCache, make_kv_cache


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
        self.run_options = ort.RunOptions()
        self.length = 0  # tokens in the KV cache (valid positions) after the last run

        ids_dtype = spec.input_ids.dtype
        # (batch, 1) int64/int32, cpu: the decode step's input; the sampler writes into next_ids
        self.input_ids = np.zeros((batch, 1), dtype=ids_dtype)
        self.next_ids = self.input_ids[:, 0]  # (batch,) view of input_ids
        self._input_ids_value = ort.OrtValue.ortvalue_from_numpy(self.input_ids)

        # (batch, max_length) int64/int32, cpu: ones on valid positions; bound as a view of the current width
        self.mask = None
        self._mask_views: list[ort.OrtValue] = []
        if spec.attention_mask is not None:
            self.mask = np.ones((batch, max_length), dtype=spec.attention_mask.dtype)
            # OrtValues over mask[:, :w] for every width w, made once (a view of a (1, max) row is contiguous)
            self._mask_views = [ort.OrtValue.ortvalue_from_numpy(self.mask[:, :w]) for w in range(max_length + 1)]

        # (batch, 1) int64/int32, cpu: position of the decoded token
        self.position_ids = None
        if spec.position_ids is not None:
            self.position_ids = np.zeros((batch, 1), dtype=spec.position_ids.dtype)
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
        self.io.bind_ortvalue_output(spec.logits.name, self._logits_value)
        if isinstance(self.kv, StaticKVCache):
            self.kv.bind(self.io)
        else:
            self.kv.bind(self.io, outputs_before=1)

    # ----------------------------------------------------------------------------------------
    @property
    def kv_nbytes(self) -> int:
        """Bytes of KV cache held now (static: the whole preallocated buffer)."""
        if isinstance(self.kv, StaticKVCache):
            return self.kv.nbytes
        return self.kv.bytes_per_token * self.length

    def prefill(self, prompt_ids: np.ndarray) -> np.ndarray:
        """Run the prompt ``(1, P)`` through the model; returns the last position's logits ``(1, vocab)``."""
        spec, io = self.spec, self.io
        n = prompt_ids.shape[1]
        self.kv.start(io)
        # (1, P) int64/int32, cpu: made per request (prefill may allocate; the decode loop may not)
        ids = np.ascontiguousarray(prompt_ids, dtype=spec.input_ids.dtype)
        io.bind_cpu_input(spec.input_ids.name, ids)
        if self.mask is not None:
            io.bind_ortvalue_input(spec.attention_mask.name, self._mask_views[n])
        if self.position_ids is not None:
            # (1, P) positions 0..P-1
            io.bind_cpu_input(spec.position_ids.name, np.arange(n, dtype=spec.position_ids.dtype)[None, :])
        if self._cache_branch:
            io.bind_ortvalue_input("use_cache_branch", self._cache_branch[False])
        if not self.last_token_logits:
            io.bind_output(spec.logits.name, "cpu")  # (1, P, vocab) allocated by ORT for this run only
        self.session.run_with_iobinding(io, self.run_options)
        if not self.last_token_logits:
            full = io.get_outputs()[0].numpy()
            self.logits[:, 0, :] = full[:, -1, :]
            io.bind_ortvalue_output(spec.logits.name, self._logits_value)
        self.length = n
        self.kv.advance(io)
        # decode-step bindings that stay fixed for the rest of the request
        io.bind_ortvalue_input(spec.input_ids.name, self._input_ids_value)
        if self.position_ids is not None:
            io.bind_ortvalue_input(spec.position_ids.name, self._position_value)
        if self._cache_branch:
            io.bind_ortvalue_input("use_cache_branch", self._cache_branch[True])
        return self.logits_2d

    def decode_one_token(self) -> np.ndarray:
        """Run the token in ``next_ids`` at position ``length``; returns the new logits ``(batch, vocab)``."""
        width = self.length + 1
        if self.mask is not None:
            self.io.bind_ortvalue_input(self.spec.attention_mask.name, self._mask_views[width])
        if self.position_ids is not None:
            self.position_ids[:, 0] = self.length
        self.session.run_with_iobinding(self.io, self.run_options)
        self.length = width
        self.kv.advance(self.io)
        return self.logits_2d


def is_static(spec: ModelSpec) -> bool:
    """Whether the spec's layout uses the preallocated share-buffer cache."""
    return spec.layout is KVLayout.GQA_SHARED
