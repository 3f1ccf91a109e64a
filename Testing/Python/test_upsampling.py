"""Converted Keras upsamplings as one Resize (modelstore.upsampling): tiny graphs built here, run by onnxruntime."""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from SHIVACMBLib.modelstore.blobmodel import dark_blob_graph
from SHIVACMBLib.modelstore.upsampling import resize_upsamplings

SHAPE = (1, 3, 4, 5, 6)  # NCDHW: channels 3, D 4, H 5, W 6


class Graph:
    """A graph under construction: nodes and constant initializers with generated names."""

    def __init__(self) -> None:
        self.nodes: List[onnx.NodeProto] = []
        self.constants: List[onnx.TensorProto] = []

    def const(self, values: Sequence[int]) -> str:
        name = f"c{len(self.constants)}"
        self.constants.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], **attributes) -> str:
        out = f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"n{len(self.nodes)}", **attributes))
        return out

    def repeat(self, x: str, axis: int, shape: Sequence[int], copies: int = 2, perm=None, computed=False) -> str:
        """What tf2onnx makes of a Keras ``Repeat``: Unsqueeze, Tile, (Transpose,) Reshape; ``computed``: the
        Reshape target computed from the input's Shape, as in a converted SavedModel."""
        start = x
        x = self.op("Unsqueeze", [x, self.const([axis])])
        reps = [1] * (len(shape) + 1)
        reps[axis] = copies
        x = self.op("Tile", [x, self.const(reps)])
        if perm:
            x = self.op("Transpose", [x], perm=perm)
        if not computed:
            return self.op("Reshape", [x, self.const(shape)])
        order = [p if p < axis else p - 1 for p in perm if p != axis] if perm else list(range(len(shape)))
        factors = [copies if p == axis - 1 else 1 for p in order]
        target = self.op("Mul", [self.op("Gather", [self.op("Shape", [start]), self.const(order)]),
                                 self.const(factors)])
        return self.op("Reshape", [x, target])

    def model(self, output: str, out_shape: Sequence[int], opset: int = 17, skip: bool = False) -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)]
        if skip:
            inputs.append(helper.make_tensor_value_info("skip", TensorProto.FLOAT, [1, 2, *out_shape[2:]]))
            output = self.op("Concat", [output, "skip"], axis=1)
            out_shape = [1, out_shape[1] + 2, *out_shape[2:]]
        graph = helper.make_graph(self.nodes, "g", inputs, [helper.make_tensor_value_info(
            output, TensorProto.FLOAT, out_shape)], self.constants)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8  # onnx writes its newest, which onnxruntime-openvino 1.24 does not load
        return model


def keras_upsampling(crop: bool = True, back_to_ncdhw: bool = True, computed: bool = False) -> onnx.ModelProto:
    """Relu, then UpSampling3D(2) (each Repeat as tf2onnx writes it, the first from NCDHW to NDHWC), Cropping3D of
    the last H row, back to NCDHW and concatenated with a skip input, as in the converted SHIVA U-Net."""
    g = Graph()
    x = g.op("Relu", ["x"])
    x = g.repeat(x, 3, [1, 8, 5, 6, 3], perm=[0, 2, 3, 4, 5, 1], computed=computed)
    x = g.repeat(x, 3, [1, 8, 10, 6, 3], computed=computed)
    x = g.repeat(x, 4, [1, 8, 10, 12, 3], computed=computed)
    h = 10
    if crop:
        x = g.op("Slice", [x, g.const([0] * 5), g.const([2**31 - 1, 2**31 - 1, -1, 2**31 - 1, 2**31 - 1]),
                           g.const(range(5))])
        h = 9
    if back_to_ncdhw:
        x = g.op("Transpose", [x], perm=[0, 4, 1, 2, 3])
        return g.model(x, [1, 3, 8, h, 12], skip=True)
    return g.model(x, [1, 8, h, 12, 3])


def run(model: onnx.ModelProto, seed: int = 0) -> np.ndarray:
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feed = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()}
    return session.run(None, feed)[0]


def rewritten(model: onnx.ModelProto):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return resize_upsamplings(copy), copy


def op_types(model: onnx.ModelProto) -> List[str]:
    return [n.op_type for n in model.graph.node]


