"""Model folder -> :class:`ModelSpec`.

Two kinds of folder are read:

* onnxruntime-genai folders (``genai_config.json`` + the decoder ONNX file), as made by the
  onnxruntime-genai model builder (Phi-3/Phi-4 INT4, GroupQueryAttention) or by hand;
* plain Optimum-style exports without ``genai_config.json`` (``model.onnx`` with
  ``past_key_values.N.key`` inputs and ``present.N.key`` outputs, optional ``position_ids``),
  whose dimensions are read from the ONNX graph and whose token ids come from ``config.json`` /
  ``generation_config.json`` when present.

The spec is checked against the graph itself: every configured input and output must exist, the
KV head count and head size must match the graph, and the KV layout is detected from the graph.

The decoder ONNX file is parsed once per load, here (external weights are not read). The parsed
proto rides along in the spec for :func:`engine.graph.load_for_generation`, which takes it once
(:meth:`ModelSpec.take_graph`); a model with inline weights holds them all in that proto, so it is
not kept after that.
"""

from __future__ import annotations

import enum
import json
import math
import os
import platform
import re
import stat
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .errors import InvalidRequestError, ModelFileNotFoundError, ModelLoadError, UnsupportedModelError

GENAI_CONFIG = "genai_config.json"
DEFAULT_MAX_LENGTH = 4096  # an Engine's max_length when none is given: min(context_length, this)

# ONNX TensorProto element type -> numpy dtype, for the types a decoder's inputs/outputs use.
_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.dtype(np.float32),
    onnx.TensorProto.FLOAT16: np.dtype(np.float16),
    onnx.TensorProto.INT64: np.dtype(np.int64),
    onnx.TensorProto.INT32: np.dtype(np.int32),
    onnx.TensorProto.BOOL: np.dtype(np.bool_),
}


_FLOAT32 = np.dtype(np.float32)


class KVLayout(str, enum.Enum):
    """How a model's KV cache flows between steps."""

    GQA_SHARED = "gqa_shared"
    """GroupQueryAttention: one (batch, kv_heads, max_length, head_size) buffer bound as past and present."""
    CONCAT = "concat"
    """Separate K and V; present = concat(past, new) along the sequence axis."""
    COMBINED = "combined"
    """One ``past_%d`` tensor per layer, (2, batch, heads, seq, head_size), K and V stacked."""


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape (ints for static dims, strings for symbolic ones) and dtype of a graph input/output."""

    name: str
    shape: tuple[int | str, ...]
    dtype: np.dtype


class _GraphSlot:
    """Holds the parsed decoder proto until :meth:`ModelSpec.take_graph` hands it over, once."""

    __slots__ = ("_proto",)

    def __init__(self, proto: onnx.ModelProto | None = None) -> None:
        self._proto = proto

    def take(self) -> onnx.ModelProto | None:
        proto, self._proto = self._proto, None
        return proto


@dataclass(frozen=True)
class ModelSpec:
    """Everything the engine needs to know about a decoder model, read from its folder."""

    model_dir: Path
    model_path: Path  # the decoder ONNX file
    model_type: str
    layout: KVLayout
    num_layers: int
    num_heads: int | None
    num_kv_heads: int
    head_size: int
    hidden_size: int | None
    vocab_size: int
    context_length: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    kv_dtype: np.dtype
    input_ids: TensorInfo  # (batch, seq) int64 or int32
    attention_mask: TensorInfo | None  # (batch, total_seq) int64 or int32
    position_ids: TensorInfo | None  # (batch, seq)
    logits: TensorInfo  # (batch, seq, vocab)
    past_names: tuple[str, ...]  # per layer: K then V (concat/gqa), or the combined name (combined)
    present_names: tuple[str, ...]  # same order as past_names
    extra_inputs: tuple[TensorInfo, ...] = ()  # e.g. use_cache_branch of a merged Optimum decoder
    search: Mapping[str, Any] = field(default_factory=dict)
    session_options: Mapping[str, Any] = field(default_factory=dict)
    has_genai_config: bool = False
    has_external_data: bool = False
    weight_bytes: int = 0  # bytes of all initializers
    step_read_bytes: int = 0  # weight bytes one decode step reads: a table only gathered from counts one row
    rope_switch_length: int | None = None  # LongRoPE: past this total length the KV cache is recomputed
    rope_cache_rows: int | None = None  # GroupQueryAttention: rows of its cos/sin cache (positions it can rotate)
    # hybrid models (LFM2): layer kinds as genai_config lists them; () when every layer attends
    layer_types: tuple[str, ...] = ()
    conv_names: tuple[tuple[str, str], ...] = ()  # (past, present) state of each conv layer
    conv_shape: tuple[int, int] = (0, 0)  # (channels, width) of one row's conv state
    conv_dtype: np.dtype = _FLOAT32  # of the conv states (the graph's)
    # sliding-window layers whose GroupQueryAttention takes window-sized buffers
    # (sliding_window_cache=1): past KV name -> the window (local_window_size)
    window_caches: Mapping[str, int] = field(default_factory=dict)
    # why a pass over several tokens may not reproduce one-token steps closely enough to keep
    # every greedy token (activations rounded to int8 / half precision inside matmuls); None when
    # the graph computes its matmuls on fp32/fp16 activations. See :func:`coarse_activations`.
    coarse_activations: str | None = None
    graph: _GraphSlot = field(default_factory=_GraphSlot, repr=False, compare=False)  # see take_graph

    @property
    def num_kv_layers(self) -> int:
        """Layers with a KV cache (a hybrid model's conv layers have none)."""
        return len(self.past_names) if self.layout is KVLayout.COMBINED else len(self.past_names) // 2

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token takes for one sequence (all KV layers, K and V)."""
        return 2 * self.num_kv_layers * self.num_kv_heads * self.head_size * self.kv_dtype.itemsize

    def kv_length(self, past_name: str, max_length: int) -> int:
        """Sequence capacity of ``past_name``'s share buffer: ``max_length``, or for a layer with a
        window-sized cache ``min(max_length, window + WINDOW_CACHE_SLACK)`` (onnxruntime-genai's CPU
        sizing)."""
        window = self.window_caches.get(past_name)
        return max_length if window is None else min(max_length, window + WINDOW_CACHE_SLACK)

    def take_graph(self) -> onnx.ModelProto | None:
        """The decoder's ModelProto as :func:`load_model_spec` parsed it (external weights not
        loaded), for the caller to edit; None once taken (the caller then reads ``model_path``)."""
        return self.graph.take()

    def kv_shape(self, batch: int, length: int) -> tuple[int, ...]:
        """Shape of one past/present tensor for ``batch`` sequences of ``length`` tokens."""
        if self.layout is KVLayout.COMBINED:
            return (2, batch, self.num_kv_heads, length, self.head_size)
        return (batch, self.num_kv_heads, length, self.head_size)


# --------------------------------------------------------------------------------------------
# helpers


def _err(path: Path, problem: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: {problem}")


MAX_CONFIG_BYTES = 64 * 2**20  # a config JSON file larger than this is refused unread


def entry_kind(path: Path) -> str | None:
    """What ``path`` is after following links: ``"file"``, ``"dir"``, ``"other"`` (a FIFO, a
    device, a socket), or None when nothing is there. A link loop, a dangling link or an entry
    that cannot be examined raise :class:`ModelLoadError`, so that a broken file is reported
    instead of being taken for a missing one (and the folder for another kind of folder)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise _err(path, f"is a link to {os.readlink(path)!r}, which does not exist") from None
        return None
    except OSError as e:  # ELOOP (a link loop), EACCES, ENAMETOOLONG, ...
        raise _err(path, f"cannot be examined ({e.strerror or e})") from e
    except ValueError as e:  # an embedded NUL byte in the name
        raise _err(path, f"is not a valid file name ({e})") from e
    if stat.S_ISREG(st.st_mode):
        return "file"
    return "dir" if stat.S_ISDIR(st.st_mode) else "other"


