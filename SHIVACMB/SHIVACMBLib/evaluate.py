"""Detection metrics of predicted CMBs against ground truth, by the two rules of the literature.

Instances
    Truth: a label map (any readable image); each distinct label > 0 is one CMB.
    Prediction: a label map (``cmb_labels`` of ``shivacmb segment``: label k = CMB k), each distinct
    label > 0 one instance, except that a binary map (only label 1) is split into 26-connected
    components; or a findings table (``findings.tsv``/JSON), one instance per row at its RAS
    centroid. Rows a reviewer marked ``rejected`` are not predictions.

Rule ``overlap`` (SHIVA-CMB paper, SHiVAi)
    A true CMB is found (TP) when any predicted voxel touches it; FN = true CMBs touched by no
    prediction; FP = predicted instances touching no true CMB. A finding touches the truth label
    of the voxel nearest its centroid. A prediction on another grid is resampled onto the truth grid
    (nearest neighbour); an instance too thin to keep a voxel there touches by its centroid, as a
    finding. One prediction may find two CMBs and two predictions one CMB, so TP + FP may differ
    from the number of predictions.

Rule ``centroid5mm`` (VALDO challenge)
    Instances are the 6-connected components of the binary truth and of the binary prediction
    (findings: their centroids). Centroids are compared in physical millimetres; truth and
    prediction are paired one to one (Hungarian assignment, most pairs first, then the smallest
    total distance) among pairs at most 5 mm apart. TP = pairs, FN = unpaired truth,
    FP = unpaired predictions.

Numbers (per scan, and pooled = summed over scans first: a micro average)
    sensitivity = TP/(TP+FN); precision = TP/(TP+FP); F1 = 2TP/(2TP+FP+FN), which is 2PR/(P+R)
    wherever that is defined and 0 when there are errors but no TP; FPavg = FP / scans;
    FPcmb = FP / true CMBs. 0/0 gives None (JSON null). Pearson R of the per-scan predicted
    against true instance counts (under the rule used): None below 2 scans or for a constant series.

Mimics (non-CMB look-alikes of the phantoms)
    With a mimic label map and a class per label: per class, the instances (labels present in the
    map), how many a prediction touches (the overlap rule's touching), and the rate.

Folders
    Predictions: ``<pred>/<scan_id>/cmb_labels.<ext>`` (else ``findings.tsv``) as ``shivacmb segment``
    writes them, or flat ``<scan_id>.<ext>`` label maps / ``<scan_id>.tsv`` findings. Truth: a phantom
    folder (``<truth>/truth/<scan_id>_cmb.<ext>``, with ``_mimics.<ext>`` and ``_objects.tsv``), or flat
    ``<scan_id>_cmb.<ext>`` or ``<scan_id>.<ext>`` label maps. Scan ids match exactly; a truth scan
    without prediction is an error, a prediction without truth is ignored with a warning.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .errors import InputError
from .findings import Finding, read_findings
from .geometry import Geometry, resample
from .postprocess import CONNECT_26
from .scan import read_label_image, scan_id_from_path

RULES = ("overlap", "centroid5mm")
MATCH_DISTANCE_MM = 5.0
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LABELS_STEM = "cmb_labels"
FINDINGS_NAME = "findings.tsv"
_CONNECTIVITY_6 = ndimage.generate_binary_structure(3, 1)

PathLike = Union[str, Path]
PredictionInput = Union[PathLike, sitk.Image, Sequence[Finding]]
LabelInput = Union[PathLike, sitk.Image]
Instances = Union[sitk.Image, np.ndarray]  # instance label image, or (n, 3) RAS points
MimicRates = Dict[str, Dict[str, Optional[float]]]


@dataclass
class ScanMetrics:
    """Counts of one scan under one rule (and mimic detections when a mimic map was given)."""

    tp: int
    fn: int
    fp: int
    n_true: int
    n_pred: int
    mimics: Optional[MimicRates] = None
    found: Optional[List[int]] = None  # overlap rule: the truth labels a prediction touches

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("mimics", "found")}
        if self.found is not None:
            out["found"] = self.found
        out.update(_rates(self.tp, self.fn, self.fp, scans=1))
        if self.mimics is not None:
            out["mimics"] = self.mimics
        return out


def _ratio(num: float, den: float) -> Optional[float]:
    return None if den == 0 else num / den


def _rates(tp: int, fn: int, fp: int, scans: int) -> dict:
    return {"sensitivity": _ratio(tp, tp + fn), "precision": _ratio(tp, tp + fp),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn), "fp_avg": _ratio(fp, scans), "fp_cmb": _ratio(fp, tp + fn)}


def pool(metrics: Sequence[ScanMetrics]) -> dict:
    """Counts summed over scans, then the same formulas (FPavg = FP per scan)."""
    sums = {k: sum(getattr(m, k) for m in metrics) for k in ("tp", "fn", "fp", "n_true", "n_pred")}
    return {"scans": len(metrics), **sums, **_rates(sums["tp"], sums["fn"], sums["fp"], scans=len(metrics))}


def pearson_r(metrics: Sequence[ScanMetrics]) -> Optional[float]:
    """Pearson correlation of predicted with true instance counts over scans."""
    if len(metrics) < 2:
        return None
    pred = np.array([m.n_pred for m in metrics], dtype=float)
    true = np.array([m.n_true for m in metrics], dtype=float)
    if np.ptp(pred) == 0 or np.ptp(true) == 0:
        return None
    return float(np.corrcoef(pred, true)[0, 1])


# --- reading ------------------------------------------------------------------------------


def _load_prediction(pred: PredictionInput) -> Union[sitk.Image, List[Finding]]:
    if isinstance(pred, sitk.Image):
        return pred
    if isinstance(pred, (str, Path)):
        path = Path(pred)
        if path.name.lower().endswith((".tsv", ".json")):
            if not path.is_file():
                raise InputError(path, "no such file")
            return read_findings(path)
        return read_label_image(path)
    return list(pred)


def _load_labels(labels: LabelInput) -> sitk.Image:
    return labels if isinstance(labels, sitk.Image) else read_label_image(labels)


def _label_array(image: sitk.Image) -> np.ndarray:
    """Integer labels ([k, j, i]); values <= 0 are background."""
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        array = np.rint(np.nan_to_num(array)).astype(np.int64)
    return np.where(array > 0, array, 0)


def _instances(pred: Union[sitk.Image, List[Finding]]) -> Instances:
    """Prediction as an instance label image (ids 1..n) or as RAS points."""
    if not isinstance(pred, sitk.Image):
        kept = [f.ras for f in pred if f.status != "rejected"]
        return np.array(kept, dtype=float).reshape(-1, 3)
    labels = _label_array(pred)
    present = np.unique(labels[labels > 0])
    if np.array_equal(present, [1]):
        labels = ndimage.label(labels > 0, structure=CONNECT_26)[0]
    else:  # renumber 1..n so ids are dense
        dense = np.zeros(labels.shape, dtype=np.int32)
        inside = labels > 0
        dense[inside] = np.searchsorted(present, labels[inside]) + 1
        labels = dense
    return Geometry.of(pred).with_image(labels.astype(np.int32, copy=False))


def _centroids(labels: np.ndarray, n: int) -> np.ndarray:
    """Mean (i, j, k) index of the voxels of labels 1..n in a [k, j, i] array (from its labelled voxels only)."""
    kji = np.nonzero(labels)
    ids = labels[kji]
    count = np.bincount(ids, minlength=n + 1)[1:]
    return np.stack([np.bincount(ids, weights=axis, minlength=n + 1)[1:] / count for axis in kji[::-1]], axis=1)


def _count(instances: Instances) -> int:
    if isinstance(instances, sitk.Image):
        return int(sitk.GetArrayViewFromImage(instances).max(initial=0))
    return len(instances)


# --- overlap rule -------------------------------------------------------------------------


def _labels_at(points_ras: np.ndarray, labels: np.ndarray, grid: Geometry) -> np.ndarray:
    """Label of the voxel nearest each RAS point (0 outside the grid)."""
    ijk = np.rint(grid.ras_to_index(points_ras)).astype(np.int64).reshape(-1, 3)
    inside = np.all((ijk >= 0) & (ijk < np.asarray(grid.size)), axis=1)
    found = np.zeros(len(ijk), dtype=labels.dtype)
    found[inside] = labels[ijk[inside, 2], ijk[inside, 1], ijk[inside, 0]]
    return found


def _touches(instances: Instances, labels: np.ndarray, grid: Geometry) -> Tuple[Set[int], int]:
    """Labels touched by any prediction, and the number of predicted instances touching a label."""
    if not isinstance(instances, sitk.Image):
        hit = _labels_at(instances, labels, grid)
        return set(hit[hit > 0].tolist()), int(np.count_nonzero(hit))
    native_grid = Geometry.of(instances)
    if native_grid == grid:
        on_grid = sitk.GetArrayFromImage(instances)
    else:
        on_grid = sitk.GetArrayFromImage(resample(instances, grid, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32))
    touched = set(np.unique(labels[on_grid > 0]).tolist()) - {0}
    touching = set(np.unique(on_grid[labels > 0]).tolist()) - {0}
    n = _count(instances)
    lost = np.setdiff1d(np.arange(1, n + 1), on_grid[on_grid > 0])
    if len(lost):  # instances too thin to keep a voxel on this grid touch by their centroid
        centres = _centroids(sitk.GetArrayViewFromImage(instances), n)[lost - 1]
        hit = _labels_at(native_grid.index_to_ras(centres), labels, grid)
        touched.update(hit[hit > 0].tolist())
        touching.update(lost[hit > 0].tolist())
    return touched, len(touching)


def _overlap(instances: Instances, truth: sitk.Image) -> ScanMetrics:
    labels = _label_array(truth)
    n_true = len(np.unique(labels[labels > 0]))
    touched, touching = _touches(instances, labels, Geometry.of(truth))
    n_pred = _count(instances)
    return ScanMetrics(tp=len(touched), fn=n_true - len(touched), fp=n_pred - touching, n_true=n_true, n_pred=n_pred,
                       found=sorted(int(label) for label in touched))


# --- centroid rule ------------------------------------------------------------------------


def _component_centroids(image: sitk.Image) -> np.ndarray:
    """RAS centroids (mm) of the 6-connected components of ``image > 0``."""
    components, n = ndimage.label(_label_array(image) > 0, structure=_CONNECTIVITY_6)
    return Geometry.of(image).index_to_ras(_centroids(components, n))


def centroid_pairs(a_ras: np.ndarray, b_ras: np.ndarray, limit_mm: float = MATCH_DISTANCE_MM
                   ) -> List[Tuple[int, int]]:
    """One-to-one pairs (index in a, index in b) at most ``limit_mm`` apart: as many pairs as possible,
    then the shortest (Hungarian assignment)."""
    if len(a_ras) == 0 or len(b_ras) == 0:
        return []
    distance = np.linalg.norm(np.asarray(a_ras)[:, None, :] - np.asarray(b_ras)[None, :, :], axis=2)
    # a forbidden pair costs more than any full set of allowed pairs, so pairs are maximised first
    forbidden = limit_mm * (min(distance.shape) + 1)
    rows, cols = linear_sum_assignment(np.where(distance <= limit_mm, distance, forbidden))
    return [(int(r), int(c)) for r, c in zip(rows, cols) if distance[r, c] <= limit_mm]


def match_centroids(pred_ras: np.ndarray, true_ras: np.ndarray, limit_mm: float = MATCH_DISTANCE_MM) -> int:
    """Number of one-to-one pairs at most ``limit_mm`` apart: as many pairs as possible, then shortest."""
    return len(centroid_pairs(pred_ras, true_ras, limit_mm))


def _centroid(instances: Instances, truth: sitk.Image) -> ScanMetrics:
    true_ras = _component_centroids(truth)
    pred_ras = _component_centroids(instances) if isinstance(instances, sitk.Image) else instances
    tp = match_centroids(pred_ras, true_ras)
    return ScanMetrics(tp=tp, fn=len(true_ras) - tp, fp=len(pred_ras) - tp, n_true=len(true_ras),
                       n_pred=len(pred_ras))


# --- mimics -------------------------------------------------------------------------------


def _mimic_rates(instances: Instances, mimic_labels: sitk.Image, classes: Dict[int, str]) -> MimicRates:
    labels = _label_array(mimic_labels)
    touched, _ = _touches(instances, labels, Geometry.of(mimic_labels))
    rates: Dict[str, Dict[str, int]] = {}
    for label in np.unique(labels[labels > 0]).tolist():
        entry = rates.setdefault(classes.get(label, "unknown"), {"instances": 0, "detected": 0})
        entry["instances"] += 1
        entry["detected"] += int(label in touched)
    return {name: {**c, "rate": _ratio(c["detected"], c["instances"])} for name, c in sorted(rates.items())}


def mimic_detections(pred: PredictionInput, mimic_labels: LabelInput,
                     classes: Optional[Dict[int, str]] = None) -> MimicRates:
    """Per mimic class: instances (labels present in the map), detected (touched by a prediction), rate.

    Labels missing from ``classes`` count as class ``unknown``.
    """
    return _mimic_rates(_instances(_load_prediction(pred)), _load_labels(mimic_labels), classes or {})


def pool_mimics(per_scan: Iterable[MimicRates]) -> MimicRates:
    """Instances and detections summed over scans per class, then the rate."""
    sums: Dict[str, Dict[str, int]] = {}
    for rates in per_scan:
        for name, entry in rates.items():
            total = sums.setdefault(name, {"instances": 0, "detected": 0})
            total["instances"] += int(entry["instances"])
            total["detected"] += int(entry["detected"])
    return {name: {**c, "rate": _ratio(c["detected"], c["instances"])} for name, c in sorted(sums.items())}


def read_mimic_classes(path: PathLike) -> Dict[int, str]:
    """Mimic label -> class from a phantom ``_objects.tsv`` (rows with kind ``mimic``)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        return {int(row["label"]): row["class"] for row in rows if row["kind"] == "mimic"}
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read object table: {err}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(path, f"object table needs columns label, kind and class with integer labels ({err})") \
            from None


