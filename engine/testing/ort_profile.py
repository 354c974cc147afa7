"""Reading onnxruntime's profiler output (``SessionOptions.enable_profiling``, ``session.end_profiling()``).

The trace is a JSON list of Chrome-trace events. Each ``InferenceSession.run*`` call is a
``"Session"`` event named ``"model_run"``; each kernel it executed is a ``"Node"`` event inside that
interval, with ``args.op_name`` and ``args.provider``. Host<->device copies that ORT inserts into
the graph are nodes of op type ``MemcpyToHost`` / ``MemcpyFromHost``; a CUDA graph replay records
no node events at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

MEMCPY_OPS = frozenset({"MemcpyToHost", "MemcpyFromHost"})


@dataclass
class RunProfile:
    """One ``model_run`` of the trace: its interval (µs) and the node events inside it."""

    start_us: int
    dur_us: int
    nodes: list[dict] = field(default_factory=list)

    @property
    def op_names(self) -> list[str]:
        """Op type of every node event of the run, in trace order."""
        return [str(e.get("args", {}).get("op_name", "")) for e in self.nodes]

    @property
    def memcpy_ops(self) -> list[str]:
        """The host<->device copy nodes ORT ran in this run."""
        return [op for op in self.op_names if op in MEMCPY_OPS]

    def providers(self) -> set[str]:
        """Execution providers that ran nodes in this run."""
        return {str(e.get("args", {}).get("provider", "")) for e in self.nodes}


def load_runs(path: str | os.PathLike[str]) -> list[RunProfile]:
    """The trace's runs in time order, each with the node events that started inside it."""
    with open(path, encoding="utf-8") as f:
        events = json.load(f)
    runs = sorted(
        (
            RunProfile(int(e["ts"]), int(e["dur"]))
            for e in events
            if e.get("cat") == "Session" and e.get("name") == "model_run"
        ),
        key=lambda r: r.start_us,
    )
    for e in events:
        if e.get("cat") != "Node":
            continue
        ts = int(e["ts"])
        for run in runs:
            if run.start_us <= ts <= run.start_us + run.dur_us:
                run.nodes.append(e)
                break
    return runs
