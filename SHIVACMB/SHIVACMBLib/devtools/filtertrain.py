"""Training the candidate filter (``fpfilter``; needs the optional ``train`` extra: torch).

    python -m SHIVACMBLib.devtools.train candidates --cache DIR --folds A.onnx [B.onnx] --out DIR
    python -m SHIVACMBLib.devtools.train fit-filter --candidates DIR --run DIR --steps 3000 --seed 1
    python -m SHIVACMBLib.devtools.train export-filter --run DIR --out DIR --threshold T
    python -m SHIVACMBLib.devtools.train screen-filter --candidates VALIDATION_DIR --run DIR

``candidates`` runs segmentation folds on prepared phantoms (``train prepare``) and cuts a cube
around the peak of every component of their mean at a low threshold (26-connected, at most a
quarter outside the brain, as ``segment`` keeps them): a CMB when it touches one, else a false
positive (on a mimic class or on anatomy). Every planted CMB and mimic is added at its own centre,
so that the filter also learns what the folds barely saw. The filter is a small 3D network
(``CandidateNet``) trained with half of each batch CMBs, half false positives and mimics, with
mirrors, shifts and the degradations of ``train.degrade``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

from ..files import atomic_path, atomic_write_text, checksum
from ..fpfilter import DESCRIPTOR, TARGET, patches
from ..postprocess import CONNECT_26, OUTSIDE_RATIO
from .selection import candidate_counts
from .synthetic import MIMIC_CLASSES
from .train import degrade, lower_ir_version, resume, run_steps

PATCH = 32
MARGIN = 4  # voxels stored around each patch for random shifts
LOW_THRESHOLD = 0.3
WIDTH = 16  # channels of the filter's first level (runs from before --width had this)
FILTER_DESCRIPTION = ("Candidate filter trained by the project on its own synthetic phantoms (atlas and procedural "
                      "heads), never on real scans: it rejects segmentation candidates that look like veins, "
                      "calcifications, iron, artefacts or anatomy. Not for clinical or research reads.")


class CandidateNet(nn.Module):
    """Three conv-norm-act pairs with pooling (``width`` times 1-2-4 channels), global average, two dense layers."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.width = width
        layers: List[nn.Module] = []
        channels = 1
        for level in range(3):
            out = width * 2 ** level
            layers += [nn.Conv3d(channels, out, 3, padding=1, bias=False), nn.BatchNorm3d(out), nn.LeakyReLU(0.01),
                       nn.Conv3d(out, out, 3, padding=1, bias=False), nn.BatchNorm3d(out), nn.LeakyReLU(0.01),
                       nn.MaxPool3d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(channels, 32), nn.LeakyReLU(0.01), nn.Linear(32, 1))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3, 4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


# --- candidates ---------------------------------------------------------------------------


def scan_candidates(volume: np.ndarray, probability: np.ndarray, cmb: np.ndarray, mimic: np.ndarray,
                    brain: np.ndarray, threshold: float = LOW_THRESHOLD) -> Dict[str, np.ndarray]:
    """Candidates of one prepared scan ([x, y, z] arrays): the folds' components and the planted objects.

    Returns centres (N, 3), kind (0 fold candidate, 1 planted CMB, 2 planted mimic), label (1 = CMB),
    cls (mimic class index + 1 touched, 0 none), truth (the truth CMB a fold candidate touches, 0 none),
    peak (the folds' peak probability, 0 for planted objects) and n_truth."""
    truth, n_truth = ndimage.label(cmb > 0, CONNECT_26)
    components, n = ndimage.label(probability >= threshold, CONNECT_26)
    rows: Dict[str, List] = {k: [] for k in ("centres", "kind", "label", "cls", "truth", "peak")}

    def add(centre, kind: int, label: int, cls: int, touched: int, peak: float) -> None:
        for key, value in zip(rows, (centre, kind, label, cls, touched, peak)):
            rows[key].append(value)

    if n:
        index = np.arange(1, n + 1)
        peaks = ndimage.maximum_position(probability, components, index)
        inside = np.asarray(ndimage.mean(brain > 0, components, index)).reshape(-1)
        boxes = ndimage.find_objects(components)
        for number, (peak, share, box) in enumerate(zip(peaks, inside, boxes), start=1):
            if share < 1 - OUTSIDE_RATIO:
                continue
            where = components[box] == number
            touched = truth[box][where]
            classes = mimic[box][where]
            add(peak, 0, int(touched.any()), int(np.bincount(classes[classes > 0]).argmax()) if classes.any() else 0,
                int(touched[touched > 0][0]) if touched.any() else 0, float(probability[peak]))
    for number, centre in enumerate(ndimage.center_of_mass(cmb > 0, truth, np.arange(1, n_truth + 1)), start=1):
        add(np.rint(centre).astype(int), 1, 1, 0, number, 0.0)
    for code in range(1, len(MIMIC_CLASSES) + 1):
        instances, count = ndimage.label(mimic == code, CONNECT_26)
        for centre in ndimage.center_of_mass(instances > 0, instances, np.arange(1, count + 1)):
            add(np.rint(centre).astype(int), 2, 0, code, 0, 0.0)
    out = {key: np.asarray(value) for key, value in rows.items()}
    out["centres"] = out["centres"].reshape(-1, 3).astype(np.int32)
    out["n_truth"] = np.asarray(n_truth)
    return out


