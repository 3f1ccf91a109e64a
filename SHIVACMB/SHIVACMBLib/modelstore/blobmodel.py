"""Tiny fixed-weight ONNX "dark blob detectors", built in code for tests, the demo and the Slicer self-test.

Needs the ``onnx`` package (the ``test`` extra), imported only here. The detector is not trained: it compares a small local mean (3 mm box) with a larger one
(11 mm box) of the normalised image and turns "darker than the surroundings" into a
probability, gated so that dark background (outside the head) gives nothing. It finds
dark spheres of 1.5-4 mm radius in the phantoms of ``phantoms.py``.

Variants exercise every descriptor option: layout NDHWC/NCDHW, activation none/sigmoid/
softmax, one or several folds, fixed or dynamic spatial axes.

    python -m SHIVACMBLib.modelstore.blobmodel OUT_FOLDER

writes the test model shipped in Testing/models/dark-blob-detector.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..files import checksum

OPSET = 17
BIG = 11  # voxels (mm on the 1 mm model grid)
SMALL = 3


def _box_kernel(shape: Sequence[int]) -> np.ndarray:
    k = np.ones((1, 1) + tuple(shape), dtype=np.float32)
    return k / k.size


def dark_blob_graph(gain: float = 25.0, offset: float = 0.25, gate_level: float = 0.3, gate_gain: float = 30.0,
                    layout: str = "NDHWC", activation: str = "none", spatial: Optional[Sequence[int]] = None,
                    name: str = "dark_blob_detector") -> "onnx.ModelProto":  # noqa: F821
    """One fold: probability = sigmoid(gain*(big_mean - small_mean - offset)) * sigmoid(gate_gain*(big_mean - gate_level))."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dims: List[object] = list(spatial) if spatial else ["x", "y", "z"]
    shape = [1] + dims + [1] if layout == "NDHWC" else [1, 1] + dims
    inits = [
        numpy_helper.from_array(_box_kernel((SMALL,) * 3), "w_small"),
        numpy_helper.from_array(_box_kernel((BIG, 1, 1)), "w_bx"),
        numpy_helper.from_array(_box_kernel((1, BIG, 1)), "w_by"),
        numpy_helper.from_array(_box_kernel((1, 1, BIG)), "w_bz"),
        numpy_helper.from_array(np.array(gain, np.float32), "gain"),
        numpy_helper.from_array(np.array(offset, np.float32), "offset"),
        numpy_helper.from_array(np.array(gate_level, np.float32), "gate_level"),
        numpy_helper.from_array(np.array(gate_gain, np.float32), "gate_gain"),
    ]
    r, h = BIG // 2, SMALL // 2
    nodes = []
    source = "image"
    if layout == "NDHWC":
        nodes.append(helper.make_node("Transpose", ["image"], ["x_ncdhw"], perm=[0, 4, 1, 2, 3]))
        source = "x_ncdhw"
    nodes += [
        helper.make_node("Conv", [source, "w_small"], ["small"], pads=[h] * 6),
        helper.make_node("Conv", [source, "w_bx"], ["bx"], pads=[r, 0, 0, r, 0, 0]),
        helper.make_node("Conv", ["bx", "w_by"], ["bxy"], pads=[0, r, 0, 0, r, 0]),
        helper.make_node("Conv", ["bxy", "w_bz"], ["big"], pads=[0, 0, r, 0, 0, r]),
        helper.make_node("Sub", ["big", "small"], ["contrast"]),
        helper.make_node("Sub", ["contrast", "offset"], ["shifted"]),
        helper.make_node("Mul", ["shifted", "gain"], ["z_blob"]),
        helper.make_node("Sigmoid", ["z_blob"], ["p_blob"]),
        helper.make_node("Sub", ["big", "gate_level"], ["g_shift"]),
        helper.make_node("Mul", ["g_shift", "gate_gain"], ["z_gate"]),
        helper.make_node("Sigmoid", ["z_gate"], ["p_gate"]),
        helper.make_node("Mul", ["p_blob", "p_gate"], ["p"]),
    ]
    if activation == "none":
        last = "p"
    else:  # logits that the runner's activation turns back into p
        inits += [
            numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
            numpy_helper.from_array(np.array(1.0 - 1e-6, np.float32), "one_minus_eps"),
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        ]
        nodes += [
            helper.make_node("Clip", ["p", "eps", "one_minus_eps"], ["p_c"]),
            helper.make_node("Log", ["p_c"], ["log_p"]),
            helper.make_node("Sub", ["one", "p_c"], ["q"]),
            helper.make_node("Log", ["q"], ["log_q"]),
        ]
        if activation == "sigmoid":
            nodes.append(helper.make_node("Sub", ["log_p", "log_q"], ["logit"]))
            last = "logit"
        else:  # softmax over [not CMB, CMB]
            nodes.append(helper.make_node("Concat", ["log_q", "log_p"], ["logit"], axis=1))
            last = "logit"
    if layout == "NDHWC":
        nodes.append(helper.make_node("Transpose", [last], ["output"], perm=[0, 2, 3, 4, 1]))
    else:
        nodes.append(helper.make_node("Identity", [last], ["output"]))
    channels = 2 if activation == "softmax" else 1
    out_shape = [1] + dims + [channels] if layout == "NDHWC" else [1, channels] + dims
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="shivacmb-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_model(folder: Path, name: str = "test-dark-blob", shape: Sequence[int] = (80, 96, 80),
                layout: str = "NDHWC", activation: str = "none", folds: int = 1, threshold: float = 0.5,
                spatial_fixed: bool = False, extra: Optional[Dict[str, object]] = None,
                description: str = "Fixed-weight dark-blob detector for tests: not a trained model.") -> Path:
    """A complete model folder (model.json + fold ONNX files) of dark blob detectors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for fold in range(folds):
        graph = dark_blob_graph(offset=0.25 + 0.02 * fold, layout=layout, activation=activation,
                                spatial=shape if spatial_fixed else None, name=f"{name}_fold{fold}")
        file = f"fold{fold}.onnx"
        (folder / file).write_bytes(graph.SerializeToString())
        entries.append({"file": file, "sha256": checksum([folder / file])})
    descriptor = {
        "name": name, "version": "1.0", "target": "CMB", "modalities": ["swi", "t2s"],
        "description": description, "license": "Apache-2.0", "source": "SHIVACMBLib/blobmodel.py",
        "input": {"shape": list(shape), "layout": layout, "spacing_mm": [1, 1, 1], "orientation": "RAS",
                  "normalization": {"method": "percentile", "percentile": 99, "clip": 1.3}},
        "output": {"activation": activation, "channel": 1 if activation == "softmax" else 0},
        "threshold": threshold, "fold_floor": 0.001, "folds": entries, "metrics": {},
    }
    descriptor.update(extra or {})
    (folder / "model.json").write_text(json.dumps(descriptor, indent=2) + "\n")
    return folder


SHIPPED = {"name": "test-dark-blob-detector", "shape": (160, 214, 176), "folds": 2,
           "description": "TEST MODEL: a fixed-weight dark-blob detector built in code (SHIVACMBLib/"
                          "blobmodel.py), not trained on any data. It finds dark spheres in the project's "
                          "phantoms for tests and the demo; it is not for clinical or research reads."}


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m SHIVACMBLib.modelstore.blobmodel OUT_FOLDER  (writes the shipped test model)")
    print(write_model(Path(sys.argv[1]), **SHIPPED))