# --- one scan -----------------------------------------------------------------------------


def _evaluate(instances: Instances, truth: sitk.Image, rule: str) -> ScanMetrics:
    if rule == "overlap":
        return _overlap(instances, truth)
    if rule == "centroid5mm":
        return _centroid(instances, truth)
    raise ValueError(f"unknown rule '{rule}' (one of {', '.join(RULES)})")


def evaluate_pair(pred: PredictionInput, truth: LabelInput, rule: str = "overlap",
                  mimics: Optional[LabelInput] = None,
                  mimic_classes: Optional[Dict[int, str]] = None) -> ScanMetrics:
    """Metrics of one scan: ``pred`` a label map (path or image) or findings (path or list)."""
    instances = _instances(_load_prediction(pred))
    metrics = _evaluate(instances, _load_labels(truth), rule)
    if mimics is not None:
        metrics.mimics = _mimic_rates(instances, _load_labels(mimics), mimic_classes or {})
    return metrics


# --- folders ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TruthFiles:
    """Ground truth of one scan: CMB label map, and optionally the mimic map and object table."""

    cmb: Path
    mimics: Optional[Path] = None
    objects: Optional[Path] = None


def _image_suffix(path: Path) -> Optional[str]:
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)


def _visible_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _labels_in(folder: Path) -> Optional[Path]:
    """The ``cmb_labels.<ext>`` (else ``findings.tsv``) of a segment output folder."""
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{LABELS_STEM}{suffix}").is_file():
            return folder / f"{LABELS_STEM}{suffix}"
    return folder / FINDINGS_NAME if (folder / FINDINGS_NAME).is_file() else None