def open_regular(path: Path, max_bytes: int, what: str = "file") -> Any:
    """Open a file of the model folder for reading in binary, refusing what is not a regular file
    (a FIFO would block the open, a link to /dev/zero would never end) or is larger than
    ``max_bytes``, and turning OS errors (permissions, link loops) into :class:`ModelLoadError`."""
    kind = entry_kind(path)
    if kind is None:
        raise ModelFileNotFoundError(f"{path}: the {what} does not exist")
    if kind != "file":
        shown = "a folder" if kind == "dir" else "not a regular file (a FIFO, socket or device)"
        raise _err(path, f"is {shown}; the {what} must be a regular file")
    try:  # non-blocking, so that a FIFO swapped in after the check above cannot block the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise _err(path, f"cannot be read ({e.strerror or e})") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _err(path, f"is not a regular file; the {what} must be one")
        raise _err(path, f"is {st.st_size} bytes; a {what} larger than {max_bytes} bytes is refused")
    return os.fdopen(fd, "rb")


def read_text(path: Path, max_bytes: int, what: str = "file") -> str:
    """The whole of a regular, bounded, UTF-8 text file of the model folder (see :func:`open_regular`)."""
    with open_regular(path, max_bytes, what) as f:
        try:
            raw = f.read(max_bytes + 1)
        except OSError as e:
            raise _err(path, f"cannot be read ({e.strerror or e})") from e
    if len(raw) > max_bytes:
        raise _err(path, f"grew past {max_bytes} bytes while being read; a {what} that large is refused")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _err(path, f"is not UTF-8 text ({e.reason} at byte {e.start})") from e


def read_json_object(path: Path, what: str = "config file") -> dict[str, Any]:
    """A JSON config file of the model folder as a dict: regular, bounded (MAX_CONFIG_BYTES),
    UTF-8, not nested past the parser's depth, an object at the top; else ModelLoadError."""
    text = read_text(path, MAX_CONFIG_BYTES, what)
    try:
        data = json.loads(text)
    except RecursionError as e:
        raise _err(path, "nests JSON arrays or objects too deeply") from e
    except json.JSONDecodeError as e:
        raise _err(path, f"is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise _err(path, f"must hold a JSON object, found {type(data).__name__}")
    return data


def _get(d: Mapping[str, Any], key: str, typ: type | tuple[type, ...], path: Path, where: str, default=None):
    """Typed lookup in a config dict with an error that names the file and key."""
    if key not in d:
        if default is not None or typ is type(None):
            return default
        raise _err(path, f"missing key '{where}{key}'")
    value = d[key]
    ok = isinstance(value, typ) and not (isinstance(value, bool) and bool not in _as_tuple(typ))
    if not ok:
        names = "/".join(t.__name__ for t in _as_tuple(typ))
        raise _err(path, f"key '{where}{key}' must be {names}, found {value!r}")
    return value


def _as_tuple(typ) -> tuple[type, ...]:
    return typ if isinstance(typ, tuple) else (typ,)


def _opt_int(d: Mapping[str, Any], key: str, path: Path, where: str) -> int | None:
    if d.get(key) is None:
        return None
    return _get(d, key, int, path, where)


def _eos_ids(value: Any, path: Path, where: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, bool):
        raise _err(path, f"'{where}eos_token_id' must be an int or a list of ints, found {value!r}")
    if isinstance(value, int):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise _err(path, f"'{where}eos_token_id' must be an int or a list of ints, found {value!r}")


def _tensor_info(vi: onnx.ValueInfoProto) -> TensorInfo:
    tt = vi.type.tensor_type
    dims: list[int | str] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    dtype = _ONNX_TO_NUMPY.get(tt.elem_type)
    if dtype is None:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return TensorInfo(vi.name, tuple(dims), dtype)


@dataclass
class _Graph:
    """What the spec needs from the parsed decoder graph, and the proto itself (see _GraphSlot)."""

    proto: onnx.ModelProto
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]
    op_types: set[str]
    external: bool
    weight_bytes: int
    step_read_bytes: int
    rope_switch_length: int | None = None
    rope_cache_rows: int | None = None
    coarse_activations: str | None = None