def test_keras_upsampling_with_crop_becomes_resize_and_slice():
    model = keras_upsampling()
    count, new = rewritten(model)
    assert count == 1
    assert op_types(new) == ["Relu", "Resize", "Slice", "Concat"]  # no transposes back and forth
    assert np.abs(run(new) - run(model)).max() <= 1e-6
    assert {i.name for i in new.graph.initializer} == {n.input[-1] for n in new.graph.node if n.op_type == "Resize"} \
        | {name for n in new.graph.node if n.op_type == "Slice" for name in n.input[1:]}  # unused constants gone


def test_upsampling_left_channels_last_keeps_one_transpose():
    model = keras_upsampling(crop=False, back_to_ncdhw=False)
    count, new = rewritten(model)
    assert count == 1 and op_types(new) == ["Relu", "Resize", "Transpose"]
    assert np.abs(run(new) - run(model)).max() <= 1e-6


def test_reshape_targets_computed_from_shapes_are_followed():
    model = keras_upsampling(computed=True)
    assert "Shape" in op_types(model)
    count, new = rewritten(model)
    assert count == 1 and op_types(new) == ["Relu", "Resize", "Slice", "Concat"]  # the shape arithmetic gone too
    assert np.abs(run(new) - run(model)).max() <= 1e-6


def test_a_tensor_inside_the_chain_used_elsewhere_stays_computed():
    model = keras_upsampling()
    inner = next(n for n in model.graph.node if n.op_type == "Reshape").output[0]  # D repeated, channels last
    model.graph.output.append(helper.make_tensor_value_info(inner, TensorProto.FLOAT, [1, 8, 5, 6, 3]))
    count, new = rewritten(model)
    assert count == 1 and "Resize" in op_types(new) and inner in {o for n in new.graph.node for o in n.output}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: np.random.default_rng(1).standard_normal(i.shape).astype(np.float32)
            for i in session.get_inputs()}
    expected = session.run(None, feed)
    got = ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    assert all(np.abs(a - b).max() <= 1e-6 for a, b in zip(expected, got))


def whole_tile() -> onnx.ModelProto:
    """Tile of a data dimension: copies of the whole volume along D, not of each slice."""
    g = Graph()
    return g.model(g.op("Tile", [g.op("Relu", ["x"]), g.const([1, 1, 2, 1, 1])]), [1, 3, 8, 5, 6])


def copies_before_data() -> onnx.ModelProto:
    """Unsqueeze in front of D, then Tile and Reshape: D's slices repeated as blocks (0 1 2 3 0 1 2 3)."""
    g = Graph()
    return g.model(g.repeat(g.op("Relu", ["x"]), 2, [1, 3, 8, 5, 6]), [1, 3, 8, 5, 6])


def computed_repeats() -> onnx.ModelProto:
    """Tile whose repeats are computed in the graph, not constant."""
    g = Graph()
    x = g.op("Unsqueeze", [g.op("Relu", ["x"]), g.const([3])])
    reps = g.op("Add", [g.const([1, 1, 1, 1, 1, 1]), g.const([0, 0, 0, 1, 0, 0])])
    return g.model(g.op("Reshape", [g.op("Tile", [x, reps]), g.const([1, 3, 8, 5, 6])]), [1, 3, 8, 5, 6])


def old_opset() -> onnx.ModelProto:
    """The Keras pattern in an opset before Resize took an empty roi (Unsqueeze axes as an attribute)."""
    g = Graph()
    x = g.op("Unsqueeze", [g.op("Relu", ["x"])], axes=[3])
    x = g.op("Reshape", [g.op("Tile", [x, g.const([1, 1, 1, 2, 1, 1])]), g.const([1, 3, 8, 5, 6])])
    return g.model(x, [1, 3, 8, 5, 6], opset=11)


@pytest.mark.parametrize("build", [whole_tile, copies_before_data, computed_repeats, old_opset,
                                   lambda: dark_blob_graph(layout="NDHWC", spatial=(8, 8, 8))])
def test_graphs_that_are_not_element_wise_upsampling_pass_untouched(build):
    model = build()
    before = model.SerializeToString()
    count, new = rewritten(model)
    assert count == 0 and new.SerializeToString() == before
