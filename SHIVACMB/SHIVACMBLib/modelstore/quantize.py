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
import onnx

from ..errors import ModelError, one_line
from ..files import atomic_path
from .ensemblegraph import boxed, fold_graph, merged
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
    """Write the int8 copy of ``model`` (all folds in one graph) to ``out``, calibrated on ``boxes``.

    onnxruntime's own steps (``quant_pre_process``, ``create_calibrator``, ``QDQQuantizer``: what ``quantize_static``
    runs), fold by fold, then joined. One change: the calibration session runs without a memory arena, in
    priority-based order. With ``quantize_static``'s default session the activations of a whole fold stay live
    (6.5 GiB for a fold of the SHIVA-sized stand-in and one box, over 10 GiB with four: killed for memory on a
    24 GiB machine); so it needs 2.2 GiB."""
    from onnxruntime.quantization import QDQQuantizer, QuantType
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer, update_opset_version
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folds = [boxed(fold_graph(fold), model) for fold in model.folds]
    if merged(folds, model.name) is None:
        raise ModelError(f"{model.path}: the folds of '{model.name}' differ in their inputs or ONNX versions; "
                         "int8 needs them in one graph")
    say(f"int8: quantizing '{model.name}' ({len(folds)} fold(s), one graph), calibrated on {len(boxes)} phantom "
        f"box(es)")
    quantized = []
    with tempfile.TemporaryDirectory(prefix="shivacmb-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        for fold in folds:
            try:
                quant_pre_process(fold, prepared)  # shapes inferred, batch norms folded
                ranges = _calibrated_ranges(prepared, model, boxes, Path(tmp))
                graph = update_opset_version(load_model_with_shape_infer(prepared), QuantType.QInt8)
                quantizer = QDQQuantizer(graph, True, False, QuantType.QInt8, QuantType.QUInt8, ranges, [],
                                         _named_heads(graph), sorted(set(QLinearOpsRegistry) | set(QDQRegistry)), {})
                quantizer.quantize_model()
            except Exception as err:  # noqa: BLE001 - whatever the quantizer stumbles on, name the model
                raise ModelError(f"{model.path}: onnxruntime could not quantize '{model.name}' to int8: "
                                 f"{one_line(err)}") from None
            quantized.append(quantizer.model.model)
    graph = merged(quantized, model.name)
    if graph is None:
        raise ModelError(f"{model.path}: the int8 folds of '{model.name}' cannot share one graph")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as staged:
        onnx.save(graph, str(staged))


def _calibrated_ranges(prepared: Path, model: ModelDescriptor, boxes: Sequence[np.ndarray], tmp: Path) -> Any:
    """Each tensor's range over ``boxes`` (MinMax), by onnxruntime's calibrator in a memory-lean session."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    from ..inference import model_layout

    calibrator = create_calibrator(prepared, augmented_model_path=str(tmp / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as the calibrator's own
    options.enable_cpu_mem_arena = False
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.log_severity_level = 3
    calibrator.infer_session = ort.InferenceSession(str(tmp / "augmented.onnx"), sess_options=options,
                                                    providers=["CPUExecutionProvider"])
    name = calibrator.infer_session.get_inputs()[0].name

    class Boxes(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(boxes)

        def get_next(self) -> Optional[Dict[str, Any]]:
            box = next(self.feeds, None)
            return None if box is None else {name: model_layout(box, model.layout)}

    calibrator.collect_data(Boxes())
    return calibrator.compute_data()


def _named_heads(graph: Any) -> List[str]:
    """Names every unnamed node of ``graph`` (nodes_to_exclude matches names) and returns those of each output's
    head: walking back from the output, every node up to and including the first weighted one."""
    for index, node in enumerate(graph.graph.node):
        node.name = node.name or f"{node.op_type}_{index}"
    producers = {out: node for node in graph.graph.node for out in node.output}
    heads: List[str] = []
    pending = [o.name for o in graph.graph.output]
    while pending:
        node = producers.get(pending.pop())
        if node is None or node.name in heads:
            continue
        heads.append(node.name)
        if node.op_type not in WEIGHTED:
            pending += list(node.input)
    return heads
