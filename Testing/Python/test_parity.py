"""Parity of two probability maps: tolerance band around the threshold, and the detections of reduced precisions."""

import numpy as np
import onnxruntime as ort
import pytest

from SHIVACMBLib import inference
from SHIVACMBLib.modelstore.parity import FP32_TOLERANCE, REDUCED_TOLERANCE, compare, compare_detections
from helpers import run_cli


def blobs(*centres, shape=(20, 20, 20), radius=2.0, value=0.9):
    """Spheres of ``value`` on a 0.05 background."""
    z, y, x = np.indices(shape)
    out = np.full(shape, 0.05, np.float32)
    for cz, cy, cx in centres:
        out[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= radius ** 2] = value
    return out


def test_same_map_has_the_same_detections():
    found = compare_detections(blobs((5, 5, 5), (14, 12, 9)), blobs((5, 5, 5), (14, 12, 9)), 0.5)
    assert (found.reference, found.candidate, found.paired, found.max_shift_voxels) == (2, 2, 2, 0.0) and found.same


def test_lost_split_merged_and_moved_detections_differ():
    reference = blobs((5, 5, 5), (14, 12, 9))
    lost = compare_detections(reference, blobs((5, 5, 5)), 0.5)
    assert (lost.candidate, lost.paired, lost.same) == (1, 1, False)
    split = blobs((5, 5, 5), (14, 12, 9))
    split[14, :, :] = 0.05  # the second sphere cut in two
    assert compare_detections(reference, split, 0.5).paired == 1
    merged = blobs((5, 5, 5), (14, 12, 9))
    merged[5:15, 5, 5] = merged[14, 5:13, 5] = merged[14, 12, 5:10] = 0.9  # a path joining the two
    assert compare_detections(reference, merged, 0.5).paired == 0
    moved = compare_detections(reference, blobs((5, 5, 5), (14, 12, 11)), 0.5)
    assert moved.paired == 2 and moved.max_shift_voxels == pytest.approx(2.0) and not moved.same


def test_reduced_precision_is_judged_on_its_detections():
    reference = blobs((5, 5, 5), (14, 12, 9))
    reference[5, 5, 8] = 0.45  # a rim voxel under the threshold
    rim = reference.copy()
    rim[5, 5, 8] = 0.56  # over it in the candidate, 0.11 off: the same CMBs, one voxel larger
    rim[14, 12, 9] = 0.8
    reduced = compare(reference, rim, 0.5, REDUCED_TOLERANCE, detections=True)
    assert reduced.passed and reduced.max_abs_diff == pytest.approx(0.11) and reduced.differing_outside_band == 1
    assert not compare(reference, rim, 0.5, FP32_TOLERANCE).passed  # a conversion would fail on it
    reference[17, 2, 2] = 0.497
    speck = reference.copy()
    speck[17, 2, 2] = 0.503  # a new speck inside the +-0.01 band: the voxel rule lets it through, detections not
    assert compare(reference, speck, 0.5, REDUCED_TOLERANCE).passed
    strict = compare(reference, speck, 0.5, REDUCED_TOLERANCE, detections=True)
    assert not strict.passed and "detections 3 vs 2" in strict.text()


def test_verify_compares_a_reduced_precision_and_says_what_ran(model_dir, iso_scan):
    """bf16 runs through OpenVINO where it is installed (and the CPU has bfloat16 units), else fp32 with a
    warning; either way the check compares the detections with fp32 on the same provider and passes on this model."""
    result = run_cli(["models", "verify", model_dir, "--precision", "bf16", "--device", "cpu", "--scan", iso_scan])
    assert result.returncode == 0, result.stdout + result.stderr
    if inference.OPENVINO in ort.get_available_providers():
        provider = inference.OPENVINO
        ran = "bf16" if inference.cpu_has_bf16() else "fp32"
    else:
        assert "warning: --precision bf16 runs on CPUs through OpenVINO" in result.stdout
        provider, ran = inference.CPU, "fp32"
    assert f"{ran} on {provider} vs fp32 on {provider}: the same detections in 1 of 1 scan(s)" in result.stdout
    assert "detections 6 vs 6, 6 paired one to one" in result.stdout
    assert ("recorded: `segment --precision bf16` now uses it on this computer" in result.stdout) == (ran == "bf16")
