"""Deterministic random-weight Llama-style models in the onnxruntime-genai folder format.

:func:`build_model` writes a folder that onnxruntime-genai and the engine load like a real export:
``model.onnx`` (+ ``model.onnx.data`` above ~100 MB of weights), ``genai_config.json``, a byte-level
BPE ``tokenizer.json`` and ``tokenizer_config.json``. Every weight comes from a numpy ``Generator``
seeded by ``(spec.seed, tensor name)``, so one spec always gives byte-identical files.

Two KV layouts, as the real exports have them:

- ``"gqa"``: ``com.microsoft.GroupQueryAttention`` with rotary inside the op; past and present may
  be bound to one preallocated ``(batch, kv_heads, max_length, head_size)`` buffer (share buffer).
- ``"concat"``: plain ONNX ops; present = Concat(past, new) on the sequence axis, ``position_ids``
  drive the rotary embedding, ``attention_mask`` masks padded keys.

The independent numpy forward pass that the tests compare these graphs against is
:func:`engine.testing.reference.reference_logits`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import pathlib
import shutil
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["SyntheticSpec", "build_model", "cached_model", "phi4_mini_spec", "read_spec"]

# Bumped whenever the files build_model writes change, so cached folders are rebuilt.
_FORMAT_VERSION = 1
_OPSET = 21  # default ONNX domain
_MS_OPSET = 1  # com.microsoft
_IR_VERSION = 10  # loadable by onnxruntime >= 1.20
_EXTERNAL_THRESHOLD = 100 * 1024 * 1024  # bytes of weights above which they go to model.onnx.data
_DATA_FILE = "model.onnx.data"
_SPEC_FILE = "synthetic_spec.json"
_ALIGN = 4096  # byte alignment of each tensor in model.onnx.data
_INLINE_BYTES = 1024  # tensors smaller than this stay inside model.onnx even in external mode
_CHUNK_VALUES = 1 << 22  # random values generated per chunk (16 MB of float32)

_UNK, _BOS, _EOS = 0, 1, 2
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_BYTE_OFFSET = len(_SPECIAL_TOKENS)  # byte b has token id b + 3
_MAX_MERGES = 400

_LAYOUTS = ("gqa", "concat")
_QUANTS = ("fp32", "int4")
_DTYPES = ("float32", "float16")
_MODEL_TYPES = ("llama", "phi3", "lfm2")
_LAYER_TYPES = ("full_attention", "sliding_attention", "conv")
# fields added after the cache key was defined: left out of key() while at their defaults, so the
# folders of earlier specs keep their keys
_LATER_FIELDS = {"layer_types": (), "conv_kernel": 3, "sliding_window": 0, "window_cache": False, "longrope": 0}
LONGROPE_FACTOR = 4.0  # the long cos/sin tables of a ``longrope`` spec rotate this many times slower


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape, layout and seed of one synthetic decoder-only model.

    ``layout``: ``"gqa"`` (GroupQueryAttention, past/present can share one buffer) or ``"concat"``
    (separate K/V grown by Concat, ``position_ids`` input). ``quant``: ``"fp32"`` (MatMul on float
    weights in ``dtype``) or ``"int4"`` (``com.microsoft.MatMulNBits`` for every projection and the
    lm_head; embeddings stay float). ``dtype``: activations, KV cache and logits.
    ``model_type`` is the genai_config ``model.type`` written to the folder.

    Hybrid and sliding-window models (``layer_types``, one per layer; empty: all
    ``"full_attention"``): a ``"conv"`` layer is an LFM2-style short convolution (in_proj to
    B, C, X; causal depthwise Conv of kernel ``conv_kernel`` over B*X; C * conv; out_proj) that
    carries ``past.N.conv`` / ``present.N.conv`` of shape ``(batch, hidden, conv_kernel - 1)`` between
    steps, as onnxruntime-genai's LFM2 builder writes it; it has no KV. A
    ``"sliding_attention"`` layer (``layout="gqa"`` only) runs GroupQueryAttention with
    ``local_window_size = sliding_window``, plus ``sliding_window_cache=1`` when ``window_cache``
    (the builder's attribute for window-sized past/present buffers).

    ``longrope = N > 0`` (``layout="gqa"``): Phi-3-style LongRoPE, as the builder writes it: the
    GroupQueryAttention cos/sin caches come from ``If(Greater(total_sequence_length, N))``,
    choosing long tables (frequencies divided by ``LONGROPE_FACTOR``) past ``N`` tokens and the
    short (plain) ones up to it.

    ``rotary_dim = int(head_size * rotary_fraction)`` must be even. onnxruntime's CPU
    GroupQueryAttention also needs ``head_size % 16 == 0`` and ``rotary_dim / 2 % 8 == 0`` (Phi-4-mini:
    128 and 48), so other shapes are only accepted with ``layout="concat"``. All weights of a
    ``"gqa"`` and a ``"concat"`` spec that differ only in layout are identical.
    """

    layout: str = "gqa"
    quant: str = "fp32"
    dtype: str = "float32"
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_size: int = 16
    intermediate: int = 128
    vocab: int = 320
    context_length: int = 256
    rotary_fraction: float = 1.0
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    block_size: int = 32
    accuracy_level: int = 4
    seed: int = 0
    model_type: str = "llama"
    layer_types: tuple[str, ...] = ()
    conv_kernel: int = 3
    sliding_window: int = 0
    window_cache: bool = False
    longrope: int = 0

    def __post_init__(self) -> None:
        """Reject values the graph builder cannot honour, with a message naming the field."""
        object.__setattr__(self, "layer_types", tuple(self.layer_types))  # a list read back from JSON
        if self.layer_types:
            if len(self.layer_types) != self.layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.layers} layers")
            bad = [t for t in self.layer_types if t not in _LAYER_TYPES]
            if bad:
                raise ValueError(f"SyntheticSpec.layer_types: {bad[0]!r} is not one of {_LAYER_TYPES}")
            if "conv" in self.layer_types and self.dtype != "float32":
                raise ValueError("conv layers are built in float32 only (onnxruntime's CPU Conv)")
            if "sliding_attention" in self.layer_types and (self.layout != "gqa" or self.sliding_window < 1):
                raise ValueError("sliding_attention layers need layout='gqa' and sliding_window >= 1")
            if all(t == "conv" for t in self.layer_types):
                raise ValueError("layer_types needs at least one attention layer")
        if self.longrope and (self.layout != "gqa" or not 0 < self.longrope < self.context_length):
            raise ValueError("longrope needs layout='gqa' and a switch length in (0, context_length)")
        if self.conv_kernel < 2:
            raise ValueError(f"SyntheticSpec.conv_kernel must be >= 2, got {self.conv_kernel}")
        for field, value, allowed in (
            ("layout", self.layout, _LAYOUTS),
            ("quant", self.quant, _QUANTS),
            ("dtype", self.dtype, _DTYPES),
            ("model_type", self.model_type, _MODEL_TYPES),
        ):
            if value not in allowed:
                raise ValueError(f"SyntheticSpec.{field}={value!r}: expected one of {allowed}")
        for field in ("layers", "hidden", "heads", "kv_heads", "head_size", "intermediate", "context_length"):
            if getattr(self, field) < 1:
                raise ValueError(f"SyntheticSpec.{field} must be >= 1, got {getattr(self, field)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.vocab < _BYTE_OFFSET + 256:
            need = _BYTE_OFFSET + 256
            raise ValueError(f"vocab must be >= {need} to hold the byte tokenizer, got {self.vocab}")
        rot = self.rotary_dim
        if rot < 2 or rot % 2 or rot > self.head_size:
            raise ValueError(
                f"rotary_dim = int(head_size * rotary_fraction) = {rot} must be even and in [2, head_size]"
            )
        if self.layout == "gqa" and (self.head_size % 16 or (rot // 2) % 8):
            raise ValueError(
                "onnxruntime's GroupQueryAttention needs head_size % 16 == 0 and rotary_dim / 2 % 8 == 0, "
                f"got head_size={self.head_size}, rotary_dim={rot}; use layout='concat' for other shapes"
            )
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be in 0..4, got {self.accuracy_level}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def rotary_dim(self) -> int:
        """Number of leading dims of each head that the rotary embedding rotates."""
        return int(self.head_size * self.rotary_fraction)

    def layer_type(self, i: int) -> str:
        """``"full_attention"``, ``"sliding_attention"`` or ``"conv"``: the kind of layer ``i``."""
        return self.layer_types[i] if self.layer_types else "full_attention"

    def key(self) -> str:
        """Short stable hash of every field (and of the file format version), for cache folders."""
        fields = dataclasses.asdict(self)
        for name, default in _LATER_FIELDS.items():
            if fields[name] == default:
                fields.pop(name)
        if self.layer_types or self.longrope:
            fields["layers_format"] = 2  # hybrid folders: 0.18's past.N.conv of width kernel - 1
        payload = json.dumps({"format": _FORMAT_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def phi4_mini_spec(
    layers: int = 4,
    vocab: int = 200064,
    context_length: int = 4096,
    quant: str = "int4",
    dtype: str = "float32",
    seed: int = 0,
) -> SyntheticSpec:
    """Spec with the layer shapes of Phi-4-mini (3.8B) and a GroupQueryAttention layout.

    hidden 3072, 24 heads, 8 KV heads, head 128, intermediate 8192, partial rotary 0.75,
    rope_theta 10000. With ``layers=32`` it has the full model's weight volume.
    """
    return SyntheticSpec(
        layout="gqa",
        quant=quant,
        dtype=dtype,
        layers=layers,
        hidden=3072,
        heads=24,
        kv_heads=8,
        head_size=128,
        intermediate=8192,
        vocab=vocab,
        context_length=context_length,
        rotary_fraction=0.75,
        rope_theta=10000.0,
        rms_eps=1e-5,
        block_size=32,
        accuracy_level=4,
        seed=seed,
        model_type="phi3",
    )


# --------------------------------------------------------------------------- public entry points


def build_model(out_dir: str | os.PathLike, spec: SyntheticSpec) -> pathlib.Path:
    """Write the model folder for ``spec`` into ``out_dir`` (created if missing) and return it."""
    folder = pathlib.Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _DATA_FILE).unlink(missing_ok=True)
    external = _weight_bytes(spec) > _EXTERNAL_THRESHOLD
    with _TensorStore(folder if external else None) as store:
        graph = _build_graph(spec, store)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", _OPSET), helper.make_opsetid("com.microsoft", _MS_OPSET)],
        producer_name="engine.testing.synthetic",
        ir_version=_IR_VERSION,
    )
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    del model, graph
    _write_json(folder / "genai_config.json", _genai_config(spec))
    _write_tokenizer(folder, spec)
    _write_json(folder / _SPEC_FILE, {"format": _FORMAT_VERSION, "spec": dataclasses.asdict(spec)})
    return folder


def cached_model(spec: SyntheticSpec, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Return ``<cache_dir>/<spec.key()>``, building it once (in a temp folder, then renamed).

    ``cache_dir`` defaults to ``$ENGINE_MODEL_CACHE`` or ``~/.cache/engine-models``. Concurrent
    callers may both build; the first rename wins and the other copy is discarded.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("ENGINE_MODEL_CACHE") or pathlib.Path.home() / ".cache" / "engine-models"
    root = pathlib.Path(cache_dir)
    final = root / spec.key()
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{spec.key()}-", dir=root))
    try:
        build_model(tmp, spec)
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_spec(folder: pathlib.Path) -> SyntheticSpec:
    """The spec that :func:`build_model` wrote into ``folder``."""
    path = folder / _SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} was not written by build_model")
    data = json.loads(path.read_text(encoding="utf-8"))
    return SyntheticSpec(**data["spec"])


# --------------------------------------------------------------------------- weights


def _rng(spec: SyntheticSpec, name: str) -> np.random.Generator:
    """Generator for one tensor: independent of build order and of the other tensors."""
    return np.random.default_rng(np.random.SeedSequence([spec.seed, zlib.crc32(name.encode())]))


def _uniform_rows(rng: np.random.Generator, rows: int, cols: int, std: float) -> Iterator[np.ndarray]:
    """Yield (r, cols) float32 chunks, in order, of a uniform random (rows, cols) matrix of given std.

    The chunk buffer is reused: consume each chunk before asking for the next.
    """
    half_width = std * math.sqrt(3.0)
    step = max(1, _CHUNK_VALUES // cols)
    buf = np.empty((min(step, rows), cols), np.float32)
    for start in range(0, rows, step):
        chunk = buf[: min(step, rows - start)]
        rng.random(out=chunk, dtype=np.float32)  # [0, 1)
        chunk -= 0.5
        chunk *= 2.0 * half_width
        yield chunk


def _uniform(rng: np.random.Generator, rows: int, cols: int, std: float) -> np.ndarray:
    """A whole (rows, cols) float32 uniform random matrix of the given std."""
    out = np.empty((rows, cols), np.float32)
    pos = 0
    for chunk in _uniform_rows(rng, rows, cols, std):
        out[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    return out


def _quantize_int4(w: np.ndarray, block: int, scale_dtype: np.dtype) -> tuple[np.ndarray, ...]:
    """Asymmetric round-to-nearest 4-bit quantization of the rows of w (N, K), MatMulNBits layout.

    Returns packed (N, k_blocks, block/2) uint8 (low nibble = even k), scales (N, k_blocks) in
    ``scale_dtype`` and packed zero points (N, ceil(k_blocks/2)) uint8 (low nibble = even block).
    """
    n, k = w.shape
    k_blocks = -(-k // block)
    if k_blocks * block != k:
        w = np.pad(w, ((0, 0), (0, k_blocks * block - k)))
    wb = w.reshape(n, k_blocks, block)
    lo = np.minimum(wb.min(axis=-1), 0.0)
    hi = np.maximum(wb.max(axis=-1), 0.0)
    scale = ((hi - lo) / 15.0).astype(scale_dtype)
    scale[scale == 0] = 1.0
    scale32 = scale.astype(np.float32)
    zero = np.clip(np.round(-lo / scale32), 0, 15)
    q = wb / scale32[..., None]
    q += zero[..., None]
    np.round(q, out=q)
    np.clip(q, 0, 15, out=q)
    q8 = q.astype(np.uint8)
    del q
    packed = q8[..., 0::2] | (q8[..., 1::2] << 4)
    zero8 = zero.astype(np.uint8)
    if k_blocks % 2:
        zero8 = np.pad(zero8, ((0, 0), (0, 1)))
    zero_packed = zero8[:, 0::2] | (zero8[:, 1::2] << 4)
    return packed, scale, zero_packed


def _weight_bytes(spec: SyntheticSpec) -> int:
    """Approximate size of all weights, to choose inline or external data before building."""
    item = np.dtype(spec.dtype).itemsize
    q_out = spec.heads * spec.head_size
    kv_out = spec.kv_heads * spec.head_size
    per_layer = spec.hidden * (q_out + 2 * kv_out) + q_out * spec.hidden + 3 * spec.hidden * spec.intermediate
    matmul = spec.layers * per_layer + spec.hidden * spec.vocab
    matmul_bytes = matmul // 2 if spec.quant == "int4" else matmul * item
    return matmul_bytes + spec.vocab * spec.hidden * item


class _TensorStore:
    """Collects initializers; in external mode streams their bytes to model.onnx.data at once."""

    def __init__(self, folder: pathlib.Path | None) -> None:
        self.tensors: list[TensorProto] = []
        self._file = open(folder / _DATA_FILE, "wb") if folder is not None else None  # noqa: SIM115 - closed in __exit__
        self._offset = 0

    def __enter__(self) -> _TensorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()

    def add(self, name: str, array: np.ndarray) -> str:
        """Add a whole tensor; returns its name."""
        array = np.ascontiguousarray(array)
        return self.add_chunks(name, array.shape, array.dtype, iter([array]))

    def add_chunks(self, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: Iterator[np.ndarray]) -> str:
        """Add a tensor given as consecutive slices along its first axis; returns its name."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if self._file is None or nbytes < _INLINE_BYTES:
            parts = [np.array(c, dtype=dtype, copy=True) for c in chunks]
            array = parts[0] if len(parts) == 1 else np.concatenate(parts)
            self.tensors.append(numpy_helper.from_array(array.reshape(shape), name))
            return name
        self._file.write(b"\0" * (-self._offset % _ALIGN))
        self._offset += -self._offset % _ALIGN
        start = self._offset
        for chunk in chunks:
            data = np.ascontiguousarray(chunk, dtype=dtype)
            self._file.write(data.data)
            self._offset += data.nbytes
        if self._offset - start != nbytes:
            raise AssertionError(f"{name}: wrote {self._offset - start} bytes, expected {nbytes}")
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(dtype)
        tensor.dims.extend(shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", _DATA_FILE), ("offset", str(start)), ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.tensors.append(tensor)
        return name


# --------------------------------------------------------------------------- graph


class _Graph:
    """Node list plus the weight generators of one model; each helper returns its output names."""

    def __init__(self, spec: SyntheticSpec, store: _TensorStore) -> None:
        self.spec = spec
        self.store = store
        self.nodes: list[onnx.NodeProto] = []
        self.np_dtype = np.dtype(spec.dtype)
        self.onnx_dtype = helper.np_dtype_to_tensor_dtype(self.np_dtype)
        self._consts: set[str] = set()

    def op(self, op_type: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs: object) -> list[str]:
        """Append one node named after its first output."""
        node = helper.make_node(op_type, inputs, outputs, name=f"{outputs[0]}/{op_type}", domain=domain, **attrs)
        self.nodes.append(node)
        return outputs

    def const(self, name: str, value: object, dtype: np.dtype | type = np.int64) -> str:
        """A small constant initializer, added once per name."""
        if name not in self._consts:
            self._consts.add(self.store.add(name, np.asarray(value, dtype=dtype)))
        return name

    def norm_weight(self, name: str) -> str:
        """RMSNorm weight near 1."""
        w = 1.0 + _uniform(_rng(self.spec, name), 1, self.spec.hidden, 0.1)[0]
        return self.store.add(name, w.astype(self.np_dtype))

    def embedding(self, name: str) -> str:
        """(vocab, hidden) embedding table in dtype, std 1."""
        spec = self.spec
        chunks = _uniform_rows(_rng(spec, name), spec.vocab, spec.hidden, 1.0)
        return self.store.add_chunks(name, (spec.vocab, spec.hidden), self.np_dtype, chunks)

    def linear(self, x: str, base: str, k: int, n: int) -> str:
        """x (..., k) -> (..., n) through a random weight of std 1/sqrt(k) (fp32 or int4)."""
        rng = _rng(self.spec, base)
        std = 1.0 / math.sqrt(k)
        out = f"{base}/out"
        if self.spec.quant == "fp32":
            w = _uniform(rng, n, k, std)  # (n, k) like torch.nn.Linear.weight
            step = max(1, _CHUNK_VALUES // n)
            rows = (w[:, r : r + step].T for r in range(0, k, step))  # (k, n) MatMul layout, by rows
            name = self.store.add_chunks(f"{base}.weight", (k, n), self.np_dtype, rows)
            del w
            self.op("MatMul", [x, name], [out])
            return out
        scales: list[np.ndarray] = []
        zeros: list[np.ndarray] = []

        def packed_rows() -> Iterator[np.ndarray]:
            for chunk in _uniform_rows(rng, n, k, std):
                packed, scale, zero = _quantize_int4(chunk, self.spec.block_size, self.np_dtype)
                scales.append(scale)
                zeros.append(zero)
                yield packed

        k_blocks = -(-k // self.spec.block_size)
        shape = (n, k_blocks, self.spec.block_size // 2)
        q_name = self.store.add_chunks(f"{base}.weight_q4", shape, np.uint8, packed_rows())
        s_name = self.store.add(f"{base}.scales", np.concatenate(scales).reshape(-1))
        z_name = self.store.add(f"{base}.zero_points", np.concatenate(zeros).reshape(-1))
        attrs = {"K": k, "N": n, "bits": 4, "block_size": self.spec.block_size}
        attrs["accuracy_level"] = self.spec.accuracy_level
        self.op("MatMulNBits", [x, q_name, s_name, z_name], [out], domain="com.microsoft", **attrs)
        return out


def _rotary_tables(spec: SyntheticSpec, dtype: np.dtype, factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, (context_length, rotary_dim / 2), for positions 0..context_length-1
    (frequencies divided by ``factor``: LongRoPE's long tables)."""
    rot = spec.rotary_dim
    inv_freq = 1.0 / spec.rope_theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot) / factor
    angles = np.outer(np.arange(spec.context_length, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def _build_graph(spec: SyntheticSpec, store: _TensorStore) -> onnx.GraphProto:
    """The whole decoder graph: embedding, layers, final norm, lm_head."""
    g = _Graph(spec, store)
    inputs, outputs = _graph_io(spec, g.onnx_dtype)
    shared = _gqa_shared(g) if spec.layout == "gqa" else _concat_shared(g)
    embed = g.embedding("model.embed_tokens.weight")
    x = g.op("Gather", [embed, "input_ids"], ["embed/out"], axis=0)[0]  # (batch, seq, hidden)
    residual = x
    h = g.op(
        "SimplifiedLayerNormalization",
        [x, g.norm_weight("model.layers.0.input_layernorm.weight")],
        ["model.layers.0.input_layernorm/out"],
        axis=-1,
        epsilon=spec.rms_eps,
    )[0]
    for i in range(spec.layers):
        p = f"model.layers.{i}"
        if spec.layer_type(i) == "conv":
            o = _short_conv(g, p, i, h)
        else:
            attention = _gqa_attention if spec.layout == "gqa" else _concat_attention
            attn = attention(g, p, i, h, shared)
            o = g.linear(attn, f"{p}.self_attn.o_proj", spec.heads * spec.head_size, spec.hidden)
        h, residual = _skip_norm(g, o, residual, f"{p}.post_attention_layernorm")
        mlp = _mlp(g, p, h)
        next_norm = f"model.layers.{i + 1}.input_layernorm" if i + 1 < spec.layers else "model.norm"
        h, residual = _skip_norm(g, mlp, residual, next_norm)
    logits = g.linear(h, "lm_head", spec.hidden, spec.vocab)
    g.op("Identity", [logits], ["logits"])
    return helper.make_graph(g.nodes, "synthetic_decoder", inputs, outputs, initializer=store.tensors)


def _graph_io(spec: SyntheticSpec, dtype: int) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """Graph inputs and outputs with the genai builder's names and symbolic dims."""
    kv = [spec.kv_heads, None, spec.head_size]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    if spec.layout == "concat":
        inputs.append(
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
        )
    outputs = [helper.make_tensor_value_info("logits", dtype, ["batch_size", "sequence_length", spec.vocab])]
    for i in range(spec.layers):
        if spec.layer_type(i) == "conv":
            conv_shape = ["batch_size", spec.hidden, spec.conv_kernel - 1]
            inputs.append(helper.make_tensor_value_info(f"past.{i}.conv", dtype, conv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.conv", dtype, conv_shape))
            continue
        for kind in ("key", "value"):
            past_shape = ["batch_size", kv[0], "past_sequence_length", kv[2]]
            present_shape = ["batch_size", kv[0], "total_sequence_length", kv[2]]
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", dtype, past_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", dtype, present_shape))
    return inputs, outputs


def _skip_norm(g: _Graph, x: str, residual: str, name: str) -> tuple[str, str]:
    """(RMSNorm(x + residual), x + residual) in one SkipSimplifiedLayerNormalization."""
    normed, total = f"{name}/out", f"{name}/residual"
    g.op(
        "SkipSimplifiedLayerNormalization",
        [x, residual, g.norm_weight(f"{name}.weight")],
        [normed, "", "", total],
        domain="com.microsoft",
        epsilon=g.spec.rms_eps,
    )
    return normed, total


def _mlp(g: _Graph, p: str, h: str) -> str:
    """SwiGLU: down(silu(gate(h)) * up(h))."""
    spec = g.spec
    gate = g.linear(h, f"{p}.mlp.gate_proj", spec.hidden, spec.intermediate)
    up = g.linear(h, f"{p}.mlp.up_proj", spec.hidden, spec.intermediate)
    sig = g.op("Sigmoid", [gate], [f"{p}.mlp/sigmoid"])[0]
    silu = g.op("Mul", [gate, sig], [f"{p}.mlp/silu"])[0]
    act = g.op("Mul", [silu, up], [f"{p}.mlp/act"])[0]
    return g.linear(act, f"{p}.mlp.down_proj", spec.intermediate, spec.hidden)


def _qkv(g: _Graph, p: str, h: str) -> tuple[str, str, str]:
    spec = g.spec
    q = g.linear(h, f"{p}.self_attn.q_proj", spec.hidden, spec.heads * spec.head_size)
    k = g.linear(h, f"{p}.self_attn.k_proj", spec.hidden, spec.kv_heads * spec.head_size)
    v = g.linear(h, f"{p}.self_attn.v_proj", spec.hidden, spec.kv_heads * spec.head_size)
    return q, k, v


# ---- GroupQueryAttention layout


def _gqa_shared(g: _Graph) -> dict[str, str]:
    """seqlens_k and total_sequence_length from attention_mask, and the cos/sin caches."""
    one = g.const("const.one_i64", 1)
    axes = g.const("const.axes_1", [1])
    mask_sum = g.op("ReduceSum", ["attention_mask", axes], ["attn_mask/sum"], keepdims=0)[0]  # (batch,)
    last = g.op("Sub", [mask_sum, one], ["attn_mask/sum_minus_1"])[0]
    seqlens_k = g.op("Cast", [last], ["attn_mask/seqlens_k"], to=TensorProto.INT32)[0]  # (batch,) int32
    shape = g.op("Shape", ["attention_mask"], ["attn_mask/shape"])[0]
    total = g.op("Gather", [shape, one], ["attn_mask/total_len_i64"], axis=0)[0]  # () int64
    total32 = g.op("Cast", [total], ["attn_mask/total_seq_len"], to=TensorProto.INT32)[0]  # () int32
    cos, sin = _rotary_tables(g.spec, g.np_dtype)
    shared = {
        "seqlens_k": seqlens_k,
        "total": total32,
        "cos": g.store.add("cos_cache", cos),  # (context_length, rotary_dim / 2)
        "sin": g.store.add("sin_cache", sin),
    }
    if g.spec.longrope:
        shared |= _longrope_caches(g, total, shared["cos"], shared["sin"])
    return shared


def _longrope_caches(g: _Graph, total: str, short_cos: str, short_sin: str) -> dict[str, str]:
    """cos/sin caches chosen by ``If(Greater(total_sequence_length, N))``: long past N, short up to it."""
    long_cos, long_sin = _rotary_tables(g.spec, g.np_dtype, LONGROPE_FACTOR)
    long_cos, long_sin = g.store.add("cos_cache_long", long_cos), g.store.add("sin_cache_long", long_sin)
    switch = g.store.add("const.longrope_switch", np.array(g.spec.longrope, np.int64))  # () scalar
    flag = g.op("Greater", [total, switch], ["rotary/use_long"])[0]  # (1,) bool
    tables = ["rotary/cos_cache", "rotary/sin_cache"]

    def branch(name: str, cos: str, sin: str) -> onnx.GraphProto:
        outs = [f"rotary/{name}_cos", f"rotary/{name}_sin"]
        nodes = [
            helper.make_node("Identity", [t], [o], name=f"{o}/Identity") for t, o in zip((cos, sin), outs, strict=True)
        ]
        vi = [helper.make_tensor_value_info(o, g.onnx_dtype, None) for o in outs]
        return helper.make_graph(nodes, f"longrope_{name}", [], vi)

    g.op(
        "If",
        [flag],
        tables,
        then_branch=branch("long", long_cos, long_sin),
        else_branch=branch("short", short_cos, short_sin),
    )
    return {"cos": tables[0], "sin": tables[1]}


def _gqa_extra(shared: dict[str, str]) -> list[str]:
    return [shared["seqlens_k"], shared["total"], shared["cos"], shared["sin"]]


def _gqa_attention(g: _Graph, p: str, i: int, h: str, shared: dict[str, str]) -> str:
    spec = g.spec
    q, k, v = _qkv(g, p, h)
    out = f"{p}.self_attn/out"
    window: dict[str, int] = {}
    if spec.layer_type(i) == "sliding_attention":
        window["local_window_size"] = spec.sliding_window
        if spec.window_cache:
            window["sliding_window_cache"] = 1
    g.op(
        "GroupQueryAttention",
        [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", *_gqa_extra(shared)],
        [out, f"present.{i}.key", f"present.{i}.value"],
        domain="com.microsoft",
        do_rotary=1,
        rotary_interleaved=0,
        num_heads=spec.heads,
        kv_num_heads=spec.kv_heads,
        scale=1.0 / math.sqrt(spec.head_size),
        **window,
    )
    return out


# ---- LFM2-style short convolution (hybrid models)


def _short_conv(g: _Graph, p: str, i: int, h: str) -> str:
    """out_proj(C * causal_depthwise_conv(B * X)), [B, C, X] = in_proj(h), as onnxruntime-genai
    0.18's LFM2 builder writes it: the conv runs over concat(past.N.conv, B * X) with kernel
    ``conv_kernel`` (its last ``seq`` outputs are kept); present.N.conv is the last
    ``conv_kernel - 1`` columns of that concat."""
    spec = g.spec
    hid, width, c = spec.hidden, spec.conv_kernel, f"{p}.conv"
    proj = g.linear(h, f"{c}.in_proj", hid, 3 * hid)  # (b, s, 3 * hidden)
    chans = g.op("Transpose", [proj], [f"{c}/channels_first"], perm=[0, 2, 1])[0]  # (b, 3 * hidden, s)
    sizes = g.const(f"const.split_{hid}_{hid}_{hid}", [hid, hid, hid])
    b, gate, x = g.op("Split", [chans, sizes], [f"{c}/b", f"{c}/c", f"{c}/x"], axis=1)  # 3 x (b, hidden, s)
    bx = g.op("Mul", [b, x], [f"{c}/bx"])[0]
    cat = g.op("Concat", [f"past.{i}.conv", bx], [f"{c}/with_past"], axis=2)[0]  # (b, hidden, width - 1 + s)
    w = _uniform(_rng(spec, f"{c}.conv.weight"), hid, width, 1.0 / math.sqrt(width)).reshape(hid, 1, width)
    weight = g.store.add(f"{c}.conv.weight", w.astype(g.np_dtype))  # (hidden, 1, width) depthwise
    full = g.op("Conv", [cat, weight], [f"{c}/conv_full"], group=hid, kernel_shape=[width], pads=[0, 0])[0]
    axes1, axes2 = g.const("const.axes_1", [1]), g.const("const.axes_2", [2])
    seq = g.op("Gather", [g.op("Shape", [h], [f"{c}/h_shape"])[0], axes1], [f"{c}/seq"], axis=0)[0]  # (1,)
    start = g.op("Neg", [seq], [f"{c}/start"])[0]  # (1,) -seq
    end = g.const("const.int64_max", [np.iinfo(np.int64).max])
    conv = g.op("Slice", [full, start, end, axes2], [f"{c}/conv"])[0]  # (b, hidden, s)
    keep = g.const(f"const.neg_{width - 1}", [1 - width])
    g.op("Slice", [cat, keep, end, axes2], [f"present.{i}.conv"])  # (b, hidden, width - 1)
    y = g.op("Mul", [gate, conv], [f"{c}/gated"])[0]
    y = g.op("Transpose", [y], [f"{c}/seq_first"], perm=[0, 2, 1])[0]  # (b, s, hidden)
    return g.linear(y, f"{c}.out_proj", hid, hid)


# ---- Concat layout (plain ONNX ops)


def _concat_shared(g: _Graph) -> dict[str, str]:
    """Rotary cos/sin at position_ids and the additive causal + padding mask, once per graph."""
    spec = g.spec
    cos, sin = _rotary_tables(spec, g.np_dtype)
    cos_t, sin_t = g.store.add("cos_cache", cos), g.store.add("sin_cache", sin)  # (context_length, rot / 2)
    one_axis = g.const("const.axes_1", [1])
    shared = {}
    for name, table in (("cos", cos_t), ("sin", sin_t)):
        # (b, s, rot/2)
        at_pos = g.op("Gather", [table, "position_ids"], [f"rotary/{name}_at_pos"], axis=0)[0]
        shared[name] = g.op("Unsqueeze", [at_pos, one_axis], [f"rotary/{name}"])[0]  # (b, 1, s, rot/2)
    zero, one = g.const("const.zero_i64", 0), g.const("const.one_i64", 1)
    mask_shape = g.op("Shape", ["attention_mask"], ["mask/shape"])[0]
    total = g.op("Gather", [mask_shape, one], ["mask/total"], axis=0)[0]  # () int64
    ids_shape = g.op("Shape", ["input_ids"], ["ids/shape"])[0]
    seq = g.op("Gather", [ids_shape, one], ["mask/seq"], axis=0)[0]  # () int64
    past = g.op("Sub", [total, seq], ["mask/past"])[0]
    key_pos = g.op("Range", [zero, total, one], ["mask/key_pos"])[0]  # (total,)
    query_pos = g.op("Range", [past, total, one], ["mask/query_pos"])[0]  # (seq,)
    query_col = g.op("Unsqueeze", [query_pos, one_axis], ["mask/query_col"])[0]  # (seq, 1)
    causal = g.op("LessOrEqual", [key_pos, query_col], ["mask/causal"])[0]  # (seq, total) bool
    keep_keys = g.op("Cast", ["attention_mask"], ["mask/keep_keys"], to=TensorProto.BOOL)[0]  # (b, total)
    key_axes = g.const("const.axes_1_2_3", [1, 2, 3])
    keep_keys5 = g.op("Unsqueeze", [keep_keys, key_axes], ["mask/keep_keys5"])[0]  # (b, 1, 1, 1, total)
    allowed = g.op("And", [causal, keep_keys5], ["mask/allowed"])[0]  # (b, 1, 1, seq, total)
    neg = g.const("const.mask_neg", np.finfo(g.np_dtype).min / 2, g.np_dtype)
    zero_f = g.const("const.mask_zero", 0.0, g.np_dtype)
    shared["bias"] = g.op("Where", [allowed, zero_f, neg], ["mask/bias"])[0]  # (b, 1, 1, seq, total)
    return shared


def _heads_first(g: _Graph, x: str, heads: int, name: str) -> str:
    """(b, s, heads * head) -> (b, heads, s, head)."""
    shape = g.const(f"const.shape_0_0_{heads}_{g.spec.head_size}", [0, 0, heads, g.spec.head_size])
    split = g.op("Reshape", [x, shape], [f"{name}/split_heads"])[0]
    return g.op("Transpose", [split], [f"{name}/heads_first"], perm=[0, 2, 1, 3])[0]


def _rotate(g: _Graph, x: str, shared: dict[str, str], name: str) -> str:
    """Half-rotation rotary on the first rotary_dim dims of (b, heads, s, head)."""
    spec = g.spec
    half = spec.rotary_dim // 2
    sizes = [half, half] + ([spec.head_size - spec.rotary_dim] if spec.rotary_dim < spec.head_size else [])
    parts = g.op(
        "Split", [x, g.const(f"const.split_{'_'.join(map(str, sizes))}", sizes)],
        [f"{name}/rot_part{j}" for j in range(len(sizes))], axis=3,
    )  # fmt: skip
    x1, x2 = parts[0], parts[1]
    cos, sin = shared["cos"], shared["sin"]
    a = g.op("Mul", [x1, cos], [f"{name}/x1cos"])[0]
    b = g.op("Mul", [x2, sin], [f"{name}/x2sin"])[0]
    c = g.op("Mul", [x2, cos], [f"{name}/x2cos"])[0]
    d = g.op("Mul", [x1, sin], [f"{name}/x1sin"])[0]
    first = g.op("Sub", [a, b], [f"{name}/rot_first"])[0]
    second = g.op("Add", [c, d], [f"{name}/rot_second"])[0]
    return g.op("Concat", [first, second, *parts[2:]], [f"{name}/rotated"], axis=3)[0]


def _concat_attention(g: _Graph, p: str, i: int, h: str, shared: dict[str, str]) -> str:
    """Causal grouped-query attention; K/V heads are broadcast to their query groups, not copied."""
    spec = g.spec
    group = spec.heads // spec.kv_heads
    q, k, v = _qkv(g, p, h)
    a = f"{p}.self_attn"
    q = _rotate(g, _heads_first(g, q, spec.heads, f"{a}/q"), shared, f"{a}/q")  # (b, heads, s, head)
    k = _rotate(g, _heads_first(g, k, spec.kv_heads, f"{a}/k"), shared, f"{a}/k")  # (b, kv, s, head)
    v = _heads_first(g, v, spec.kv_heads, f"{a}/v")  # (b, kv, s, head)
    # (b, kv, past + s, head)
    present_k = g.op("Concat", [f"past_key_values.{i}.key", k], [f"present.{i}.key"], axis=2)[0]
    present_v = g.op("Concat", [f"past_key_values.{i}.value", v], [f"present.{i}.value"], axis=2)[0]
    scale = g.const(f"const.attn_scale_{spec.head_size}", 1.0 / math.sqrt(spec.head_size), g.np_dtype)
    grouped_shape = [0, spec.kv_heads, group, -1, spec.head_size]
    grouped = g.const(f"const.shape_grouped_{spec.kv_heads}_{group}", grouped_shape)
    q5 = g.op("Reshape", [q, grouped], [f"{a}/q_grouped"])[0]  # (b, kv, group, s, head)
    q5 = g.op("Mul", [q5, scale], [f"{a}/q_scaled"])[0]
    axis2 = g.const("const.axes_2", [2])
    k_t = g.op("Transpose", [present_k], [f"{a}/k_t"], perm=[0, 1, 3, 2])[0]  # (b, kv, head, t)
    k_t = g.op("Unsqueeze", [k_t, axis2], [f"{a}/k_t5"])[0]  # (b, kv, 1, head, t)
    v5 = g.op("Unsqueeze", [present_v, axis2], [f"{a}/v5"])[0]  # (b, kv, 1, t, head)
    scores = g.op("MatMul", [q5, k_t], [f"{a}/scores"])[0]  # (b, kv, group, s, t)
    scores = g.op("Add", [scores, shared["bias"]], [f"{a}/scores_masked"])[0]
    probs = g.op("Softmax", [scores], [f"{a}/probs"], axis=-1)[0]
    ctx = g.op("MatMul", [probs, v5], [f"{a}/ctx"])[0]  # (b, kv, group, s, head)
    heads = g.const(f"const.shape_heads_{spec.heads}", [0, spec.heads, -1, spec.head_size])
    ctx = g.op("Reshape", [ctx, heads], [f"{a}/ctx_heads"])[0]  # (b, heads, s, head)
    ctx = g.op("Transpose", [ctx], [f"{a}/ctx_seq_first"], perm=[0, 2, 1, 3])[0]  # (b, s, heads, head)
    flat = g.const(f"const.shape_flat_{spec.heads * spec.head_size}", [0, 0, spec.heads * spec.head_size])
    return g.op("Reshape", [ctx, flat], [f"{a}/out"])[0]  # (b, s, heads * head)


# --------------------------------------------------------------------------- config and tokenizer


def _genai_config(spec: SyntheticSpec) -> dict:
    """genai_config.json in the onnxruntime-genai schema."""
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if spec.layout == "concat":
        inputs["position_ids"] = "position_ids"
    inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    outputs = {
        "logits": "logits",
        "present_key_names": "present.%d.key",
        "present_value_names": "present.%d.value",
    }
    decoder_extra: dict = {}
    if "conv" in spec.layer_types:  # the keys onnxruntime-genai's LFM2 builder writes
        decoder_extra["layer_types"] = list(spec.layer_types)
        decoder_extra["conv_cache_size"] = spec.conv_kernel - 1
        inputs["past_conv_names"] = "past.%d.conv"
        outputs["present_conv_names"] = "present.%d.conv"
    if "sliding_attention" in spec.layer_types:
        decoder_extra["sliding_window"] = {
            "window_size": spec.sliding_window,
            "slide_key_value_cache": False,
            "slide_inputs": False,
            "layers": [i for i in range(spec.layers) if spec.layer_type(i) == "sliding_attention"],
            "cache_slack": 0,
        }
    return {
        "model": {
            "bos_token_id": _BOS,
            "context_length": spec.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": spec.head_size,
                "hidden_size": spec.hidden,
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": spec.heads,
                "num_hidden_layers": spec.layers,
                "num_key_value_heads": spec.kv_heads,
                **decoder_extra,
            },
            "eos_token_id": _EOS,
            "pad_token_id": _UNK,
            "type": spec.model_type,
            "vocab_size": spec.vocab,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": spec.context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": spec.layout == "gqa",
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


# Training text for the BPE merges (written for this project).
_MERGE_TEXT = """\
The river town woke slowly on the first cold morning of the year. Fishing boats rocked at the
harbor wall while the baker opened her shop and the smell of fresh bread drifted down the street.
Children walked to school in small groups, talking about the snow that was promised for the
weekend. An old man sat on the bench near the station and read the morning paper from the first
page to the last, as he had done every day for forty years.

In the afternoon the wind turned and the clouds came in from the sea. The teacher asked the class
to write a short story about a journey: where would they go, what would they carry, and who would
they meet on the way? One girl wrote about a train that crossed the mountains at night. A boy wrote
about a little robot that wanted to learn how to paint the sky. Another wrote about a cat that
followed the sound of music through the narrow streets until it found the old theater.

When the evening came the lights of the houses were reflected in the water, and the town was quiet
again. The model of a language is a model of what people write: the words they choose, the order
they put them in, and the things they want to say to each other. A good program should be simple,
fast and correct, and it should explain itself to the next person who has to read it.
"""


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: printable Latin-1 bytes map to themselves, the rest to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _train_merges(words: Counter[tuple[str, ...]], count: int) -> list[tuple[str, str]]:
    """Greedy BPE merges: most frequent adjacent pair first, ties broken by the pair's text."""
    merges: list[tuple[str, str]] = []
    words = Counter(words)
    while len(merges) < count:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, freq in words.items():
            out: list[str] = []
            j = 0
            while j < len(word):
                if j + 1 < len(word) and (word[j], word[j + 1]) == best:
                    out.append(word[j] + word[j + 1])
                    j += 2
                else:
                    out.append(word[j])
                    j += 1
            merged[tuple(out)] += freq
        words = merged
    return merges


def _write_tokenizer(folder: pathlib.Path, spec: SyntheticSpec) -> None:
    """tokenizer.json (byte-level BPE, BOS added) and tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    byte_chars = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS)}
    vocab |= {byte_chars[b]: _BYTE_OFFSET + b for b in range(256)}
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = Counter(tuple(word) for word, _ in pre.pre_tokenize_str(_MERGE_TEXT))
    merges = _train_merges(words, min(_MAX_MERGES, spec.vocab - len(vocab)))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", _BOS)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL_TOKENS])
    (folder / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<unk>",
            "model_max_length": spec.context_length,
            "tokenizer_class": "GPT2Tokenizer",
            "clean_up_tokenization_spaces": False,
        },
    )


def _write_json(path: pathlib.Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=4) + "\n", encoding="utf-8")