@dataclass
class _Declared:
    """What a folder's config files declare about the decoder (for an Optimum export, partly read
    from the graph), before :func:`_finish_spec` checks it against the graph."""

    model_dir: Path
    model_path: Path
    cfg_path: Path  # the file that errors about these values name
    model_type: str
    n_layers: int
    n_heads: int | None
    kv_heads: int
    head_size: int
    hidden: int | None
    vocab: int | None
    context: int
    bos: int | None
    eos: tuple[int, ...]
    pad: int | None
    ids_name: str
    mask_name: str
    pos_name: str
    logits_name: str
    past: Sequence[str]
    present: Sequence[str]
    combined: bool
    search: Mapping[str, Any] = field(default_factory=dict)
    session_options: Mapping[str, Any] = field(default_factory=dict)
    has_genai: bool = False
    layer_types: tuple[str, ...] = ()  # hybrid models: see _declared_layers
    kv_layers: tuple[int, ...] = ()  # the layer index of each KV layer (default: 0..n_layers-1)
    conv_past: Sequence[str] = ()
    conv_present: Sequence[str] = ()
    conv_width: int | None = None  # decoder.conv_cache_size
    sliding: Mapping[str, Any] | None = None  # decoder.sliding_window


def _initializer_bytes(t: onnx.TensorProto) -> int:
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    if t.raw_data:
        return len(t.raw_data)
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return int(math.prod(t.dims)) * itemsize


def _step_read_bytes(g: onnx.GraphProto, sizes: Mapping[str, int]) -> int:
    """Initializer bytes one decode step reads: all of them, except that a table only ever gathered
    from (the token embedding) counts one row along axis 0, not the whole table."""
    rows = {t.name: max(int(t.dims[0]) if len(t.dims) else 1, 1) for t in g.initializer}
    uses: dict[str, list[tuple[str, int]]] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in sizes:
                uses.setdefault(name, []).append((node.op_type, i))
    total = 0
    for name, n in sizes.items():
        gathered = uses.get(name) and all(op == "Gather" and i == 0 for op, i in uses[name])
        total += n // rows[name] if gathered else n
    return total


# ops that quantize their activations on the fly (dynamic int8 quantization)
_DYNAMIC_QUANT_OPS = (
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "QAttention",
)
# MatMulNBits accuracy_level -> the type its CPU kernels round the activations to. On x86-64 MLAS
# has int8 kernels only (levels 2 and 3 compute in fp32 there: measured exact on an AVX-512 BF16
# machine); ARM64 has fp16 and bf16 ones too.
_NBITS_COMPUTE = {4: "int8"} if platform.machine().lower() in ("x86_64", "amd64") else {2: "fp16", 3: "bf16", 4: "int8"}


def coarse_activations(g: onnx.GraphProto) -> str | None:
    """Why the graph's matmuls round their activations coarsely, or None when they do not.

    ONNX Runtime's CPU kernels sum in a different order for one new token than for several (MLAS
    takes a one-row GEMM kernel for ``M == 1``), so a pass over several tokens differs from
    one-token steps by up to ~4e-7; on fp32/fp16 activations that stays a rounding-level difference.
    A matmul that first rounds its input to int8 (MatMulNBits ``accuracy_level`` 4, dynamic
    quantization) or, on ARM64, to half precision (levels 2, 3) turns it into a whole rounding step
    for some element, enough to swap near-tied greedy tokens (measured: ``python -m
    perf.spec_exactness``, docs/perf.md).
    Speculation's verify passes and the prefix cache's reuse of one-token steps' KV stay exact only
    without it.
    """
    levels: set[int] = set()
    for node in g.node:
        if node.op_type in _DYNAMIC_QUANT_OPS:
            return f"its {node.op_type} nodes quantize activations to int8"
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level" and a.i in _NBITS_COMPUTE:
                    levels.add(int(a.i))
    if not levels:
        return None
    top = max(levels)
    return f"its MatMulNBits nodes have accuracy_level {top} ({_NBITS_COMPUTE[top]} activations)"


def _read_graph(model_path: Path) -> _Graph:
    open_regular(model_path, 2**62, "ONNX model").close()  # a folder, FIFO or device is refused unread
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, RuntimeError or others on a corrupted file
        raise _err(model_path, f"is not a readable ONNX model ({type(e).__name__}: {e})") from e
    g = model.graph
    init_names = {t.name for t in g.initializer}
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.initializer)
    if external:
        sizes: dict[str, int] = {}
        for t in g.initializer:
            info = {entry.key: entry.value for entry in t.external_data}
            if "location" not in info:
                continue
            location = info["location"]
            if location not in sizes:
                data_path = model_path.parent / location
                if entry_kind(data_path) != "file":
                    raise ModelFileNotFoundError(
                        f"{model_path}: external weights file '{location}' is missing from {model_path.parent}"
                    )
                sizes[location] = data_path.stat().st_size
            try:
                end = int(info.get("offset", 0)) + int(info.get("length", 0))
            except ValueError as e:
                raise _err(model_path, f"initializer '{t.name}' has a bad external data offset or length") from e
            if end > sizes[location]:
                raise ModelLoadError(
                    f"{model_path.parent / location}: truncated or wrong file: initializer '{t.name}' needs bytes "
                    f"up to {end} but the file has {sizes[location]}"
                )
    if not g.node:
        raise _err(model_path, "has an empty graph")
    sizes = {t.name: _initializer_bytes(t) for t in g.initializer}
    return _Graph(
        proto=model,
        inputs={vi.name: _tensor_info(vi) for vi in g.input if vi.name not in init_names},
        outputs={vi.name: _tensor_info(vi) for vi in g.output},
        op_types={n.op_type for n in g.node},
        external=external,
        weight_bytes=sum(sizes.values()),
        step_read_bytes=_step_read_bytes(g, sizes),
        rope_switch_length=_rope_switch_length(g),
        rope_cache_rows=_rope_cache_rows(g),
        coarse_activations=coarse_activations(g),
    )