def _add(found: Dict[str, Path], scan_id: str, path: Path) -> None:
    if scan_id in found:
        raise InputError(path, f"scan '{scan_id}' also given by {found[scan_id]}")
    found[scan_id] = path


def prediction_files(pred: PathLike) -> Dict[str, Path]:
    """Scan id -> prediction file, for a file, a segment output folder or a flat folder."""
    pred = Path(pred)
    if pred.is_file():
        return {_stem(pred): pred}
    if not pred.is_dir():
        raise InputError(pred, "no such file or folder")
    own = _labels_in(pred)
    if own is not None:  # the output folder of one scan
        return {pred.name: own}
    found: Dict[str, Path] = {}
    for sub in sorted(p for p in pred.iterdir() if p.is_dir() and not p.name.startswith(".")):
        path = _labels_in(sub)
        if path is not None:
            _add(found, sub.name, path)
    for path in _visible_files(pred):
        if _image_suffix(path) or path.name.lower().endswith(".tsv"):
            _add(found, _stem(path), path)
    if not found:
        raise InputError(pred, f"no predictions found ({LABELS_STEM}.<ext> or {FINDINGS_NAME} in scan folders, "
                               "or label maps / .tsv files)")
    return found


def _stem(path: Path) -> str:
    return path.name[:-4] if path.name.lower().endswith(".tsv") else scan_id_from_path(path)


