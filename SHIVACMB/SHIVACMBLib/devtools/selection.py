"""Choosing on validation phantoms: a model's metrics per threshold (``calibrate``, through ``segment``),
every ensemble of some folds per threshold on prepared arrays (``screen``), both by the overlap rule with
mimic detections, two folds' candidates compared scan by scan (``compare``) and the CMBs a fold finds by
size (``found_by_size``). Used by ``train calibrate``, ``screen``, ``compare`` and ``sizes``."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..postprocess import CONNECT_26
from .synthetic import MIMIC_CLASSES


def calibrate(model_dir: Path, phantoms: Path, work: Path, thresholds: Sequence[float]) -> List[Dict]:
    """Overlap-rule metrics and mimic detections of a model on validation phantoms, per threshold.

    Every phantom is segmented once at the lowest threshold; a higher threshold keeps the CMBs whose
    maximum probability reaches it (a component that a higher threshold would split counts once).
    """
    from ..evaluate import evaluate_pair, pool, pool_mimics, read_mimic_classes, truth_files
    from ..inference import get_ensemble
    from ..modelstore.models import load_model
    from ..pipeline import LABELS_NAME, SegmentOptions, segment
    from ..scan import read_label_image

    model = load_model(str(model_dir))
    ensemble = get_ensemble(model, "auto")
    thresholds = sorted(thresholds)
    scans: Dict[float, list] = {t: [] for t in thresholds}
    mimics: Dict[float, list] = {t: [] for t in thresholds}
    for scan_id, truth in sorted(truth_files(phantoms).items()):
        options = SegmentOptions(threshold=thresholds[0], report=False, location=False)
        result = segment(phantoms / f"{scan_id}.nii.gz", work, options, model=model, ensemble=ensemble)
        labels = read_label_image(result.output_dir / next(f for f in result.files if f.startswith(LABELS_NAME)))
        array = sitk.GetArrayViewFromImage(labels)
        truth_image, mimic_image = read_label_image(truth.cmb), read_label_image(truth.mimics)
        classes = read_mimic_classes(truth.objects)
        for t in thresholds:
            keep = np.zeros(len(result.findings) + 1, dtype=array.dtype)
            for finding in result.findings:
                keep[finding.cmb_id] = finding.cmb_id if finding.max_prob >= t else 0
            kept = sitk.GetImageFromArray(keep[array])
            kept.CopyInformation(labels)
            metrics = evaluate_pair(kept, truth_image, "overlap", mimic_image, classes)
            scans[t].append(metrics)
            mimics[t].append(metrics.mimics)
        print(f"calibrated {scan_id}", flush=True)
    return [{"threshold": t, **pool(scans[t]), "mimics": pool_mimics(mimics[t])} for t in thresholds]


def screen(cache: Path, folds: Sequence[Path], thresholds: Sequence[float]) -> List[Dict]:
    """Every ensemble of ``folds`` (the project's own ONNX folds), per threshold, on prepared
    validation phantoms (``prepare``): a quick comparison in the model box, to choose which folds to
    ship before ``calibrate`` measures the chosen model through ``segment``.

    Each fold runs once per scan; an ensemble is the mean of its folds' probabilities. Components of
    the mean at the lowest threshold (26-connected, dropped when over a quarter lies outside the
    brain) are kept at a threshold when their peak reaches it. A truth CMB (a component of the cached
    CMB mask) is found when a kept component touches it; a kept component touching no CMB is a false
    positive; a mimic (a component of one class's cached mask) is detected when a kept one touches it.
    """
    import itertools

    import onnxruntime
    from scipy import ndimage

    from ..postprocess import OUTSIDE_RATIO

    sessions = [onnxruntime.InferenceSession(str(f), providers=["CPUExecutionProvider"]) for f in folds]
    subsets = [c for k in range(1, len(folds) + 1) for c in itertools.combinations(range(len(folds)), k)]
    thresholds = sorted(thresholds)
    counts = {(c, t): {"tp": 0, "fn": 0, "fp": 0, "mimics": {m: [0, 0] for m in MIMIC_CLASSES}}
              for c in subsets for t in thresholds}
    files = sorted(Path(cache).glob("*.npz"))
    for path in files:
        data = np.load(path)
        x = data["volume"].astype(np.float32)[None, None]
        probabilities = [s.run(None, {s.get_inputs()[0].name: x})[0][0, 0] for s in sessions]
        truth, n_truth = ndimage.label(data["cmb"] > 0, CONNECT_26)
        mimics = {m: ndimage.label(data["mimic"] == code + 1, CONNECT_26) for code, m in enumerate(MIMIC_CLASSES)}
        brain = data["brain"] > 0
        for subset in subsets:
            mean = np.mean([probabilities[i] for i in subset], axis=0)
            components, n = ndimage.label(mean >= thresholds[0], CONNECT_26)
            index = np.arange(1, n + 1)
            peak = np.asarray(ndimage.maximum(mean, components, index)).reshape(-1)
            inside = np.asarray(ndimage.mean(brain, components, index)).reshape(-1)
            valid = np.concatenate([[False], inside >= 1 - OUTSIDE_RATIO])
            voxels = np.nonzero(components)  # the (component, instance) pairs that touch, found once
            owner = components[voxels]
            touches = {key: _pairs(owner, labels[voxels]) for key, (labels, _) in [("cmb", (truth, n_truth)),
                                                                                  *mimics.items()]}
            for t in thresholds:
                kept = valid & np.concatenate([[False], peak >= t])
                cmb_pairs = touches["cmb"][kept[touches["cmb"][:, 0]]]
                found = len(np.unique(cmb_pairs[:, 1]))
                row = counts[(subset, t)]
                row["tp"] += found
                row["fn"] += n_truth - found
                row["fp"] += int(np.count_nonzero(kept)) - len(np.unique(cmb_pairs[:, 0]))
                for m, (_, n_m) in mimics.items():
                    row["mimics"][m][0] += len(np.unique(touches[m][kept[touches[m][:, 0]], 1]))
                    row["mimics"][m][1] += n_m
        print(f"screened {path.stem}", flush=True)
    unique = len({Path(f).name for f in folds}) == len(folds)
    names = [Path(f).name if unique else str(f) for f in folds]
    rows = []
    for (subset, t), row in counts.items():
        tp, fn, fp = int(row["tp"]), int(row["fn"]), int(row["fp"])
        rows.append({"folds": [names[i] for i in subset],
                     "threshold": t, "tp": tp, "fn": fn, "fp": fp,
                     "sensitivity": tp / (tp + fn) if tp + fn else None,
                     "precision": tp / (tp + fp) if tp + fp else None,
                     "f1": 2 * tp / (2 * tp + fn + fp) if tp + fn + fp else None,
                     "fp_avg": fp / max(len(files), 1),
                     "mimics": {m: {"detected": int(d), "instances": int(i)} for m, (d, i) in row["mimics"].items() if i}})
    return rows


def candidate_counts(data: Mapping[str, np.ndarray], kept: np.ndarray) -> Tuple[int, int, np.ndarray]:
    """Overlap-rule counts of one scan's candidates (``train candidates``) when the fold candidates ``kept``
    stay: CMBs found (touched by a kept candidate), CMBs missed, and the mask of kept false positives."""
    fold = data["kind"] == 0
    truth, label = data["truth"][fold], data["label"][fold]
    found = len(set(truth[kept & (label == 1)].tolist()))
    return found, int(data["n_truth"]) - found, kept & (label == 0)


def compare(first: Path, second: Path, thresholds: Tuple[float, float], resamples: int = 2000,
            seed: int = 0) -> Dict:
    """Two folds' candidates on the same validation scans, each at its threshold: pooled F1 of each and a
    paired bootstrap over the scans of the difference (second minus first), with its 95 % interval and the
    share of resamples in which the second is ahead. Tells a real difference from the spread of the set."""
    if resamples < 1:
        raise ValueError(f"--resamples {resamples}: at least one resample")
    names = sorted(path.name for path in Path(first).glob("*.npz"))
    others = sorted(path.name for path in Path(second).glob("*.npz"))
    if not names or names != others:
        raise ValueError(f"{first} and {second} must hold candidates of the same scans "
                         f"({len(names)} and {len(others)} files, {len(set(names) ^ set(others))} in one only)")
    counts = np.zeros((len(names), 2, 3), np.int64)  # scan, fold, (tp, fn, fp)
    for i, name in enumerate(names):
        for j, (folder, threshold) in enumerate(zip((first, second), thresholds)):
            data = np.load(Path(folder) / name)
            tp, fn, false = candidate_counts(data, data["peak"][data["kind"] == 0] >= threshold)
            counts[i, j] = tp, fn, int(false.sum())

    def f1(totals: np.ndarray) -> np.ndarray:
        tp, fn, fp = totals[..., 0], totals[..., 1], totals[..., 2]
        return 2 * tp / np.maximum(2 * tp + fn + fp, 1)

    picks = np.random.default_rng(seed).integers(0, len(names), (resamples, len(names)))
    boot = f1(counts[picks].sum(axis=1))  # resample, fold
    difference = boot[:, 1] - boot[:, 0]
    pooled = counts.sum(axis=0)
    scores = f1(pooled)
    return {"scans": len(names), "resamples": resamples, "seed": seed,
            "folds": [{"candidates": str(folder), "threshold": t, "tp": int(c[0]), "fn": int(c[1]), "fp": int(c[2]),
                       "f1": float(s)} for folder, t, c, s in zip((first, second), thresholds, pooled, scores)],
            "difference": float(scores[1] - scores[0]),
            "interval": [float(v) for v in np.percentile(difference, [2.5, 97.5])],
            "second_ahead": float(np.mean(difference > 0))}


SIZE_BINS_MM = (3.0, 5.0)  # the CMB sizes: <= 3 mm, 3-5 mm, > 5 mm


def found_by_size(candidates: Path, cache: Path, threshold: float) -> Dict[str, List[int]]:
    """Per CMB size, the truth CMBs a fold's candidates (``train candidates``) find at ``threshold`` and all of them
    (``[found, planted]``). A CMB's size is the diameter of the sphere of its voxels' volume in the prepared
    scan (``cache``: ``train prepare``'s 1 mm model box), its truth number as in the candidates' table."""
    from scipy import ndimage

    names = ("<= 3 mm", "3-5 mm", "> 5 mm")
    counts = {name: [0, 0] for name in names}
    files = sorted(Path(candidates).glob("*.npz"))
    if not files:
        raise ValueError(f"{candidates}: no candidates (train candidates writes them)")
    for path in files:
        prepared = Path(cache) / path.name
        if not prepared.is_file():
            raise ValueError(f"{prepared}: no prepared scan for the candidates {path}")
        data = np.load(path)
        truth, n = ndimage.label(np.load(prepared)["cmb"] > 0, CONNECT_26)
        if n != int(data["n_truth"]):
            raise ValueError(f"{path}: {int(data['n_truth'])} CMBs, but {prepared} holds {n}")
        diameters = np.cbrt(6 * np.bincount(truth.ravel(), minlength=n + 1)[1:] / np.pi)
        kept = (data["kind"] == 0) & (data["label"] == 1) & (data["peak"] >= threshold)
        found = np.isin(np.arange(1, n + 1), data["truth"][kept])
        for bin_, hit in zip(np.digitize(diameters, SIZE_BINS_MM, right=True), found):
            counts[names[bin_]][0] += int(hit)
            counts[names[bin_]][1] += 1
    return counts


def _pairs(owner: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Distinct (component, instance) rows where a component's voxels (``owner``) meet instance ``labels`` > 0."""
    touching = labels > 0
    return np.unique(np.column_stack([owner[touching], labels[touching]]), axis=0).reshape(-1, 2)


def calibration_table(rows: Sequence[Dict]) -> str:
    """One line per threshold: pooled overlap-rule metrics and the detected share of each mimic class."""
    classes = sorted({name for row in rows for name in row["mimics"]})
    lines = [f"{'threshold':>9} {'TP':>4} {'FN':>4} {'FP':>4} {'sens':>6} {'prec':>6} {'F1':>6} {'FPavg':>6}  "
             + " ".join(f"{c:>13}" for c in classes)]
    for row in rows:
        rates = " ".join(f"{row['mimics'][c]['detected']:>6}/{row['mimics'][c]['instances']:<6}" if c in row["mimics"]
                         else f"{'-':>13}" for c in classes)
        lines.append(f"{row['threshold']:>9.3f} {row['tp']:>4} {row['fn']:>4} {row['fp']:>4} "
                     f"{row['sensitivity'] or 0:>6.3f} {row['precision'] or 0:>6.3f} {row['f1'] or 0:>6.3f} "
                     f"{row['fp_avg']:>6.2f}  {rates}")
    return "\n".join(lines)