def _scalar_constant(g: onnx.GraphProto, name: str) -> int | None:
    """The integer value of a scalar initializer or Constant node output, else None."""
    for t in g.initializer:
        if t.name == name:
            arr = onnx.numpy_helper.to_array(t)
            return int(arr.reshape(-1)[0]) if arr.size == 1 and np.issubdtype(arr.dtype, np.integer) else None
    for n in g.node:
        if n.op_type == "Constant" and n.output and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    arr = onnx.numpy_helper.to_array(a.t)
                    if arr.size == 1 and np.issubdtype(arr.dtype, np.integer):
                        return int(arr.reshape(-1)[0])
    return None


def _rope_switch_length(g: onnx.GraphProto) -> int | None:
    """Sequence length past which a LongRoPE graph switches to its long-context cos/sin caches.

    The onnxruntime-genai builder writes ``If(Greater(total_sequence_length, N))`` choosing between
    the short and long caches (Phi-3/Phi-4 with rope scaling, N = original context, 4096 for
    Phi-4-mini). Keys already in the cache were rotated with the short factors, so generation that
    crosses N must recompute the cache to match transformers (which drops its cache there);
    onnxruntime-genai 0.18 on the CPU does not, and leaves transformers' tokens after the switch.
    """
    producer = {out: n for n in g.node for out in n.output}
    for node in g.node:
        if node.op_type != "If" or not node.input:
            continue
        cond = producer.get(node.input[0])
        if cond is None or cond.op_type != "Greater" or len(cond.input) != 2:
            continue
        value = _scalar_constant(g, cond.input[1])
        if value is not None and value > 0:
            return value
    return None


def _constant_rows(g: onnx.GraphProto, name: str, depth: int = 0) -> int | None:
    """Leading dimension of the tensor ``name`` when it is an initializer, a Constant, or an If
    whose branches each yield one (the smaller of the two); None when it cannot be told."""
    for t in g.initializer:
        if t.name == name:
            return int(t.dims[0]) if len(t.dims) else None
    for n in g.node:
        if name not in n.output:
            continue
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and len(a.t.dims):
                    return int(a.t.dims[0])
        if n.op_type == "If" and depth < 4:
            k = list(n.output).index(name)
            rows = []
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH and k < len(a.g.output):
                    rows.append(_constant_rows(a.g, a.g.output[k].name, depth + 1))
            return min(rows) if rows and None not in rows else None
        return None
    return None


def _rope_cache_rows(g: onnx.GraphProto) -> int | None:
    """Fewest rows of any GroupQueryAttention node's cos/sin cache (inputs 7 and 8): positions past
    it cannot be rotated, and ORT fails there with an error of its own, hundreds of tokens in."""
    rows = [
        r
        for n in g.node
        if n.op_type == "GroupQueryAttention" and len(n.input) > 8
        for name in (n.input[7], n.input[8])
        if name and (r := _constant_rows(g, name)) is not None
    ]
    return min(rows) if rows else None


def _layer_names(template: Any, n: int, path: Path, key: str) -> list[str]:
    """``template % i`` for each layer; the template must be a string with one ``%d`` and no other
    ``%`` conversion (``%%`` is a literal percent sign)."""
    if not isinstance(template, str):
        raise _err(path, f"name template '{key}' must be a string with one '%d', found {template!r}")
    if template.replace("%%", "").count("%") != 1 or "%d" not in template.replace("%%", ""):
        raise _err(path, f"name template '{key}' = {template!r} must hold exactly one '%d' (the layer index)")
    try:
        return [template % i for i in range(n)]
    except (TypeError, ValueError) as e:
        raise _err(path, f"name template '{key}' = {template!r} is not a valid pattern ({e})") from e


# genai_config.json session_options the engine applies, and the type and range each must have.
_SESSION_INTS = {"intra_op_num_threads": (0, 1024), "inter_op_num_threads": (0, 1024), "log_severity_level": (0, 4)}


def _check_session_options(options: Any, path: Path) -> dict[str, Any]:
    """genai_config.json's ``model.decoder.session_options``, type- and range-checked (0 threads
    means ORT's default). ORT config entries (``session.*``, ``ep.*``) must be strings; keys the
    engine does not apply (genai's ``provider_options``, ``log_id`` ...) pass through unchecked."""
    where = "model.decoder.session_options"
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise _err(path, f"{where} must be an object, found {type(options).__name__}")
    for key, value in options.items():
        if key in _SESSION_INTS:
            lo, hi = _SESSION_INTS[key]
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise _err(path, f"{where}.{key} must be an int in {lo}..{hi}, found {value!r}")
        elif key.startswith(("session.", "ep.")) and not isinstance(value, str):
            raise _err(path, f"{where}.{key} is an ORT config entry: it must be a string, found {value!r}")
    return dict(options)


def _io_name(d: Mapping[str, Any], key: str, default: str, path: Path, where: str) -> str:
    """An input/output name from genai_config (``inputs.input_ids`` ...): a non-empty string."""
    value = d.get(key, default)
    if not isinstance(value, str) or not value:
        raise _err(path, f"'{where}{key}' must be a non-empty string (a graph input/output name), found {value!r}")
    return value


def _check_names(names: Sequence[str], available: Mapping[str, TensorInfo], what: str, model_path: Path):
    missing = [n for n in names if n not in available]
    if missing:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        have = ", ".join(list(available)[:8])
        raise _err(model_path, f"the graph has no {what} named {shown} (it has: {have} ...)")


def _static_dim(info: TensorInfo, axis: int) -> int | None:
    d = info.shape[axis] if len(info.shape) > axis else None
    return d if isinstance(d, int) and d > 0 else None


# --------------------------------------------------------------------------------------------
# genai_config.json


