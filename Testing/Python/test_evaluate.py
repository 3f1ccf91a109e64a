"""Detection metrics (`SHIVACMBLib.evaluate`, `shivacmb evaluate`) on hand-made label maps.

Unless said otherwise the grid is 20x20x20 voxels of 1 mm with identity direction and origin 0, so
voxel (i, j, k) is at LPS (i, j, k) = RAS (-i, -j, k), and a 2x2x2 cube starting at voxel (i, j, k)
has its centroid at (i + 0.5, j + 0.5, k + 0.5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SHIVACMBLib import cli
from SHIVACMBLib.errors import InputError
from SHIVACMBLib.evaluate import (ScanMetrics, evaluate_folders, evaluate_pair, mimic_detections, pearson_r,
                                  pool)
from SHIVACMBLib.findings import Finding, write_tsv

COS30, SIN30 = math.cos(math.radians(30)), 0.5


def blank(shape=(20, 20, 20)) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint16)


def cube(array: np.ndarray, i: int, j: int, k: int, label: int = 1, size=(2, 2, 2)) -> np.ndarray:
    """Set a box of ``size`` (i, j, k voxels) starting at voxel (i, j, k) to ``label``."""
    array[k:k + size[2], j:j + size[1], i:i + size[0]] = label
    return array


def image(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
          direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def two_cmbs() -> np.ndarray:
    """CMB 1 at voxels 2..3 (centroid 2.5), CMB 2 at voxels 10..11 (centroid 10.5), on all three axes."""
    return cube(cube(blank(), 2, 2, 2, 1), 10, 10, 10, 2)


def counts(metrics: ScanMetrics) -> tuple:
    return metrics.tp, metrics.fn, metrics.fp, metrics.n_true, metrics.n_pred


def finding(cmb_id: int, ras, status: str = "unreviewed") -> Finding:
    return Finding(cmb_id=cmb_id, r=ras[0], a=ras[1], s=ras[2], i=0, j=0, k=0, volume_mm3=1.0, voxels=1,
                   status=status)


def write(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image(array), str(path))
    return path


# --- one scan ------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["overlap", "centroid5mm"])
def test_perfect_match(rule):
    truth = image(two_cmbs())
    m = evaluate_pair(image(two_cmbs()), truth, rule)
    assert counts(m) == (2, 0, 0, 2, 2)
    # sensitivity 2/2, precision 2/2, F1 2*2/(2*2+0+0), FPavg 0/1 scan, FPcmb 0/2
    found = {"found": [1, 2]} if rule == "overlap" else {}  # the overlap rule names the truth labels it found
    assert m.as_dict() == {"tp": 2, "fn": 0, "fp": 0, "n_true": 2, "n_pred": 2, "sensitivity": 1.0,
                           "precision": 1.0, "f1": 1.0, "fp_avg": 0.0, "fp_cmb": 0.0, **found}


@pytest.mark.parametrize("rule", ["overlap", "centroid5mm"])
def test_one_false_negative(rule):
    pred = cube(blank(), 2, 2, 2, 1)  # CMB 2 missed
    m = evaluate_pair(image(pred), image(two_cmbs()), rule)
    assert counts(m) == (1, 1, 0, 2, 1)
    d = m.as_dict()
    assert d["sensitivity"] == 0.5  # 1/(1+1)
    assert d["precision"] == 1.0  # 1/(1+0)
    assert d["f1"] == pytest.approx(2 / 3)  # 2*1/(2*1+0+1) = 2PR/(P+R) = 2*1*0.5/1.5
    assert d["fp_cmb"] == 0.0
    assert d.get("found", [1]) == [1]  # overlap: truth CMB 1 found, 2 not


@pytest.mark.parametrize("rule", ["overlap", "centroid5mm"])
def test_one_false_positive(rule):
    pred = cube(two_cmbs(), 15, 2, 2, 3)  # an extra blob far from both CMBs
    m = evaluate_pair(image(pred), image(two_cmbs()), rule)
    assert counts(m) == (2, 0, 1, 2, 3)
    d = m.as_dict()
    assert d["sensitivity"] == 1.0
    assert d["precision"] == pytest.approx(2 / 3)  # 2/(2+1)
    assert d["f1"] == pytest.approx(0.8)  # 2*2/(2*2+1+0) = 4/5
    assert d["fp_avg"] == 1.0  # 1 FP / 1 scan
    assert d["fp_cmb"] == 0.5  # 1 FP / 2 true CMBs


def test_one_prediction_touching_two_cmbs():
    # CMB 1 at i = 4..5 (centroid i = 4.5), CMB 2 at i = 10..11 (centroid 10.5): 6 mm apart.
    truth = image(cube(cube(blank(), 4, 8, 8, 1), 10, 8, 8, 2))
    # One bar i = 4..11 covering both; its centroid i = 7.5 is 3 mm from each CMB's.
    pred = image(cube(blank(), 4, 8, 8, 1, size=(8, 2, 2)))
    # overlap: both CMBs touched, the one prediction touches a CMB -> TP 2, FP 0, precision 2/(2+0) = 1
    m = evaluate_pair(pred, truth, "overlap")
    assert counts(m) == (2, 0, 0, 2, 1)
    assert m.as_dict()["precision"] == 1.0
    # centroid5mm: both within 5 mm, but pairs are one to one -> TP 1, FN 1, FP 0
    assert counts(evaluate_pair(pred, truth, "centroid5mm")) == (1, 1, 0, 2, 1)


def test_two_predictions_on_one_cmb():
    # CMB at i = 8..11 (centroid i = 9.5); predictions 1 at i = 8 and 2 at i = 11, not adjacent
    truth = image(cube(blank(), 8, 8, 8, 1, size=(4, 2, 2)))
    pred = image(cube(cube(blank(), 8, 8, 8, 1, size=(1, 2, 2)), 11, 8, 8, 2, size=(1, 2, 2)))
    # overlap: both touch the CMB -> TP 1, FP 0 (2 predictions)
    assert counts(evaluate_pair(pred, truth, "overlap")) == (1, 0, 0, 1, 2)
    # centroid5mm: both 1.5 mm away, only one can pair -> TP 1, FP 1
    assert counts(evaluate_pair(pred, truth, "centroid5mm")) == (1, 0, 1, 1, 2)


def test_binary_prediction_is_split_26_connected_and_6_connected_for_centroids():
    # Binary map: voxels (2,2,2) and (3,3,3) touch by a corner (inside CMB 1), and one voxel at (15,15,15).
    pred = blank()
    pred[2, 2, 2] = pred[3, 3, 3] = pred[15, 15, 15] = 1
    truth = image(two_cmbs())
    # overlap, 26-connected: 2 instances; the pair touches CMB 1, (15,15,15) touches nothing -> TP 1, FN 1, FP 1
    assert counts(evaluate_pair(image(pred), truth, "overlap")) == (1, 1, 1, 2, 2)
    # centroid5mm, 6-connected: 3 instances. (2,2,2) and (3,3,3) are both sqrt(3 * 0.5^2) = 0.87 mm from
    # CMB 1's centroid (2.5,2.5,2.5): one pairs. (15,15,15) is sqrt(3 * 4.5^2) = 7.79 mm from CMB 2's
    # (10.5,10.5,10.5). -> TP 1, FN 1, FP 2
    assert counts(evaluate_pair(image(pred), truth, "centroid5mm")) == (1, 1, 2, 2, 3)


def test_nothing_to_find_and_nothing_found_gives_undefined_rates():
    d = evaluate_pair(image(blank()), image(blank()), "overlap").as_dict()
    assert (d["tp"], d["fn"], d["fp"]) == (0, 0, 0)
    # 0/0 -> None; FP per scan is 0/1
    assert (d["sensitivity"], d["precision"], d["f1"], d["fp_cmb"], d["fp_avg"]) == (None, None, None, None, 0.0)
    # errors but no TP: F1 = 2*0/(0+1+2) = 0, not undefined; precision 0/(0+1)
    d = pool([ScanMetrics(tp=0, fn=2, fp=1, n_true=2, n_pred=1)])
    assert (d["sensitivity"], d["precision"], d["f1"]) == (0.0, 0.0, 0.0)


# --- physical millimetres, not voxels ---------------------------------------------------------

# Grid: 0.5 x 0.5 x 3 mm voxels, axes turned 30 degrees about S: LPS columns i = (c, s, 0),
# j = (-s, c, 0), k = (0, 0, 1) with c = cos 30 = 0.866025, s = 0.5; origin LPS (10, -20, 5).
OBLIQUE = dict(spacing=(0.5, 0.5, 3.0), origin=(10.0, -20.0, 5.0),
               direction=(COS30, -SIN30, 0.0, SIN30, COS30, 0.0, 0.0, 0.0, 1.0))
# The one-voxel CMB at (i, j, k) = (10, 10, 3):
#   LPS = (10, -20, 5) + 10*0.5*(c, s, 0) + 10*0.5*(-s, c, 0) + 3*3*(0, 0, 1)
#       = (10 + 4.330127 - 2.5, -20 + 2.5 + 4.330127, 14) = (11.830127, -13.169873, 14)
CMB_LPS = (11.830127, -13.169873, 14.0)
CMB_RAS = (-11.830127, 13.169873, 14.0)


def oblique_cmb() -> sitk.Image:
    array = np.zeros((8, 30, 30), dtype=np.uint8)  # [k, j, i]
    array[3, 10, 10] = 1
    return image(array, **OBLIQUE)


@pytest.mark.parametrize("offset, paired", [
    ((0.0, 0.0, 4.9), True), ((0.0, 0.0, 5.1), False),  # along S
    ((2.94, 3.92, 0.0), True), ((3.06, 4.08, 0.0), False),  # in the turned plane: 0.6/0.8 of 4.9 and 5.1 mm
])
def test_centroid_5mm_in_physical_space_findings(offset, paired):
    ras = tuple(c + o for c, o in zip(CMB_RAS, offset))
    m = evaluate_pair([finding(1, ras)], oblique_cmb(), "centroid5mm")
    assert counts(m) == ((1, 0, 0, 1, 1) if paired else (0, 1, 1, 1, 1))


@pytest.mark.parametrize("ijk, paired", [
    ((10, 10, 5), False),  # 2 voxels away along k: 2 * 3 mm = 6 mm > 5
    ((19, 10, 3), True),  # 9 voxels away along i: 9 * 0.5 mm = 4.5 mm <= 5
])
def test_centroid_5mm_in_physical_space_label_map(ijk, paired):
    array = np.zeros((8, 30, 30), dtype=np.uint8)
    array[ijk[2], ijk[1], ijk[0]] = 1
    pred = image(array, **OBLIQUE)
    assert counts(evaluate_pair(pred, oblique_cmb(), "centroid5mm")) == ((1, 0, 0, 1, 1) if paired else
                                                                         (0, 1, 1, 1, 1))
    # neither voxel touches the CMB
    assert counts(evaluate_pair(pred, oblique_cmb(), "overlap")) == (0, 1, 1, 1, 1)


def test_prediction_on_another_grid():
    # 1 mm identity grid, origin LPS (0, -30, 0): a 3x3x3 cube at voxels i 11..13, j 16..18, k 13..15,
    # centred on voxel (12, 17, 14) = LPS (12, -13, 14).
    pred = image(cube(blank((30, 30, 30)), 11, 16, 13, 1, size=(3, 3, 3)), origin=(0.0, -30.0, 0.0))
    # centroids: |(12, -13, 14) - (11.830127, -13.169873, 14)| = sqrt(2 * 0.169873^2) = 0.24 mm -> paired
    assert counts(evaluate_pair(pred, oblique_cmb(), "centroid5mm")) == (1, 0, 0, 1, 1)
    # overlap: the CMB voxel centre LPS (11.83, -13.17, 14) is pred voxel (11.83, 16.83, 14) ~ (12, 17, 14),
    # inside the cube, so nearest-neighbour resampling keeps the touch
    assert counts(evaluate_pair(pred, oblique_cmb(), "overlap")) == (1, 0, 0, 1, 1)


def test_prediction_thinner_than_truth_slices_touches_by_its_centroid():
    # Truth: 1 x 1 x 3 mm slices at z = 0, 3, 6...; CMB at voxel (5, 5, 1) = LPS (5, 5, 3).
    truth = image(cube(blank((6, 20, 20)), 5, 5, 1, 1, size=(1, 1, 1)), spacing=(1.0, 1.0, 3.0))
    # Prediction: 1 mm grid, one voxel at (5, 5, 4) = LPS z 4: between the truth slices, so resampling
    # loses it; its centroid z = 4 is truth k = 4/3 = 1.33 -> slice 1, the CMB.
    pred = image(cube(blank((18, 20, 20)), 5, 5, 4, 1, size=(1, 1, 1)))
    assert counts(evaluate_pair(pred, truth, "overlap")) == (1, 0, 0, 1, 1)


# --- findings --------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["overlap", "centroid5mm"])
def test_findings_table_input(tmp_path, rule):
    path = tmp_path / "findings.tsv"
    write_tsv([
        finding(1, (-2.6, -2.4, 2.6)),  # voxel (2.6, 2.4, 2.6) ~ (3, 2, 3): in CMB 1 (voxels 2..3);
                                        # 0.17 mm from its centroid RAS (-2.5, -2.5, 2.5)
        finding(2, (-15.0, -15.0, 15.0)),  # empty voxel; 4.5 * sqrt(3) = 7.79 mm from CMB 2's centroid
        finding(3, (-10.5, -10.5, 10.5), status="rejected"),  # on CMB 2, but rejected by a reader: ignored
    ], path)
    m = evaluate_pair(path, image(two_cmbs()), rule)
    assert counts(m) == (1, 1, 1, 2, 2)


# --- mimics -----------------------------------------------------------------------------------


def mimic_map() -> np.ndarray:
    """Mimics 1 and 2 (veins) at i = 15 and j = 15, 3 (calcification) at (15, 15), 4 (no class) at k = 15."""
    return cube(cube(cube(cube(blank(), 15, 2, 2, 1), 2, 15, 2, 2), 15, 15, 2, 3), 2, 2, 15, 4)


def test_mimic_detection_rates():
    classes = {1: "vein", 2: "vein", 3: "calcification", 9: "iron"}  # 9 is not in the map: not counted
    # the prediction touches mimic 1 (one voxel) and mimic 3
    pred = blank()
    pred[2, 2, 15] = 1
    cube(pred, 15, 15, 2, 2)
    rates = mimic_detections(image(pred), image(mimic_map()), classes)
    assert rates == {"calcification": {"instances": 1, "detected": 1, "rate": 1.0},
                     "unknown": {"instances": 1, "detected": 0, "rate": 0.0},  # label 4 has no class
                     "vein": {"instances": 2, "detected": 1, "rate": 0.5}}  # 1 of 2
    # a finding on mimic 2: RAS (-2.6, -15.4, 2.6) is voxel (2.6, 15.4, 2.6) ~ (3, 15, 3), inside mimic 2
    # (i 2..3, j 15..16, k 2..3)
    m = evaluate_pair([finding(1, (-2.6, -15.4, 2.6))], image(two_cmbs()), "overlap", image(mimic_map()), classes)
    assert m.mimics["vein"] == {"instances": 2, "detected": 1, "rate": 0.5}
    assert m.as_dict()["mimics"]["calcification"]["detected"] == 0


# --- folders ----------------------------------------------------------------------------------

OBJECTS_HEADER = "label\tkind\tclass\tarea\tr\ta\ts\tdiameter_mm\n"


def phantom_folder(root: Path) -> Path:
    """Phantom layout: scans at the top (not truth!), truth/<id>_cmb, _mimics, _objects.tsv."""
    for scan_id in ("scan-a", "scan-b"):
        write(np.full((20, 20, 20), 7, dtype=np.uint16), root / f"{scan_id}.nii.gz")  # the scan
    write(two_cmbs(), root / "truth" / "scan-a_cmb.nii.gz")
    write(mimic_map(), root / "truth" / "scan-a_mimics.nii.gz")
    (root / "truth" / "scan-a_objects.tsv").write_text(
        OBJECTS_HEADER + "1\tcmb\tcmb\tcortex\t0\t0\t0\t3\n2\tcmb\tcmb\tcortex\t0\t0\t0\t3\n"
        "1\tmimic\tvein\tsulcus\t0\t0\t0\t0\n2\tmimic\tvein\tsulcus\t0\t0\t0\t0\n"
        "3\tmimic\tcalcification\tpineal\t0\t0\t0\t0\n4\tmimic\tflow_void\tsinus\t0\t0\t0\t0\n", encoding="utf-8")
    write(cube(blank(), 5, 5, 5, 1), root / "truth" / "scan-b_cmb.nii.gz")
    write(cube(blank(), 12, 12, 12, 1), root / "truth" / "scan-b_mimics.nii.gz")
    (root / "truth" / "scan-b_objects.tsv").write_text(
        OBJECTS_HEADER + "1\tcmb\tcmb\tdeep\t0\t0\t0\t3\n1\tmimic\tiron\tputamen\t0\t0\t0\t0\n", encoding="utf-8")
    return root


def segment_output(root: Path) -> Path:
    """Segment output layout: <id>/cmb_labels.nii.gz or <id>/findings.tsv."""
    write(cube(cube(blank(), 2, 2, 2, 1), 15, 2, 2, 2), root / "scan-a" / "cmb_labels.nii.gz")
    (root / "scan-b").mkdir()
    write_tsv([finding(1, (-5.6, -5.4, 5.6)),  # voxel (6, 5, 6): in the CMB at 5..6
               finding(2, (-12.6, -12.6, 12.6))],  # voxel (13, 13, 13): on the iron mimic at 12..13
              root / "scan-b" / "findings.tsv")
    write(blank(), root / "scan-x" / "cmb_labels.nii.gz")  # no truth for it
    write(blank(), root / ".scan-a.partial-host-1-abc" / "cmb_labels.nii.gz")  # hidden staging folder
    return root


def test_segment_output_against_phantom_folder(tmp_path):
    result = evaluate_folders(segment_output(tmp_path / "out"), phantom_folder(tmp_path / "phantoms"))
    overlap = result["rules"]["overlap"]
    assert sorted(overlap["scans"]) == ["scan-a", "scan-b"]
    # scan-a: CMB 1 found, CMB 2 missed, the blob at (15, 2, 2) is on a vein mimic: TP 1, FN 1, FP 1
    a = overlap["scans"]["scan-a"]
    assert (a["tp"], a["fn"], a["fp"]) == (1, 1, 1)
    # scan-b: finding 1 on the CMB, finding 2 on the iron mimic: TP 1, FN 0, FP 1
    b = overlap["scans"]["scan-b"]
    assert (b["tp"], b["fn"], b["fp"]) == (1, 0, 1)
    # pooled: TP 2, FN 1, FP 2, 3 true, 2 + 2 predicted; sensitivity 2/3, precision 2/4,
    # F1 2*2/(2*2+2+1) = 4/7, FPavg 2 FP / 2 scans = 1, FPcmb 2/3
    assert overlap["pooled"] == {"scans": 2, "tp": 2, "fn": 1, "fp": 2, "n_true": 3, "n_pred": 4,
                                 "sensitivity": pytest.approx(2 / 3), "precision": 0.5,
                                 "f1": pytest.approx(4 / 7), "fp_avg": 1.0, "fp_cmb": pytest.approx(2 / 3)}
    assert overlap["pearson_r"] is None  # predicted counts 2, 2: constant
    assert "centroid5mm" in result["rules"]
    # mimics: scan-a veins 1 of 2 (mimic 1 touched), calcification 0 of 1, flow void 0 of 1;
    # scan-b iron 1 of 1
    assert result["mimics"]["scans"]["scan-a"]["vein"] == {"instances": 2, "detected": 1, "rate": 0.5}
    assert result["mimics"]["pooled"] == {
        "calcification": {"instances": 1, "detected": 0, "rate": 0.0},
        "flow_void": {"instances": 1, "detected": 0, "rate": 0.0},
        "iron": {"instances": 1, "detected": 1, "rate": 1.0},
        "vein": {"instances": 2, "detected": 1, "rate": 0.5}}
    assert len(result["warnings"]) == 1 and "scan-x" in result["warnings"][0]
    json.dumps(result)  # JSON-able as it is


def test_truth_scan_without_prediction_is_an_error(tmp_path):
    pred = segment_output(tmp_path / "out")
    (pred / "scan-b" / "findings.tsv").unlink()
    with pytest.raises(InputError, match="no prediction for scan 'scan-b'"):
        evaluate_folders(pred, phantom_folder(tmp_path / "phantoms"))


def test_flat_folders_pooled_numbers_and_pearson_r(tmp_path):
    a, b, c, d = (2, 2, 2), (10, 10, 10), (15, 2, 2), (2, 15, 15)  # cube corners, far apart
    scans = {  # scan: (true CMBs, predicted blobs)
        "s1": ([a], [a]),  # true 1, predicted 1: TP 1, FN 0, FP 0
        "s2": ([a, b], [a, b, c]),  # true 2, predicted 3: TP 2, FN 0, FP 1
        "s3": ([a, b, d], [a, b]),  # true 3, predicted 2: TP 2, FN 1, FP 0
    }
    for scan_id, (true, predicted) in scans.items():
        write(cube_set(true), tmp_path / "truth" / f"{scan_id}.nii.gz")
        write(cube_set(predicted), tmp_path / "pred" / f"{scan_id}.nii.gz")
    result = evaluate_folders(tmp_path / "pred", tmp_path / "truth")
    for rule in ("overlap", "centroid5mm"):  # cubes on cubes: both rules agree
        entry = result["rules"][rule]
        # sums: TP 5, FN 1, FP 1 over 3 scans and 6 true CMBs; sensitivity 5/6, precision 5/6,
        # F1 2*5/(2*5+1+1) = 10/12, FPavg 1/3, FPcmb 1/6
        assert entry["pooled"] == {"scans": 3, "tp": 5, "fn": 1, "fp": 1, "n_true": 6, "n_pred": 6,
                                   "sensitivity": pytest.approx(5 / 6), "precision": pytest.approx(5 / 6),
                                   "f1": pytest.approx(5 / 6), "fp_avg": pytest.approx(1 / 3),
                                   "fp_cmb": pytest.approx(1 / 6)}
        # true counts 1, 2, 3 (mean 2) and predicted 1, 3, 2 (mean 2): deviations (-1, 0, 1), (-1, 1, 0);
        # R = sum of products / sqrt(sum sq * sum sq) = 1 / sqrt(2 * 2) = 0.5
        assert entry["pearson_r"] == pytest.approx(0.5)
    assert "mimics" not in result and result["warnings"] == []


def cube_set(corners) -> np.ndarray:
    array = blank()
    for label, corner in enumerate(corners, start=1):
        cube(array, *corner, label)
    return array


def test_pearson_r_needs_two_scans_and_varying_counts():
    one = ScanMetrics(tp=1, fn=0, fp=0, n_true=1, n_pred=1)
    assert pearson_r([one]) is None
    assert pearson_r([one, ScanMetrics(tp=1, fn=1, fp=0, n_true=2, n_pred=1)]) is None  # predicted 1, 1
    # true 1, 2 and predicted 1, 2: perfectly correlated
    assert pearson_r([one, ScanMetrics(tp=2, fn=0, fp=0, n_true=2, n_pred=2)]) == pytest.approx(1.0)


def test_only_the_named_scans_are_evaluated(tmp_path):
    pred, truth = segment_output(tmp_path / "out"), phantom_folder(tmp_path / "phantoms")
    result = evaluate_folders(pred, truth, scan_ids=["scan-b"])
    assert sorted(result["rules"]["overlap"]["scans"]) == ["scan-b"]
    assert result["rules"]["overlap"]["pooled"]["tp"] == 1
    with pytest.raises(InputError, match="no truth for scan 'scan-z'"):
        evaluate_folders(pred, truth, scan_ids=["scan-b", "scan-z"])


def test_single_files_pair_whatever_their_names(tmp_path):
    truth = write(two_cmbs(), tmp_path / "case7_cmb.nii.gz")
    pred = write(cube(blank(), 2, 2, 2, 1), tmp_path / "cmb_labels.nii.gz")
    result = evaluate_folders(pred, truth, rules=("overlap",))
    assert list(result["rules"]) == ["overlap"]
    scan = result["rules"]["overlap"]["scans"]["case7"]  # scan id: the truth file's stem without _cmb
    assert (scan["tp"], scan["fn"], scan["fp"]) == (1, 1, 0)


# --- command ----------------------------------------------------------------------------------


def test_command_writes_json_and_prints_pooled_table(tmp_path, capsys):
    out = tmp_path / "metrics" / "metrics.json"
    code = cli.main(["evaluate", "--pred", str(segment_output(tmp_path / "out")),
                     "--truth", str(phantom_folder(tmp_path / "phantoms")), "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    data = json.loads(out.read_text(encoding="utf-8"))
    assert set(data["rules"]) == {"overlap", "centroid5mm"}
    assert data["rules"]["overlap"]["pooled"]["tp"] == 2
    assert data["mimics"]["pooled"]["iron"]["rate"] == 1.0
    lines = printed.out.splitlines()
    assert lines[1].split()[:7] == ["overlap", "2", "3", "4", "2", "1", "2"]  # scans, true, pred, TP, FN, FP
    assert any(line.startswith("centroid5mm") for line in lines)
    assert any("scan-x" in line for line in lines)


def test_command_one_rule(tmp_path, capsys):
    truth = write(two_cmbs(), tmp_path / "t.nii.gz")
    assert cli.main(["evaluate", "--pred", str(truth), "--truth", str(truth), "--rule", "centroid5mm"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("centroid5mm")


def test_command_missing_input_is_one_line_exit_2(tmp_path, capsys):
    truth = write(two_cmbs(), tmp_path / "t.nii.gz")
    code = cli.main(["evaluate", "--pred", str(tmp_path / "nope.nii.gz"), "--truth", str(truth)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith("shivacmb: error: ") and "nope.nii.gz" in err
