"""All folds of a model as one ONNX graph: one input, each fold's output in fold order.

OpenVINO keeps the working memory of a compiled model for the life of its session, so one session per
fold holds every fold's memory at once (peak 3.9 GiB for the SHIVA-sized 3-fold stand-in in fp32, against
TensorFlow's 2.7). One graph holding every fold is planned as a whole: OpenVINO runs the folds one after
another in one memory plan (peak 1.7 GiB, as fast; docs/performance.md). A model's int8 folds are joined
the same way (:mod:`quantize`). Each fold's nodes, tensors and initializers keep their names behind a ``fold<k>/``
prefix; the shared input keeps fold 0's input name. :func:`boxed_graph`, what OpenVINO runs in fp32 and bf16, also
rewrites what OpenVINO runs slowly (:mod:`upsampling`, :mod:`concatsplit`).
"""

from __future__ import annotations

from typing import Any, List, Optional

from ..errors import ModelError, one_line
from .concatsplit import split_concat_convs
from .models import Fold, ModelDescriptor
from .upsampling import resize_upsamplings


def graph_inputs(proto: Any) -> List[Any]:
    """The inputs a caller feeds (initializers listed as inputs, as old IR versions do, left out)."""
    weights = {init.name for init in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in weights]


def fold_graph(fold: Fold) -> Any:
    """A fold's ``onnx.ModelProto``; ModelError naming the file when it is not one."""
    import onnx

    try:
        return onnx.load(str(fold.path))
    except Exception as err:  # noqa: BLE001 - protobuf's decode errors have no common base worth naming
        raise ModelError(f"{fold.path}: onnxruntime cannot load this model: not an ONNX graph ({one_line(err)})"
                         ) from None


def ensemble_graph(model: ModelDescriptor) -> Optional[Any]:
    """One ``onnx.ModelProto`` computing every fold of ``model`` (a single fold: that fold's graph); None when the
    folds cannot share a graph (different inputs, opsets or IR versions), which then run one session each."""
    return merged([fold_graph(fold) for fold in model.folds], model.name)


def merged(protos: List[Any], name: str) -> Optional[Any]:
    """The graphs ``protos`` as one (see :func:`ensemble_graph`); None when they cannot share one."""
    import onnx
    from onnx import compose, helper

    first = protos[0]
    if len(protos) == 1:
        return first
    opsets = {(o.domain, o.version) for o in first.opset_import}
    for proto in protos:
        inputs = graph_inputs(proto)
        if (len(inputs) != 1 or inputs[0].type != graph_inputs(first)[0].type or proto.ir_version != first.ir_version
                or {(o.domain, o.version) for o in proto.opset_import} != opsets):
            return None
    shared = onnx.ValueInfoProto()
    shared.CopyFrom(graph_inputs(first)[0])
    nodes, initializers, outputs, value_info, functions = [], [], [], [], []
    for index, proto in enumerate(protos):
        prefixed = compose.add_prefix(proto, f"fold{index}/")
        graph = prefixed.graph
        nodes.append(helper.make_node("Identity", [shared.name], [graph_inputs(prefixed)[0].name],
                                      name=f"fold{index}/shared_input"))
        nodes += graph.node
        initializers += graph.initializer
        value_info += graph.value_info
        outputs.append(graph.output[0])
        functions += prefixed.functions
    graph = helper.make_graph(nodes, f"{name} folds", [shared], outputs, initializers, value_info=value_info)
    ensemble = helper.make_model(graph, opset_imports=first.opset_import, functions=functions,
                                 producer_name="shivacmb ensemble graph")
    ensemble.ir_version = first.ir_version
    return ensemble


def boxed(proto: Any, model: ModelDescriptor) -> Any:
    """``proto`` with its input fixed to the model box (batch of one, one channel, the descriptor's layout):
    OpenVINO compiles static shapes once, and its int8 kernels run only on them (3x slower on a dynamic one).
    Other ranks, and fixed sizes other than the box's, are left for FoldEnsemble to refuse."""
    box = [1, *model.shape, 1] if model.layout == "NDHWC" else [1, 1, *model.shape]
    dims = graph_inputs(proto)[0].type.tensor_type.shape.dim
    if len(dims) == len(box):
        for dim, size in zip(dims, box):
            if not dim.dim_value:
                dim.dim_value = size
    return proto


def boxed_graph(model: ModelDescriptor, fp32: bool = True) -> Optional[Any]:
    """:func:`ensemble_graph` with its input fixed to the model box, rewritten for OpenVINO: converted Keras
    upsamplings as single ``Resize`` nodes (:mod:`upsampling`, same numbers) and, for ``fp32`` (bf16 keeps the graph
    its `models verify --precision` check ran), convolutions of concatenations as sums of convolutions
    (:mod:`concatsplit`, same numbers but for float rounding); None where the folds cannot share a graph."""
    graph = ensemble_graph(model)
    if graph is None:
        return None
    resize_upsamplings(boxed(graph, model))
    if fp32:
        split_concat_convs(graph)
    return graph