def _spec_from_genai(model_dir: Path) -> ModelSpec:
    cfg_path = model_dir / GENAI_CONFIG
    cfg = read_json_object(cfg_path)
    model = _get(cfg, "model", dict, cfg_path, "")
    dec = _get(model, "decoder", dict, cfg_path, "model.")
    filename = _get(dec, "filename", str, cfg_path, "model.decoder.")
    model_path = model_dir / filename
    kind = entry_kind(model_path) if filename and "\0" not in filename else None
    if kind is None:
        raise ModelFileNotFoundError(
            f"{cfg_path}: model.decoder.filename names {filename!r}, which is missing from {model_dir}"
        )
    graph = _read_graph(model_path)

    n_layers = _get(dec, "num_hidden_layers", int, cfg_path, "model.decoder.")
    kv_heads = _get(dec, "num_key_value_heads", int, cfg_path, "model.decoder.")
    head_size = _get(dec, "head_size", int, cfg_path, "model.decoder.")
    n_heads = _opt_int(dec, "num_attention_heads", cfg_path, "model.decoder.")
    hidden = _opt_int(dec, "hidden_size", cfg_path, "model.decoder.")
    for key, v in (
        ("num_hidden_layers", n_layers),
        ("num_key_value_heads", kv_heads),
        ("head_size", head_size),
    ):
        if v <= 0:
            raise _err(cfg_path, f"model.decoder.{key} must be positive, found {v}")

    inputs = _get(dec, "inputs", dict, cfg_path, "model.decoder.", default={}) or {}
    outputs = _get(dec, "outputs", dict, cfg_path, "model.decoder.", default={}) or {}
    ids_name = _io_name(inputs, "input_ids", "input_ids", cfg_path, "model.decoder.inputs.")
    mask_name = _io_name(inputs, "attention_mask", "attention_mask", cfg_path, "model.decoder.inputs.")
    pos_name = _io_name(inputs, "position_ids", "position_ids", cfg_path, "model.decoder.inputs.")
    logits_name = _io_name(outputs, "logits", "logits", cfg_path, "model.decoder.outputs.")
    # Each layer needs its own past input: a layer count beyond the graph's inputs is refused
    # before per-layer name tables are built (10**7 layers would take gigabytes and seconds).
    if n_layers > len(graph.inputs):
        raise _err(
            cfg_path,
            f"model.decoder.num_hidden_layers is {n_layers} but the graph has only {len(graph.inputs)} inputs "
            "(each layer needs its own past KV input)",
        )

    if "past_names" in inputs or "present_names" in outputs:
        past = _layer_names(inputs.get("past_names", "past_%d"), n_layers, cfg_path, "inputs.past_names")
        present = _layer_names(outputs.get("present_names", "present_%d"), n_layers, cfg_path, "outputs.present_names")
        combined = True
    else:
        pk = _layer_names(
            inputs.get("past_key_names", "past_key_values.%d.key"),
            n_layers,
            cfg_path,
            "inputs.past_key_names",
        )
        pv = _layer_names(
            inputs.get("past_value_names", "past_key_values.%d.value"),
            n_layers,
            cfg_path,
            "inputs.past_value_names",
        )
        ok = _layer_names(
            outputs.get("present_key_names", "present.%d.key"),
            n_layers,
            cfg_path,
            "outputs.present_key_names",
        )
        ov = _layer_names(
            outputs.get("present_value_names", "present.%d.value"),
            n_layers,
            cfg_path,
            "outputs.present_value_names",
        )
        past = [n for pair in zip(pk, pv, strict=True) for n in pair]
        present = [n for pair in zip(ok, ov, strict=True) for n in pair]
        combined = False

    past, present, layer_extras = _declared_layers(dec, inputs, outputs, n_layers, cfg_path, past, present, combined)

    search = _get(cfg, "search", dict, cfg_path, "", default={}) or {}
    vocab = _opt_int(model, "vocab_size", cfg_path, "model.")
    context = _opt_int(model, "context_length", cfg_path, "model.")
    search_max = _opt_int(search, "max_length", cfg_path, "search.")
    if context is None:
        context = search_max
    if context is None or context <= 0:
        raise _err(cfg_path, "needs a positive model.context_length (or search.max_length)")
    if context < 2:
        raise _err(
            cfg_path,
            f"model.context_length is {context}: it leaves no room for a prompt token and a generated one "
            "(at least 2 is needed)",
        )
    declared = _Declared(
        model_dir=model_dir,
        model_path=model_path,
        cfg_path=cfg_path,
        model_type=_get(model, "type", str, cfg_path, "model.", default="unknown"),
        n_layers=n_layers,
        n_heads=n_heads,
        kv_heads=kv_heads,
        head_size=head_size,
        hidden=hidden,
        vocab=vocab,
        context=context,
        bos=_opt_int(model, "bos_token_id", cfg_path, "model."),
        eos=_eos_ids(model.get("eos_token_id"), cfg_path, "model."),
        pad=_opt_int(model, "pad_token_id", cfg_path, "model."),
        ids_name=ids_name,
        mask_name=mask_name,
        pos_name=pos_name,
        logits_name=logits_name,
        past=past,
        present=present,
        combined=combined,
        search=search,
        session_options=_check_session_options(dec.get("session_options"), cfg_path),
        has_genai=True,
        **layer_extras,
    )
    return _finish_spec(declared, graph)


# --------------------------------------------------------------------------------------------
# plain Optimum-style export

_OPTIMUM_FILES = ("model.onnx", "decoder_model_merged.onnx", "decoder_with_past_model.onnx")
_PAST_KEY = re.compile(r"^past_key_values\.(\d+)\.key$")


