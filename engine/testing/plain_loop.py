"""The baseline the engine replaces: a plain ``InferenceSession.run`` loop feeding numpy KV back.

Independent of the engine's own code (it reads names and shapes from the session, not from
``engine.config``), so tests use it as a reference for greedy tokens, and ``make perf`` uses it
as the "plain loop" baseline. Every step allocates a new attention mask and copies every
present tensor back to numpy: that is the cost being measured.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


@dataclass
class PlainResult:
    """Greedy ids and timings of one plain-loop run."""

    token_ids: list[int]
    ttft_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first, per second of decoding."""
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


class PlainLoop:
    """Greedy decoding with ``session.run`` and numpy KV fed back by hand (no IOBinding)."""

    def __init__(self, model_dir: str | Path, threads: int = 1) -> None:
        model_dir = Path(model_dir)
        cfg_path = model_dir / "genai_config.json"
        filename = "model.onnx"
        self.eos: set[int] = set()
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            filename = cfg["model"]["decoder"]["filename"]
            eos = cfg["model"].get("eos_token_id")
            self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_dir / filename), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past = [n for n in self.inputs if n.startswith("past")]
        self.present = [re.sub(r"^past_key_values", "present", n).replace("past_", "present_") for n in self.past]
        missing = [p for p in self.present if p not in self.output_names]
        if missing:
            raise ValueError(f"cannot pair past inputs with present outputs: {missing}")

    def _empty_past(self, name: str) -> np.ndarray:
        info = self.inputs[name]
        shape = [d if isinstance(d, int) else 1 for d in info.shape]
        seq_axis = len(shape) - 2  # (..., seq, head_size)
        shape[seq_axis] = 0
        return np.zeros(shape, dtype=_TYPES[info.type])

    def _feed(self, ids: list[int], start: int, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed: dict[str, np.ndarray] = dict(past)
        n = len(ids)
        feed["input_ids"] = np.array([ids], dtype=_TYPES[self.inputs["input_ids"].type])
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((1, start + n), dtype=_TYPES[self.inputs["attention_mask"].type])
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(start, start + n, dtype=_TYPES[self.inputs["position_ids"].type])[None]
        if "use_cache_branch" in self.inputs:
            feed["use_cache_branch"] = np.array([start > 0])
        return feed

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool = True) -> PlainResult:
        """Greedy continuation of ``prompt_ids`` (new tokens only; stops after an EOS id if asked)."""
        t0 = time.perf_counter()
        past = {n: self._empty_past(n) for n in self.past}
        ids = list(prompt_ids)
        out: list[int] = []
        start = 0
        t_first = t0
        while len(out) < max_new_tokens:
            outputs = self.session.run(self.output_names, self._feed(ids, start, past))
            result = dict(zip(self.output_names, outputs, strict=True))
            start += len(ids)
            past = {p: result[q] for p, q in zip(self.past, self.present, strict=True)}
            tok = int(np.argmax(result["logits"][0, -1]))
            if not out:
                t_first = time.perf_counter()
            out.append(tok)
            if stop_at_eos and tok in self.eos:
                break
            ids = [tok]
        t_end = time.perf_counter()
        return PlainResult(out, t_first - t0, t_end - t_first)
