"""Convolutions of a channel Concat as sums of convolutions (modelstore.concatsplit): tiny graphs built here."""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from SHIVACMBLib.modelstore.blobmodel import dark_blob_graph
from SHIVACMBLib.modelstore.concatsplit import split_concat_convs
from SHIVACMBLib.modelstore.ensemblegraph import boxed_graph
from SHIVACMBLib.modelstore.models import read_descriptor
from SHIVACMBLib.resources import bundled_models_dir

SPATIAL = [6, 5, 4]


def decoder_step(axis: int = 1, other_reader: Optional[str] = None, group: int = 1, concat_out: bool = False,
                 inputs: int = 2) -> onnx.ModelProto:
    """Concat of ``inputs`` NCDHW tensors (3, 2, 4 channels) read by a 3x3x3 Conv with bias and a 1x1 Conv without,
    the two added, as in a residual U-Net decoder block; ``other_reader``: an op type that reads the Concat too."""
    rng = np.random.default_rng(0)
    names, counts = ["up", "skip", "more"][:inputs], [3, 2, 4][:inputs]
    channels = sum(counts) if axis == 1 else 3
    initializers = [numpy_helper.from_array(rng.standard_normal((6, channels // group, 3, 3, 3)).astype(np.float32),
                                            "w3"),
                    numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b3"),
                    numpy_helper.from_array(rng.standard_normal((6, channels // group, 1, 1, 1)).astype(np.float32),
                                            "w1")]
    nodes = [helper.make_node("Concat", names, ["cat"], axis=axis),
             helper.make_node("Conv", ["cat", "w3", "b3"], ["c3"], pads=[1] * 6, group=group),
             helper.make_node("Conv", ["cat", "w1"], ["c1"], group=group),
             helper.make_node("Add", ["c3", "c1"], ["out"])]
    shapes = [[1, c if axis == 1 else 3, *SPATIAL] for c in counts]
    joined = [1, channels, *SPATIAL] if axis == 1 else [1, 3, SPATIAL[0] * inputs, *SPATIAL[1:]]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 6, *joined[2:]])]
    if other_reader:
        nodes.append(helper.make_node(other_reader, ["cat"], ["other"]))
        outputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, joined))
    if concat_out:
        outputs.append(helper.make_tensor_value_info("cat", TensorProto.FLOAT, joined))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                                           for n, s in zip(names, shapes)], outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnx writes its newest, which onnxruntime-openvino 1.24 does not load
    return model


def run(model: onnx.ModelProto) -> List[np.ndarray]:
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    return session.run(None, {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()})


def rewritten(model: onnx.ModelProto):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return split_concat_convs(copy), copy


@pytest.mark.parametrize("inputs", [2, 3])
def test_concat_read_by_convolutions_becomes_sums_of_convolutions(inputs):
    model = decoder_step(inputs=inputs)
    count, new = rewritten(model)
    ops = [n.op_type for n in new.graph.node]
    assert count == 1 and "Concat" not in ops
    assert ops.count("Conv") == 2 * inputs and ops.count("Add") == 1 + 2 * (inputs - 1)
    assert sorted(i.name for i in new.graph.initializer) == sorted(  # the whole kernels replaced by their parts
        [f"{conv}/part{k}/W" for conv in ("c3", "c1") for k in range(inputs)] + ["b3"])
    expected, got = run(model)[0], run(new)[0]
    assert np.abs(expected - got).max() <= 1e-5 * np.abs(expected).max()  # the same sums, in another order


@pytest.mark.parametrize("kwargs", [dict(axis=2), dict(other_reader="Relu"), dict(group=3, inputs=3),
                                    dict(concat_out=True)])
def test_concats_that_are_not_only_convolved_over_channels_pass_untouched(kwargs):
    model = decoder_step(**kwargs)
    before = model.SerializeToString()
    count, new = rewritten(model)
    assert count == 0 and new.SerializeToString() == before


def test_a_graph_without_concat_passes_untouched():
    model = dark_blob_graph(layout="NCDHW", spatial=(8, 8, 8))
    before = model.SerializeToString()
    assert split_concat_convs(model) == 0 and model.SerializeToString() == before


def test_the_default_models_openvino_graph_is_split_in_fp32_only():
    model = read_descriptor(bundled_models_dir() / "shivacmb-demo-swi")

    def convolved_concats(graph):
        readers = {name: n.op_type for n in graph.graph.node for name in n.input}
        return [n for n in graph.graph.node if n.op_type == "Concat" and readers.get(n.output[0]) == "Conv"]

    assert not convolved_concats(boxed_graph(model))
    assert len(convolved_concats(boxed_graph(model, fp32=False))) == 3  # bf16 runs the graph its check ran
