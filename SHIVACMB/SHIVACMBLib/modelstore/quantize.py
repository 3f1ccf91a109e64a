"""int8 copies of models: onnxruntime's post-training static quantization, calibrated on phantom boxes.

The copy is made from the model's ensemble graph shaped to the model box (every fold in one graph,
:mod:`ensemblegraph`; OpenVINO's int8 kernels need static shapes) in the QDQ format:
QuantizeLinear/DequantizeLinear pairs around each quantized operator, which OpenVINO turns into int8
kernels (VNNI and AMX units) and onnxruntime's own kernels run too. Activations are uint8 with ranges
from the calibration boxes (MinMax: the histogram methods hold every activation of every box in
memory, over 20 GiB for the default model), weights int8 per output channel, as onnxruntime
recommends for CPUs with VNNI. Each fold's head (its last convolution and what follows it: logits,
activation) stays fp32, where rounding would move probabilities most. The calibration boxes are
phantom scans with CMBs taken through `segment`'s preprocessing (seeds from :data:`CALIBRATION_SEED`,
used for nothing else; ranges from scans without CMBs cut off the network's confident responses). A
copy is used only once `shivacmb models verify --precision int8` has shown that it finds what fp32
finds (:mod:`precisions`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from ..errors import ModelError, one_line
from ..files import atomic_path
from .ensemblegraph import boxed_graph, graph_inputs
from .models import ModelDescriptor

CALIBRATION_SEED = 880000  # phantoms for calibration only: never for training, model choice or checks
CALIBRATION_PHANTOMS = 4
CALIBRATION_CMBS = 12  # CMBs per calibration phantom: the ranges must include confident detections
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # where a fold's head begins, walking back from its output
Say = Callable[[str], None]


def calibration_boxes(model: ModelDescriptor, n: int = CALIBRATION_PHANTOMS) -> Iterator[np.ndarray]:
    """The normalised model boxes of ``n`` calibration phantoms, one at a time."""
    from .parity import parity_input, phantom_scans

    for scan in phantom_scans(CALIBRATION_SEED, n, CALIBRATION_CMBS):
        yield parity_input(model, scan)


def quantize_int8(model: ModelDescriptor, out: Path, boxes: Sequence[np.ndarray], say: Say = print) -> None:
    """Write the int8 copy of ``model`` (all folds in one graph) to ``out``, calibrated on ``boxes``."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from ..inference import model_layout

    graph = boxed_graph(model)
    if graph is None:
        raise ModelError(f"{model.path}: the folds of '{model.name}' differ in their inputs or ONNX versions; "
                         "int8 needs them in one graph")
    name = graph_inputs(graph)[0].name

    class Boxes(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(boxes)

        def get_next(self) -> Optional[Dict[str, Any]]:
            box = next(self.feeds, None)
            return None if box is None else {name: model_layout(box, model.layout)}

    out.parent.mkdir(parents=True, exist_ok=True)
    say(f"int8: quantizing '{model.name}' ({len(model.folds)} fold(s) in one graph), calibrated on "
        f"{len(boxes)} phantom box(es)")
    with tempfile.TemporaryDirectory(prefix="shivacmb-int8-") as tmp, atomic_path(out) as staged:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(graph, prepared)  # shapes inferred, batch norms folded
            quantize_static(prepared, staged, Boxes(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=_named_heads(prepared))
        except Exception as err:  # noqa: BLE001 - whatever the quantizer stumbles on, name the model
            raise ModelError(f"{model.path}: onnxruntime could not quantize '{model.name}' to int8: "
                             f"{one_line(err)}") from None


def _named_heads(path: Path) -> List[str]:
    """Names every node of the graph in ``path`` (nodes_to_exclude matches names; saved back) and returns those of
    each output's head: walking back from the output, every node up to and including the first weighted one."""
    import onnx

    proto = onnx.load(str(path))
    for index, node in enumerate(proto.graph.node):
        node.name = node.name or f"{node.op_type}_{index}"
    onnx.save(proto, str(path))
    producers = {out: node for node in proto.graph.node for out in node.output}
    heads: List[str] = []
    pending = [o.name for o in proto.graph.output]
    while pending:
        node = producers.get(pending.pop())
        if node is None or node.name in heads:
            continue
        heads.append(node.name)
        if node.op_type not in WEIGHTED:
            pending += list(node.input)
    return heads