def _spec_from_optimum(model_dir: Path) -> ModelSpec:
    model_path = next((model_dir / f for f in _OPTIMUM_FILES if entry_kind(model_dir / f) is not None), None)
    if model_path is None:
        raise ModelFileNotFoundError(
            f"{model_dir}: no {GENAI_CONFIG} and no ONNX decoder ({', '.join(_OPTIMUM_FILES)}) in the folder"
        )
    graph = _read_graph(model_path)
    layers = sorted(int(m.group(1)) for n in graph.inputs if (m := _PAST_KEY.match(n)))
    if not layers:
        raise UnsupportedModelError(
            f"{model_path}: no {GENAI_CONFIG} and no 'past_key_values.N.key' inputs: "
            "the engine needs a decoder exported with a KV cache (Optimum: --task text-generation-with-past)"
        )
    n_layers = len(layers)
    if layers != list(range(n_layers)):
        raise _err(model_path, f"past_key_values layer indices are not 0..{n_layers - 1}: {layers}")
    past = [n for i in range(n_layers) for n in (f"past_key_values.{i}.key", f"past_key_values.{i}.value")]
    present = [n for i in range(n_layers) for n in (f"present.{i}.key", f"present.{i}.value")]
    k0 = graph.inputs[past[0]]
    kv_heads, head_size = _static_dim(k0, 1), _static_dim(k0, 3)
    if kv_heads is None or head_size is None:
        raise UnsupportedModelError(f"{model_path}: {past[0]} has symbolic heads/head_size dims {k0.shape}")

    hf: dict[str, Any] = {}
    for name in ("config.json", "generation_config.json"):
        if entry_kind(model_dir / name) is not None:
            hf.update(read_json_object(model_dir / name))
    cfg_path = model_dir / "config.json"
    hf_ints = {
        k: _opt_int(hf, k, cfg_path, "")
        for k in ("num_attention_heads", "hidden_size", "vocab_size", "bos_token_id", "pad_token_id")
    }
    context = next(
        (v for k in ("max_position_embeddings", "n_positions", "max_length") if (v := _opt_int(hf, k, cfg_path, ""))),
        2048,
    )
    declared = _Declared(
        model_dir=model_dir,
        model_path=model_path,
        cfg_path=model_path,
        model_type=_get(hf, "model_type", str, cfg_path, "", default="unknown"),
        n_layers=n_layers,
        n_heads=hf_ints["num_attention_heads"],
        kv_heads=kv_heads,
        head_size=head_size,
        hidden=hf_ints["hidden_size"],
        vocab=hf_ints["vocab_size"],
        context=context,
        bos=hf_ints["bos_token_id"],
        eos=_eos_ids(hf.get("eos_token_id"), cfg_path, ""),
        pad=hf_ints["pad_token_id"],
        ids_name="input_ids",
        mask_name="attention_mask",
        pos_name="position_ids",
        logits_name="logits",
        past=past,
        present=present,
        combined=False,
    )
    return _finish_spec(declared, graph)


# --------------------------------------------------------------------------------------------
# hybrid (conv-state) and sliding-window layers

ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "attention")
CONV_LAYER_TYPES = ("conv",)
WINDOW_CACHE_SLACK = 16  # positions past the window a window-sized CPU cache holds (onnxruntime-genai's CPU default)
_STATE_HINTS = ("conv", "ssm", "recurrent", "state")  # input names of per-layer state other than KV


def _declared_layers(
    dec: Mapping[str, Any],
    inputs: Mapping[str, Any],
    outputs: Mapping[str, Any],
    n_layers: int,
    cfg_path: Path,
    past: list[str],
    present: list[str],
    combined: bool,
) -> tuple[list[str], list[str], dict[str, Any]]:
    """The KV names of the layers that attend, and the _Declared fields of a hybrid model.

    onnxruntime-genai's LFM2 builder writes ``decoder.layer_types`` (``"conv"`` or
    ``"full_attention"`` per layer), ``decoder.conv_cache_size`` and the name templates
    ``inputs.past_conv_names`` / ``outputs.present_conv_names`` (0.18: ``past.%d.conv``, states of
    ``(batch, hidden, kernel - 1)``; later versions ``past_conv.%d``, one column wider: the
    widths are read from the graph); the graph has past KV only for the attention layers. Any
    other layer kind (a recurrent/SSM state) raises :class:`UnsupportedModelError`.
    """
    extras: dict[str, Any] = {}
    sliding = dec.get("sliding_window")
    if sliding is not None:
        if not isinstance(sliding, dict):
            raise _err(cfg_path, f"model.decoder.sliding_window must be an object, found {sliding!r}")
        extras["sliding"] = sliding
    types = dec.get("layer_types")
    if types is None:
        return past, present, extras
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise _err(cfg_path, f"model.decoder.layer_types must be a list of strings, found {types!r}")
    if len(types) != n_layers:
        raise _err(cfg_path, f"model.decoder.layer_types lists {len(types)} layers, num_hidden_layers is {n_layers}")
    known = ATTENTION_LAYER_TYPES + CONV_LAYER_TYPES
    other = sorted({t for t in types if t not in known})
    if other:
        raise UnsupportedModelError(
            f"{cfg_path}: model.decoder.layer_types has layers of kind {', '.join(map(repr, other))}; the engine "
            f"runs attention layers ({', '.join(ATTENTION_LAYER_TYPES)}) and LFM2-style conv layers ('conv')"
        )
    attn = [i for i, t in enumerate(types) if t in ATTENTION_LAYER_TYPES]
    conv = [i for i, t in enumerate(types) if t in CONV_LAYER_TYPES]
    if not attn:
        raise UnsupportedModelError(f"{cfg_path}: model.decoder.layer_types has no attention layer")
    per = 1 if combined else 2
    past = [past[per * i + j] for i in attn for j in range(per)]
    present = [present[per * i + j] for i in attn for j in range(per)]
    extras |= {"layer_types": tuple(types), "kv_layers": tuple(attn)}
    if conv:
        past_conv = _layer_names(
            inputs.get("past_conv_names", "past.%d.conv"), n_layers, cfg_path, "inputs.past_conv_names"
        )
        present_conv = _layer_names(
            outputs.get("present_conv_names", "present.%d.conv"), n_layers, cfg_path, "outputs.present_conv_names"
        )
        extras["conv_past"] = [past_conv[i] for i in conv]
        extras["conv_present"] = [present_conv[i] for i in conv]
        extras["conv_width"] = _opt_int(dec, "conv_cache_size", cfg_path, "model.decoder.")
    return past, present, extras


