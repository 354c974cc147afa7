"""The IOBinding calls of a decode step, made on onnxruntime's C-level objects.

One class, :class:`FastBinding`, used by every step state (:class:`engine.binding.StepState`,
:class:`engine.cuda.DeviceStepState`) and the KV caches they bind; it imports nothing of the engine,
so those modules depend on it and not on each other.
"""

from __future__ import annotations

import functools

import numpy as np
import onnxruntime as ort

__all__ = ["FastBinding"]


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
        c_sess = getattr(session, "_sess", None)
        c_io = getattr(io, "_iobinding", None)
        self.fast = c_sess is not None and c_io is not None and hasattr(c_sess, "run_with_iobinding")
        if self.fast:
            self._c_io = c_io
            self._c_run = c_sess.run_with_iobinding
            self.bind_input = c_io.bind_ortvalue_input  # the hot call as the C-level method
        self.run_options = run_options  # (the setter also makes the C-level run partial)
        self._devices: dict[str, object] = {}

    @property
    def run_options(self) -> ort.RunOptions | None:
        """The RunOptions every :meth:`run` passes; setting it takes effect at the next run."""
        return self._run_options

    @run_options.setter
    def run_options(self, options: ort.RunOptions | None) -> None:
        self._run_options = options
        if self.fast:
            # the hot call as a C-level partial (the instance attribute shadows the method below)
            self.run = functools.partial(self._c_run, self._c_io, options)

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

    def run_with(self, options: ort.RunOptions | None) -> None:
        """One run with other RunOptions (the CUDA prompt: outside the decode step's graph)."""
        if self.fast:
            self._c_run(self._c_io, options)
        else:
            self.session.run_with_iobinding(self.io, options)

    def run(self) -> None:
        """Run the session on the bound inputs and outputs."""
        if self.fast:
            self._c_run(self._c_io, self.run_options)
        else:
            self.session.run_with_iobinding(self.io, self.run_options)
