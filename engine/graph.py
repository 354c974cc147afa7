"""Load-time graph edits.

:func:`slice_logits_to_last_token` inserts a ``Slice`` that keeps only the last position of the
hidden states right before the LM head, so the graph's ``logits`` output is
``(batch, 1, vocab)`` for the prompt too. Generation only ever needs the last position, and on a
Phi-4-sized vocabulary (200,064 x 3072) the LM head over a 512-token prompt alone is ~630 GFLOP
and a 400 MB logits tensor. Each row of a MatMul is independent, so the last row is unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .config import ModelSpec

# ops allowed between the LM head MatMul and the logits output (element-wise, position-wise)
_PASS_THROUGH = {"Cast", "Add", "Mul", "Div", "Tanh", "Identity", "Sub"}
_LM_HEAD_OPS = {"MatMul", "MatMulNBits", "MatMulInteger", "FusedMatMul"}


def _find_lm_head(graph: onnx.GraphProto, logits_name: str) -> onnx.NodeProto | None:
    producer = {out: node for node in graph.node for out in node.output}
    inits = {t.name for t in graph.initializer}
    node = producer.get(logits_name)
    for _ in range(8):
        if node is None:
            return None
        if node.op_type in _LM_HEAD_OPS:
            return node
        if node.op_type not in _PASS_THROUGH:
            return None
        # follow the one non-constant input
        dynamic = [i for i in node.input if i and i not in inits and i in producer]
        if len(dynamic) != 1:
            return None
        node = producer[dynamic[0]]
    return None


def slice_logits_to_last(model: onnx.ModelProto, logits_name: str, width: int = 1) -> bool:
    """Edit ``model`` in place so ``logits_name`` covers only the last ``width`` positions (all of
    them when fewer): one for decoding, ``K + 1`` for a speculative verify pass, while a long
    prompt's LM head still runs on a few rows only. Returns False when the LM head cannot be
    recognised (the model is then left unchanged)."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    graph = model.graph
    head = _find_lm_head(graph, logits_name)
    if head is None:
        return False
    tag = "engine_last_token" if width == 1 else "engine_last_positions"
    hidden = head.input[0]
    sliced = f"{hidden}/{tag}"
    starts = numpy_helper.from_array(np.array([-width], dtype=np.int64), f"{tag}_starts")
    ends = numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), f"{tag}_ends")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), f"{tag}_axes")
    graph.initializer.extend([starts, ends, axes])
    node = helper.make_node("Slice", [hidden, starts.name, ends.name, axes.name], [sliced], name=f"{tag}_slice")
    head.input[0] = sliced
    # insert right before the head so the node list stays topologically sorted
    index = next(i for i, n in enumerate(graph.node) if list(n.output) == list(head.output))
    graph.node.insert(index, node)
    for out in graph.output:
        if out.name == logits_name and len(out.type.tensor_type.shape.dim) == 3:
            dim = out.type.tensor_type.shape.dim[1]
            dim.Clear()
            if width == 1:
                dim.dim_value = 1
            else:
                dim.dim_param = "engine_positions"
    # drop stale inferred shapes of tensors downstream of the head
    keep = [vi for vi in graph.value_info if vi.name != hidden]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    return True


def slice_logits_to_last_token(model: onnx.ModelProto, logits_name: str) -> bool:
    """:func:`slice_logits_to_last` of one position: the logits a decode step needs."""
    return slice_logits_to_last(model, logits_name, 1)


def load_for_generation(spec: ModelSpec, last_token_logits: bool) -> tuple[bytes | str, bool]:
    """The model to hand to InferenceSession, and whether its graph was edited: serialized bytes of
    the edited graph (external weights stay where they are), or the path itself when no edit applies.

    The graph is the one :func:`~engine.config.load_model_spec` parsed (taken from the spec, which
    then no longer holds it); it is read from ``spec.model_path`` again only if already taken.
    """
    model = spec.take_graph()
    path = str(spec.model_path)
    if not last_token_logits:
        return path, False
    if model is None:
        model = onnx.load(path, load_external_data=False)
    if model.ByteSize() > 1_800_000_000:  # protobuf's 2 GB cap: leave big embedded-weight models alone
        return path, False
    if not slice_logits_to_last_token(model, spec.logits.name):
        return path, False
    return model.SerializeToString(), True