def candidates(cache: Path, folds: Sequence[Path], out: Path, threshold: float = LOW_THRESHOLD) -> int:
    """``out/<scan>.npz`` per cached scan: patches (N, P+2M, P+2M, P+2M) float16 and the ``scan_candidates``
    table; scans done by an earlier run are kept. Returns the number of candidates written now."""
    import onnxruntime

    sessions = [onnxruntime.InferenceSession(str(f), providers=["CPUExecutionProvider"]) for f in folds]
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for path in sorted(Path(cache).glob("*.npz")):
        target = out / path.name
        if target.exists():
            continue
        data = np.load(path)
        volume = data["volume"].astype(np.float32)
        probability = np.mean([s.run(None, {s.get_inputs()[0].name: volume[None, None]})[0][0, 0] for s in sessions],
                              axis=0)
        table = scan_candidates(volume, probability, data["cmb"], data["mimic"], data["brain"], threshold)
        cubes = patches(volume, table["centres"], PATCH + 2 * MARGIN)[:, 0].astype(np.float16)
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, patches=cubes, **table)
        written += len(cubes)
        fold_fp = int(np.sum((table["kind"] == 0) & (table["label"] == 0)))
        print(f"candidates {path.stem}: {len(cubes)} ({fold_fp} false positives of the folds)", flush=True)
    return written


# --- fit ----------------------------------------------------------------------------------


class CandidateSampler:
    """Batches: half CMBs (fold candidates and planted), half negatives (fold false positives and mimics, half
    each), randomly shifted by up to ``MARGIN`` voxels, mirrored on every axis, degraded."""

    def __init__(self, files: Sequence[Path], rng: np.random.Generator) -> None:
        self.rng = rng
        loaded = [np.load(f) for f in files]
        self.patches = np.concatenate([d["patches"] for d in loaded])
        label = np.concatenate([d["label"] for d in loaded])
        kind = np.concatenate([d["kind"] for d in loaded])
        self.groups = [np.flatnonzero(label == 1), np.flatnonzero((label == 0) & (kind == 0)),
                       np.flatnonzero((label == 0) & (kind == 2))]
        if any(len(g) == 0 for g in self.groups):
            raise ValueError("candidates need CMBs, false positives of the folds and mimics")
        self.shares = (0.5, 0.25, 0.25)

    def batch(self, size: int):
        images, targets = [], []
        for _ in range(size):
            group = int(self.rng.choice(3, p=self.shares))
            cube = self.patches[self.rng.choice(self.groups[group])].astype(np.float32)
            shift = self.rng.integers(0, 2 * MARGIN + 1, 3)
            cube = cube[tuple(slice(s, s + PATCH) for s in shift)]
            for axis in range(3):
                if self.rng.random() < 0.5:
                    cube = np.flip(cube, axis)
            images.append(degrade(self.rng, np.ascontiguousarray(cube)))
            targets.append(1.0 if group == 0 else 0.0)
        return (torch.from_numpy(np.stack(images)[:, None]),
                torch.tensor(targets, dtype=torch.float32)[:, None])


def fit_filter(candidate_dirs: Sequence[Path], run: Path, steps: int, seed: int, batch: int = 32, lr: float = 1e-3,
               threads: Optional[int] = None, until: Optional[int] = None, checkpoint_every: int = 100,
               width: int = WIDTH) -> Path:
    """Train (or resume) the filter (``width``: channels of its first level); checkpoints every
    ``checkpoint_every`` steps, exact resume."""
    rng = np.random.default_rng(seed)
    files = sorted(f for d in candidate_dirs for f in Path(d).glob("*.npz"))
    sampler = CandidateSampler(files, rng)
    run.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = CandidateNet(width)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    checkpoint = run / "checkpoint.pt"
    step = resume(checkpoint, model, optimiser, rng)
    atomic_write_text(run / "config.json", json.dumps(
        {"candidates": [str(d) for d in candidate_dirs], "scans": len(files), "patches": int(len(sampler.patches)),
         "groups": [int(len(g)) for g in sampler.groups], "steps": steps, "seed": seed, "batch": batch, "lr": lr,
         "width": width, "command": " ".join(sys.argv), "torch": torch.__version__}, indent=2) + "\n")
    model.train()

    def batch_loss() -> torch.Tensor:
        images, targets = sampler.batch(batch)
        return F.binary_cross_entropy_with_logits(model.logits(images), targets)

    run_steps(run, model, optimiser, rng, batch_loss, step, steps, lr, until, checkpoint_every, log_every=50, seed=seed)
    return checkpoint


