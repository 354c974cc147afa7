"""The independent oracle: a numpy forward pass of a synthetic model, without onnxruntime.

:func:`reference_logits` reads the weights back from a folder that
:func:`engine.testing.synthetic.build_model` wrote (int4 weights dequantized here) and computes the
Llama math (RMSNorm, half-rotation partial rotary, causal grouped-query attention, SwiGLU) again in
float64. It shares no code with the graph builder, so the tests can show that the graph and the
engine compute that math.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from engine.testing.synthetic import SyntheticSpec, read_spec

__all__ = ["decoder_forward", "greedy_continuation", "reference_logits"]


def reference_logits(model_dir: str | os.PathLike, input_ids: np.ndarray) -> np.ndarray:
    """Numpy forward pass of a synthetic model over whole sequences, without onnxruntime.

    ``input_ids``: (batch, seq) int, no padding, positions 0..seq-1. Returns (batch, seq, vocab)
    float32 logits. Weights are read back from ``model.onnx`` (int4 weights dequantized); the math
    (RMSNorm, half-rotation partial rotary, causal grouped-query attention, SwiGLU) is written here
    again in float64 and shares no code with the graph builder.
    """
    folder = pathlib.Path(model_dir)
    spec = read_spec(folder)
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be a (batch, seq) integer array, got {ids.dtype} {ids.shape}")
    if ids.shape[1] > spec.context_length:
        raise ValueError(f"sequence length {ids.shape[1]} exceeds context_length {spec.context_length}")
    weights = _RefWeights(folder, spec)
    cos, sin = _ref_rotary(spec, ids.shape[1])  # (seq, rotary_dim / 2)

    def attention(i: int, p: str, h: np.ndarray) -> np.ndarray:
        return _ref_attention(spec, weights, p, h, cos, sin)

    return decoder_forward(spec, weights, ids, attention).astype(np.float32)


Mixer = Callable[[int, str, np.ndarray], np.ndarray]


def decoder_forward(spec: SyntheticSpec, weights: _RefWeights, ids: np.ndarray, mixer: Mixer) -> np.ndarray:
    """The Llama skeleton around each layer's token mixer, in float64: embedding, then per layer
    ``x += mixer(layer, prefix, rmsnorm(x))`` and a SwiGLU MLP, then the final norm and the LM
    head. ``mixer`` is causal attention for plain models; tests of other families (conv layers,
    sliding windows, LongRoPE tables) pass their own. Returns (batch, seq, vocab) float64."""
    x = weights.dense("model.embed_tokens.weight")[ids]  # (batch, seq, hidden)
    for i in range(spec.layers):
        p = f"model.layers.{i}"
        h = _ref_rms(x, weights.dense(f"{p}.input_layernorm.weight"), spec.rms_eps)
        x = x + mixer(i, p, h)
        h = _ref_rms(x, weights.dense(f"{p}.post_attention_layernorm.weight"), spec.rms_eps)
        gate = h @ weights.linear(f"{p}.mlp.gate_proj", spec.hidden, spec.intermediate)
        up = h @ weights.linear(f"{p}.mlp.up_proj", spec.hidden, spec.intermediate)
        silu = gate / (1.0 + np.exp(-gate))
        x = x + (silu * up) @ weights.linear(f"{p}.mlp.down_proj", spec.intermediate, spec.hidden)
    x = _ref_rms(x, weights.dense("model.norm.weight"), spec.rms_eps)
    return x @ weights.linear("lm_head", spec.hidden, spec.vocab)


def greedy_continuation(logits: Callable[[np.ndarray], np.ndarray], prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt`` by whole-sequence passes of ``logits`` ((1, seq) ids ->
    (1, seq, vocab)); no state is carried from one pass to the next."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(logits(np.array([ids]))[0, -1])))
    return ids[len(prompt) :]


def _dequantize_int4(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, k: int) -> np.ndarray:
    """Inverse of ``synthetic._quantize_int4`` (MatMulNBits layout): (N, k_blocks, block/2) codes -> (N, K) float64."""
    n, k_blocks, half = packed.shape
    codes = np.empty((n, k_blocks, 2 * half), np.float64)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    zeros = zeros.reshape(n, -1)
    zero = np.empty((n, 2 * zeros.shape[1]), np.float64)
    zero[:, 0::2] = zeros & 0x0F
    zero[:, 1::2] = zeros >> 4
    zero = zero[:, :k_blocks]
    scale = scales.reshape(n, k_blocks).astype(np.float64)
    w = (codes - zero[..., None]) * scale[..., None]
    return w.reshape(n, -1)[:, :k]


class _RefWeights:
    """Initializers of model.onnx by name, as float64 (int4 projections dequantized)."""

    def __init__(self, folder: pathlib.Path, spec: SyntheticSpec) -> None:
        model = onnx.load(str(folder / "model.onnx"), load_external_data=True)
        self._tensors = {t.name: t for t in model.graph.initializer}
        self._spec = spec

    def _array(self, name: str) -> np.ndarray:
        if name not in self._tensors:
            raise KeyError(f"initializer {name!r} not found in model.onnx")
        return numpy_helper.to_array(self._tensors[name])

    def dense(self, name: str) -> np.ndarray:
        return self._array(name).astype(np.float64)

    def linear(self, base: str, k: int, n: int) -> np.ndarray:
        """(k, n) float64 weight of the projection ``base`` (x @ w)."""
        if self._spec.quant == "fp32":
            w = self.dense(f"{base}.weight")
        else:
            w = _dequantize_int4(
                self._array(f"{base}.weight_q4"),
                self._array(f"{base}.scales"),
                self._array(f"{base}.zero_points"),
                k,
            ).T
        if w.shape != (k, n):
            raise ValueError(f"{base}: weight shape {w.shape}, expected {(k, n)}")
        return w


def _ref_rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _ref_rotary(spec: SyntheticSpec, seq: int) -> tuple[np.ndarray, np.ndarray]:
    rot = spec.rotary_dim
    freqs = spec.rope_theta ** (-np.arange(rot // 2, dtype=np.float64) * 2.0 / rot)
    angle = np.arange(seq, dtype=np.float64)[:, None] * freqs[None, :]
    return np.cos(angle), np.sin(angle)


def _ref_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x (b, heads, s, head): rotate pairs (j, j + rot/2) for j < rot/2; dims >= rot pass through."""
    half = cos.shape[-1]
    out = x.copy()
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half : 2 * half] = x2 * cos + x1 * sin
    return out


def _ref_attention(
    spec: SyntheticSpec, weights: _RefWeights, p: str, h: np.ndarray, cos: np.ndarray, sin: np.ndarray
) -> np.ndarray:
    b, s, _ = h.shape
    d = spec.head_size

    def heads(name: str, n_heads: int) -> np.ndarray:
        w = weights.linear(f"{p}.self_attn.{name}", spec.hidden, n_heads * d)
        return (h @ w).reshape(b, s, n_heads, d).transpose(0, 2, 1, 3)

    q = _ref_rope(heads("q_proj", spec.heads), cos, sin)
    k = _ref_rope(heads("k_proj", spec.kv_heads), cos, sin)
    v = heads("v_proj", spec.kv_heads)
    group = spec.heads // spec.kv_heads
    k = np.repeat(k, group, axis=1)  # query head j uses kv head j // group
    v = np.repeat(v, group, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)  # (b, heads, s, s)
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, spec.heads * d)
    return ctx @ weights.linear(f"{p}.self_attn.o_proj", spec.heads * d, spec.hidden)