def _check_declared_state(d: _Declared, graph: _Graph) -> None:
    """The declared conv states are in the graph; and a graph without some of the declared past
    KV inputs but with per-layer state inputs of another kind is a hybrid design the config does
    not declare: an unsupported model, not a corrupted file."""
    past, model_path = d.past, d.model_path
    _check_names(d.conv_past, graph.inputs, "past conv state input", model_path)
    _check_names(d.conv_present, graph.outputs, "present conv state output", model_path)
    if all(n in graph.inputs for n in past):
        return
    state = [n for n in graph.inputs if n not in past and any(h in n.lower() for h in _STATE_HINTS)]
    if state:
        shown = ", ".join(state[:4]) + (" ..." if len(state) > 4 else "")
        raise UnsupportedModelError(
            f"{model_path}: the graph carries per-layer state besides KV ({shown}) and lacks past KV for some "
            "layers: a hybrid model whose genai_config.json does not declare its layers. The engine runs hybrids "
            "as onnxruntime-genai's LFM2 builder writes them (decoder.layer_types with 'conv' and "
            "'full_attention', inputs.past_conv_names, outputs.present_conv_names)"
        )


def _state_fields(d: _Declared, graph: _Graph, layout: KVLayout) -> dict[str, Any]:
    """The ModelSpec fields of conv states and window-sized KV, checked against the graph."""
    fields: dict[str, Any] = {}
    if d.layer_types:
        fields["layer_types"] = d.layer_types
    if d.conv_past:
        fields.update(_conv_fields(d, graph))
    windows = _graph_windows(graph.proto.graph)  # past key name -> (local_window_size, sliding_window_cache)
    _check_declared_window(d, windows)
    if layout is KVLayout.GQA_SHARED:
        caches: dict[str, int] = {}
        for node in graph.proto.graph.node:
            if node.op_type == "GroupQueryAttention" and len(node.input) > 4 and node.input[3] in windows:
                window, cache = windows[node.input[3]]
                if cache and window > 0:
                    caches[node.input[3]] = caches[node.input[4]] = window
        fields["window_caches"] = caches
    return fields


def _conv_fields(d: _Declared, graph: _Graph) -> dict[str, Any]:
    _check_names(d.conv_past, graph.inputs, "past conv state input", d.model_path)
    _check_names(d.conv_present, graph.outputs, "present conv state output", d.model_path)
    first = graph.inputs[d.conv_past[0]]
    for name in d.conv_past:
        info = graph.inputs[name]
        dims = (_static_dim(info, 1), _static_dim(info, 2))
        if len(info.shape) != 3 or None in dims:
            raise UnsupportedModelError(
                f"{d.model_path}: conv state input '{name}' has shape {info.shape}; (batch, channels, width) with "
                "static channels and width expected"
            )
        if info.dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise UnsupportedModelError(f"{d.model_path}: conv state input '{name}' has dtype {info.dtype}")
        if info.shape[1:] != first.shape[1:] or info.dtype != first.dtype:
            raise UnsupportedModelError(
                f"{d.model_path}: conv state inputs differ in shape or dtype ('{first.name}' {first.shape} "
                f"{first.dtype}, '{name}' {info.shape} {info.dtype}); one shape for every conv layer expected"
            )
    width = int(first.shape[2])
    if d.conv_width is not None and d.conv_width != width:
        raise _err(
            d.cfg_path,
            f"model.decoder.conv_cache_size is {d.conv_width} but the graph's '{first.name}' is {width} wide",
        )
    names = tuple(zip(d.conv_past, d.conv_present, strict=True))
    return {"conv_names": names, "conv_shape": (int(first.shape[1]), width), "conv_dtype": first.dtype}


def _graph_windows(g: onnx.GraphProto) -> dict[str, tuple[int, int]]:
    """Past key name -> (local_window_size, sliding_window_cache) of each GroupQueryAttention node."""
    found: dict[str, tuple[int, int]] = {}
    for node in g.node:
        if node.op_type != "GroupQueryAttention" or len(node.input) < 4 or not node.input[3]:
            continue
        attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
        found[node.input[3]] = (int(attrs.get("local_window_size", -1)), int(attrs.get("sliding_window_cache", 0)))
    return found