def load_filter_checkpoint(run: Path) -> CandidateNet:
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    model = CandidateNet(int(config.get("width", WIDTH)))
    model.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=False)["model"])
    return model.eval()


# --- export and screening -----------------------------------------------------------------


def export_filter(run: Path, folder: Path, threshold: float, name: str, version: str,
                  metrics: Optional[Dict] = None) -> Path:
    """``folder/filter.onnx`` (input ``patch`` [N, 1, P, P, P], output ``probability`` [N, 1]) and ``filter.json``."""
    import warnings

    import onnxruntime

    model = load_filter_checkpoint(run)
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / "filter.onnx"
    with atomic_path(onnx_path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(2, 1, PATCH, PATCH, PATCH),), str(tmp), input_names=["patch"],
                          output_names=["probability"], opset_version=17, dynamo=False,
                          dynamic_axes={"patch": {0: "n"}, "probability": {0: "n"}})
        lower_ir_version(tmp)
    x = np.random.default_rng(0).random((3, 1, PATCH, PATCH, PATCH), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    difference = float(np.abs(session.run(None, {"patch": x})[0] - expected).max())
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    descriptor = {"name": name, "version": version, "target": TARGET, "description": FILTER_DESCRIPTION,
                  "license": "Apache-2.0", "source": "SHIVACMBLib/devtools/filtertrain.py", "patch": PATCH,
                  "threshold": threshold, "normalization": {"method": "percentile", "percentile": 99, "clip": 1.3},
                  "file": onnx_path.name, "sha256": checksum([onnx_path]),
                  "training": {**{k: config[k] for k in ("scans", "patches", "groups", "steps", "seed", "batch", "lr",
                                                         "torch")}, "width": model.width,
                               "parity_max_abs_difference": float(f"{difference:.2e}")},
                  "metrics": metrics or {}}
    atomic_write_text(folder / DESCRIPTOR, json.dumps(descriptor, indent=2) + "\n")
    return folder


def screen_filter(candidate_dir: Path, run: Optional[Path], fold_thresholds: Sequence[float],
                  filter_thresholds: Sequence[float]) -> List[Dict]:
    """Overlap-rule counts on validation candidates for every (fold threshold, filter threshold): a truth CMB
    is found when a kept fold candidate touches it; a kept candidate touching none is a false positive; a
    mimic class counts the kept candidates on it. Without ``run`` the filter keeps everything."""
    model = load_filter_checkpoint(run) if run is not None else None
    files = sorted(Path(candidate_dir).glob("*.npz"))
    rows = {(u, f): {"tp": 0, "fn": 0, "fp": 0, "mimic_fp": {}} for u in fold_thresholds for f in filter_thresholds}
    for path in files:
        data = np.load(path)
        fold = data["kind"] == 0
        scores = np.ones(int(fold.sum()), np.float32)
        if model is not None and fold.any():
            cubes = data["patches"][fold][:, MARGIN:MARGIN + PATCH, MARGIN:MARGIN + PATCH, MARGIN:MARGIN + PATCH]
            with torch.no_grad():
                scores = model(torch.from_numpy(cubes.astype(np.float32)[:, None])).numpy().reshape(-1)
        peak, cls = data["peak"][fold], data["cls"][fold]
        for (u, f), row in rows.items():
            found, missed, false = candidate_counts(data, (peak >= u) & (scores >= f))
            row["tp"] += found
            row["fn"] += missed
            row["fp"] += int(false.sum())
            for code in cls[false]:
                name = MIMIC_CLASSES[code - 1] if code else "anatomy"
                row["mimic_fp"][name] = row["mimic_fp"].get(name, 0) + 1
    out = []
    for (u, f), row in rows.items():
        tp, fn, fp = row["tp"], row["fn"], row["fp"]
        out.append({"fold_threshold": u, "filter_threshold": f, "tp": tp, "fn": fn, "fp": fp,
                    "sensitivity": tp / (tp + fn) if tp + fn else None,
                    "precision": tp / (tp + fp) if tp + fp else None, "fp_avg": fp / max(len(files), 1),
                    "false_positives_on": row["mimic_fp"]})
    return out