def _truth_with_companions(path: Path) -> TruthFiles:
    """A ``<id>_cmb.<ext>`` map with its ``<id>_mimics.<ext>`` and ``<id>_objects.tsv`` when both exist."""
    stem = scan_id_from_path(path)
    if not stem.endswith("_cmb"):
        return TruthFiles(path)
    base = path.parent / stem[: -len("_cmb")]
    mimics = next((m for m in (Path(f"{base}_mimics{s}") for s in IMAGE_SUFFIXES) if m.is_file()), None)
    objects = Path(f"{base}_objects.tsv")
    return TruthFiles(path, mimics, objects) if mimics and objects.is_file() else TruthFiles(path)


def _truth_id(path: Path) -> str:
    stem = scan_id_from_path(path)
    return stem[: -len("_cmb")] if stem.endswith("_cmb") else stem


def truth_files(truth: PathLike) -> Dict[str, TruthFiles]:
    """Scan id -> truth files, for a file, a phantom folder or a flat folder."""
    truth = Path(truth)
    if truth.is_file():
        return {_truth_id(truth): _truth_with_companions(truth)}
    if not truth.is_dir():
        raise InputError(truth, "no such file or folder")
    folder = truth / "truth" if (truth / "truth").is_dir() else truth
    images = [p for p in _visible_files(folder) if _image_suffix(p)]
    cmb_maps = [p for p in images if scan_id_from_path(p).endswith("_cmb")]
    chosen = cmb_maps or [p for p in images if not scan_id_from_path(p).endswith("_mimics")]
    if not chosen:
        raise InputError(truth, "no truth label maps found (<scan_id>_cmb.<ext> or <scan_id>.<ext>)")
    found: Dict[str, TruthFiles] = {}
    for path in chosen:
        scan_id = _truth_id(path)
        if scan_id in found:
            raise InputError(path, f"scan '{scan_id}' also given by {found[scan_id].cmb}")
        found[scan_id] = _truth_with_companions(path)
    return found