def _check_declared_window(d: _Declared, windows: Mapping[str, tuple[int, int]]) -> None:
    """Warn (once per load) when genai_config's sliding_window disagrees with the graph's
    ``local_window_size`` attributes, which are what the attention op does and what is used."""
    if not d.sliding:
        return
    declared_w = d.sliding.get("window_size")
    declared_layers = d.sliding.get("layers") or []
    per = 1 if d.combined else 2
    kv_layers = d.kv_layers or tuple(range(len(d.past) // per))
    graph_layers = {}
    for slot, layer in enumerate(kv_layers):
        window = windows.get(d.past[per * slot], (-1, 0))[0]
        if window > 0:
            graph_layers[layer] = window
    problems = []
    if not declared_layers:
        problems.append("its layer list is empty")
    elif sorted(declared_layers) != sorted(graph_layers):
        problems.append(f"it lists layers {sorted(declared_layers)}, the graph windows layers {sorted(graph_layers)}")
    if graph_layers and any(w != declared_w for w in graph_layers.values()):
        shown = sorted(set(graph_layers.values()))
        problems.append(f"its window_size is {declared_w!r}, the graph's local_window_size {shown}")
    if not graph_layers and declared_w:
        problems.append("no GroupQueryAttention node of the graph has a local_window_size")
    if problems:
        warnings.warn(
            f"{d.cfg_path}: model.decoder.sliding_window disagrees with the graph ({'; '.join(problems)}); the engine "
            "uses the graph's local_window_size attributes (window-sized buffers only where sliding_window_cache=1)",
            stacklevel=4,
        )


# --------------------------------------------------------------------------------------------
# shared checks


def _finish_spec(declared: _Declared, graph: _Graph) -> ModelSpec:
    """Check what the config declares against the graph; detect the KV layout; build the spec."""
    d = declared
    model_path, cfg_path, past, combined = d.model_path, d.cfg_path, d.past, d.combined
    ids_name, mask_name, pos_name, logits_name = d.ids_name, d.mask_name, d.pos_name, d.logits_name
    kv_heads, head_size, vocab = d.kv_heads, d.head_size, d.vocab
    _check_names([ids_name], graph.inputs, "input", model_path)
    _check_names([logits_name], graph.outputs, "output", model_path)
    _check_declared_state(d, graph)
    _check_names(past, graph.inputs, "past KV input", model_path)
    _check_names(d.present, graph.outputs, "present KV output", model_path)

    ids = graph.inputs[ids_name]
    if ids.dtype not in (np.dtype(np.int64), np.dtype(np.int32)):
        raise UnsupportedModelError(f"{model_path}: input '{ids_name}' has dtype {ids.dtype}; int64 or int32 expected")
    mask = graph.inputs.get(mask_name)
    pos = graph.inputs.get(pos_name)
    logits = graph.outputs[logits_name]
    if logits.dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise UnsupportedModelError(f"{model_path}: output '{logits_name}' has dtype {logits.dtype}")

    kv_info = graph.inputs[past[0]]
    kv_dtype = kv_info.dtype
    if kv_dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise UnsupportedModelError(
            f"{model_path}: KV input '{past[0]}' has dtype {kv_dtype}; float32/float16 expected"
        )
    rank = 5 if combined else 4
    if len(kv_info.shape) != rank:
        raise UnsupportedModelError(
            f"{model_path}: KV input '{past[0]}' has rank {len(kv_info.shape)} {kv_info.shape}; "
            f"rank {rank} expected for this layout"
        )
    head_axis = 2 if combined else 1
    g_heads, g_size = _static_dim(kv_info, head_axis), _static_dim(kv_info, rank - 1)
    if g_heads is not None and g_heads != kv_heads:
        raise _err(cfg_path, f"num_key_value_heads is {kv_heads} but the graph's '{past[0]}' has {g_heads} heads")
    if g_size is not None and g_size != head_size:
        raise _err(cfg_path, f"head_size is {head_size} but the graph's '{past[0]}' has head size {g_size}")

    g_vocab = _static_dim(logits, 2)
    if vocab is None:
        vocab = g_vocab
    elif g_vocab is not None and g_vocab != vocab:
        raise _err(cfg_path, f"vocab_size is {vocab} but the graph's '{logits_name}' has {g_vocab} columns")
    if vocab is None or vocab <= 0:
        raise _err(cfg_path, "vocab_size is missing and the graph's logits have no static vocabulary dimension")

    if "GroupQueryAttention" in graph.op_types and not combined:
        layout = KVLayout.GQA_SHARED
        if mask is None:
            raise UnsupportedModelError(f"{model_path}: a GroupQueryAttention model without an attention_mask input")
    elif combined:
        layout = KVLayout.COMBINED
    else:
        layout = KVLayout.CONCAT

    known = {ids_name, mask_name, pos_name, *past, *d.conv_past}
    extra = tuple(info for n, info in graph.inputs.items() if n not in known)
    for info in extra:
        if info.name != "use_cache_branch":
            raise UnsupportedModelError(
                f"{model_path}: graph input '{info.name}' {info.shape} is not one the engine knows how to feed "
                "(input_ids, attention_mask, position_ids, past KV, use_cache_branch)"
            )
    for tid in (d.bos, d.pad, *d.eos):
        if tid is not None and not 0 <= tid < vocab:
            raise _err(cfg_path, f"special token id {tid} is outside the vocabulary [0, {vocab})")

    return ModelSpec(
        model_dir=d.model_dir,
        model_path=model_path,
        model_type=d.model_type,
        layout=layout,
        num_layers=d.n_layers,
        num_heads=d.n_heads,
        num_kv_heads=kv_heads,
        head_size=head_size,
        hidden_size=d.hidden,
        vocab_size=int(vocab),
        context_length=int(d.context),
        bos_token_id=d.bos,
        eos_token_ids=d.eos,
        pad_token_id=d.pad,
        kv_dtype=kv_dtype,
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        logits=logits,
        past_names=tuple(past),
        present_names=tuple(d.present),
        extra_inputs=extra,
        search=dict(d.search),
        session_options=dict(d.session_options),
        has_genai_config=d.has_genai,
        has_external_data=graph.external,
        weight_bytes=graph.weight_bytes,
        step_read_bytes=graph.step_read_bytes,
        rope_switch_length=graph.rope_switch_length if layout is KVLayout.GQA_SHARED else None,
        **_state_fields(d, graph, layout),
        rope_cache_rows=graph.rope_cache_rows if layout is KVLayout.GQA_SHARED else None,
        coarse_activations=graph.coarse_activations,
        graph=_GraphSlot(graph.proto),
    )


def load_model_spec(model_dir: str | Path) -> ModelSpec:
    """Read a model folder (genai format or plain Optimum export) into a checked :class:`ModelSpec`.

    Raises :class:`~engine.errors.ModelFileNotFoundError` when the folder or a file it needs is
    missing, :class:`~engine.errors.ModelLoadError` when a file is corrupted or the config
    contradicts the graph, and :class:`~engine.errors.UnsupportedModelError` for layouts the
    engine does not handle.
    """
    if not isinstance(model_dir, (str, os.PathLike)):
        raise InvalidRequestError(f"model_dir must be a path (str or pathlib.Path), got {type(model_dir).__name__}")
    try:
        path = Path(model_dir).expanduser()
    except RuntimeError as e:  # "~no_such_user/..."
        raise ModelFileNotFoundError(f"model folder {model_dir}: {e}") from e
    kind = entry_kind(path)
    if kind is None:
        raise ModelFileNotFoundError(f"model folder {path} does not exist")
    if kind != "dir":
        raise ModelFileNotFoundError(f"{path} is not a folder: pass the model folder, not a file inside it")
    try:
        os.listdir(path)
    except OSError as e:
        raise _err(path, f"the model folder cannot be read ({e.strerror or e})") from e
    # A genai_config.json of any kind (a link loop, a FIFO, a folder) makes this a genai folder, so
    # a broken one is reported rather than the folder silently read as an Optimum export.
    if os.path.lexists(path / GENAI_CONFIG):
        return _spec_from_genai(path)
    return _spec_from_optimum(path)
