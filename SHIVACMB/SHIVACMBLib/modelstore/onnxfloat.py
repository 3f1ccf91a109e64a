"""Change the float precision of an ONNX graph: fp16 -> fp32 after conversion, fp32 -> fp16 for GPUs.

A mixed_float16 Keras model converts to a graph that casts its fp32 weights to fp16 and computes
in fp16; onnxruntime's CPU kernels are faster and exact in fp32, so the converter widens every
fp16 tensor to fp32 (:func:`to_float32`). For GPUs, ``--precision fp16`` narrows an fp32 graph to
fp16 inside, keeping fp32 inputs and outputs (:func:`to_float16`). Only element types change;
integer (shape) tensors, and the inputs that ONNX requires in fp32 (Resize scales), are left alone.
"""

from __future__ import annotations

from typing import Set, Tuple

import numpy as np

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto element types
# (op type, input index) that must stay fp32 whatever the graph computes in
FP32_ONLY_INPUTS: Set[Tuple[str, int]] = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def to_float32(model):
    """Every fp16 tensor, initializer, constant and cast of ``model`` (onnx.ModelProto) made fp32."""
    return _retype(model, FLOAT16, FLOAT)


def to_float16(model):
    """``model`` computing in fp16, with its fp32 inputs and outputs kept (casts at the boundary)."""
    import onnx
    from onnx import helper

    model = _retype(model, FLOAT, FLOAT16, keep_io=True)
    graph = model.graph
    casts = []
    for value in graph.input:
        if value.type.tensor_type.elem_type == FLOAT:
            inner = f"{value.name}__fp16"
            _rename_uses(graph, value.name, inner)
            casts.append(helper.make_node("Cast", [value.name], [inner], to=FLOAT16))
    for value in graph.output:
        if value.type.tensor_type.elem_type == FLOAT:
            inner = f"{value.name}__fp16"
            for node in graph.node:
                node.output[:] = [inner if o == value.name else o for o in node.output]
            _rename_uses(graph, value.name, inner)
            graph.node.append(helper.make_node("Cast", [inner], [value.name], to=FLOAT))
    for cast in reversed(casts):
        graph.node.insert(0, cast)
    onnx.checker.check_model(model)
    return model


def _rename_uses(graph, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]


def _retype(model, source: int, target: int, keep_io: bool = False):
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())  # never change the caller's graph
    graph = model.graph
    dtype = np.float16 if target == FLOAT16 else np.float32
    pinned = {node.input[i] for node in graph.node for (op, i) in FP32_ONLY_INPUTS
              if node.op_type == op and len(node.input) > i}
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == source and tensor.name not in pinned:
            graph.initializer[index].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(dtype),
                                                                      tensor.name))
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == source:
                attribute.i = target
            elif attribute.name == "value" and attribute.t.data_type == source \
                    and not set(node.output) & pinned:
                attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(dtype),
                                                             attribute.t.name))
    values = list(graph.value_info) + ([] if keep_io else list(graph.input) + list(graph.output))
    for value in values:
        if value.type.tensor_type.elem_type == source:
            value.type.tensor_type.elem_type = target
    return model