def evaluate_folders(pred: PathLike, truth: PathLike, rules: Sequence[str] = RULES,
                     scan_ids: Optional[Sequence[str]] = None) -> dict:
    """Metrics of every truth scan (or of ``scan_ids`` among them) against its prediction: the JSON-able result of
    ``shivacmb evaluate``."""
    for rule in rules:
        if rule not in RULES:
            raise ValueError(f"unknown rule '{rule}' (one of {', '.join(RULES)})")
    truths = truth_files(truth)
    if scan_ids is not None:
        missing = sorted(set(scan_ids) - set(truths))
        if missing:
            raise InputError(truth, f"no truth for scan '{missing[0]}'")
        truths = {scan_id: truths[scan_id] for scan_id in scan_ids}
    preds = prediction_files(pred)
    warnings: List[str] = []
    if Path(pred).is_file() and Path(truth).is_file():  # one pair: names need not agree
        preds = {next(iter(truths)): next(iter(preds.values()))}
    for scan_id in truths:
        if scan_id not in preds:
            raise InputError(pred, f"no prediction for scan '{scan_id}' (truth {truths[scan_id].cmb})")
    warnings += [f"prediction for scan '{s}' has no truth; ignored ({preds[s]})" for s in preds if s not in truths]

    per_rule: Dict[str, Dict[str, ScanMetrics]] = {rule: {} for rule in rules}
    mimics: Dict[str, MimicRates] = {}
    for scan_id, files in sorted(truths.items()):
        instances = _instances(_load_prediction(preds[scan_id]))
        truth_image = read_label_image(files.cmb)
        for rule in rules:
            per_rule[rule][scan_id] = _evaluate(instances, truth_image, rule)
        if files.mimics is not None:
            mimics[scan_id] = _mimic_rates(instances, read_label_image(files.mimics),
                                           read_mimic_classes(files.objects))

    result: dict = {"rules": {}}
    for rule, scans in per_rule.items():
        metrics = list(scans.values())
        result["rules"][rule] = {"scans": {s: m.as_dict() for s, m in scans.items()}, "pooled": pool(metrics),
                                 "pearson_r": pearson_r(metrics)}
    if mimics:
        result["mimics"] = {"scans": mimics, "pooled": pool_mimics(mimics.values())}
    result["warnings"] = warnings
    return result


def summary_table(result: dict) -> str:
    """Pooled numbers per rule (and mimic detection rates) as a plain-text table."""

    def cell(value: Optional[float], digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    header = f"{'rule':<12} {'scans':>5} {'true':>5} {'pred':>5} {'TP':>5} {'FN':>5} {'FP':>5} " \
             f"{'sens':>6} {'prec':>6} {'F1':>6} {'FPavg':>6} {'FPcmb':>6} {'R':>6}"
    lines = [header]
    for rule, entry in result["rules"].items():
        p = entry["pooled"]
        lines.append(f"{rule:<12} {p['scans']:>5} {p['n_true']:>5} {p['n_pred']:>5} {p['tp']:>5} {p['fn']:>5} "
                     f"{p['fp']:>5} {cell(p['sensitivity']):>6} {cell(p['precision']):>6} {cell(p['f1']):>6} "
                     f"{cell(p['fp_avg'], 2):>6} {cell(p['fp_cmb']):>6} {cell(entry['pearson_r']):>6}")
    if "mimics" in result:
        lines.append("mimics detected: " + ", ".join(
            f"{name} {c['detected']}/{c['instances']}" for name, c in result["mimics"]["pooled"].items()))
    return "\n".join(lines)
