"""Candidate filter: a second, small 3D network that scores a patch around each CMB candidate.

The segmentation network proposes components; the filter sees a cube of the normalised 1 mm RAS
scan around each one's peak and says how much it looks like a CMB rather than a vein, a
calcification, iron, an artefact or ordinary anatomy (the two-stage design of Dou et al., 2016).
It runs after any model, the official SHIVA-CMB folds included: when the model's box is not 1 mm
RAS with the filter's normalisation, the filter makes its own copy of the scan (``prepare_input``).

A filter is a folder with ``filter.json`` and its ONNX file: ``{"name", "version", "target":
"CMB-candidates", "description", "license", "patch": P, "threshold": T, "normalization": {...},
"file": "filter.onnx", "sha256": ...}``; the network takes ``[N, 1, P, P, P]`` patches ordered
``[x, y, z]`` (R, A, S) and gives ``[N, 1]`` probabilities. ``--fp-filter none`` switches it off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import numpy as np

from .errors import InputError
from .files import checksum
from .geometry import Geometry
from .modelstore.models import Normalization
from .resources import bundled_models_dir

DESCRIPTOR = "filter.json"
TARGET = "CMB-candidates"
DEFAULT = "shivacmb-candidate-filter"  # the embedded filter, used unless --fp-filter says otherwise
OFF = "none"


@dataclass(frozen=True)
class CandidateFilter:
    """A parsed ``filter.json``, its ONNX file checked against the recorded sha256."""

    path: Path
    name: str
    version: str
    description: str
    patch: int
    threshold: float
    normalization: Normalization
    onnx: Path
    sha256: str  # of the ONNX file, checked when loaded

    def summary(self) -> Dict[str, object]:
        return {"name": self.name, "version": self.version, "threshold": self.threshold, "patch": self.patch,
                "description": self.description}

    def input_spec(self, shape) -> SimpleNamespace:
        """The 1 mm RAS box ``prepare_input`` makes for this filter when the model's own box does not fit it."""
        return SimpleNamespace(shape=tuple(shape), spacing_mm=(1.0, 1.0, 1.0), normalization=self.normalization)

    def fits(self, grid: Geometry, normalization: Normalization) -> bool:
        """Whether a model box (its grid and normalisation) can be read by the filter as it is."""
        ras_axes = np.allclose(grid.direction_matrix, np.diag([-1.0, -1.0, 1.0]))
        return ras_axes and np.allclose(grid.spacing, 1.0) and normalization == self.normalization


def load_filter(choice: Optional[str]) -> Optional[CandidateFilter]:
    """The filter named by ``--fp-filter`` (a folder, or the embedded one's name); None for ``none``, or for the
    default when this installation has no embedded filter."""
    if choice == OFF:
        return None
    if choice is None or choice == DEFAULT:
        bundled = bundled_models_dir()
        folder = bundled / DEFAULT if bundled is not None else None
        if folder is None or not (folder / DESCRIPTOR).is_file():
            return None
    else:
        folder = Path(choice)
    descriptor = folder / DESCRIPTOR
    if not descriptor.is_file():
        raise InputError(folder, f"not a candidate filter: no {DESCRIPTOR} (or give --fp-filter none)")
    try:
        data = json.loads(descriptor.read_text(encoding="utf-8"))
        if data.get("target") != TARGET:
            raise ValueError(f"target is {data.get('target')!r}, not {TARGET!r}")
        onnx = folder / data["file"]
        if not onnx.is_file() or checksum([onnx]) != data["sha256"]:
            raise ValueError(f"{data['file']} is missing or its sha256 differs from {DESCRIPTOR}")
        patch, threshold = int(data["patch"]), float(data["threshold"])
        if patch < 8 or patch % 8 or not 0.0 < threshold < 1.0:
            raise ValueError("patch must be a multiple of 8 and the threshold between 0 and 1")
        normalization = Normalization(**data.get("normalization", {}))
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(descriptor, f"invalid candidate filter: {err}") from None
    return CandidateFilter(path=folder, name=str(data["name"]), version=str(data["version"]),
                           description=str(data.get("description", "")), patch=patch, threshold=threshold,
                           normalization=normalization, onnx=onnx, sha256=str(data["sha256"]))


def patches(volume_xyz: np.ndarray, centres_xyz: np.ndarray, size: int) -> np.ndarray:
    """Cubes of ``size`` voxels centred on integer [x, y, z] points, zero outside the volume: (N, 1, s, s, s)."""
    out = np.zeros((len(centres_xyz), 1, size, size, size), np.float32)
    shape = np.asarray(volume_xyz.shape)
    for n, centre in enumerate(np.asarray(centres_xyz, dtype=int)):
        low = centre - size // 2
        src_lo, src_hi = np.maximum(low, 0), np.minimum(low + size, shape)
        if np.any(src_hi <= src_lo):
            continue
        dst = tuple(slice(a - b, c - b) for a, b, c in zip(src_lo, low, src_hi))
        out[(n, 0) + dst] = volume_xyz[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
    return out


@dataclass
class FilterRun:
    """What the filter did in one scan (run.json ``fp_filter``)."""

    filter: CandidateFilter
    scores: List[float] = field(default_factory=list)
    rejected: List[Dict[str, object]] = field(default_factory=list)

    def summary(self) -> Dict[str, object]:
        return {**self.filter.summary(), "candidates": len(self.scores), "rejected": self.rejected}


class FilterSession:
    """The filter's onnxruntime session (CPU: a few candidates per scan) and the scoring of candidates."""

    def __init__(self, candidate_filter: CandidateFilter) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.filter = candidate_filter
        self.session = ort.InferenceSession(str(candidate_filter.onnx), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def score(self, volume_xyz: np.ndarray, centres_xyz: np.ndarray, batch: int = 64) -> np.ndarray:
        """Probability that each candidate is a CMB."""
        if len(centres_xyz) == 0:
            return np.zeros(0, np.float32)
        scores = []
        for start in range(0, len(centres_xyz), batch):
            cubes = patches(volume_xyz, centres_xyz[start:start + batch], self.filter.patch)
            scores.append(self.session.run(None, {self.input: cubes})[0].reshape(-1))
        return np.concatenate(scores).astype(np.float32)


def veto(run: FilterRun, volume_xyz: np.ndarray, volume_grid: Geometry, model_grid: Geometry
         ) -> Callable[[np.ndarray], np.ndarray]:
    """For ``find_components``: candidates' peaks ([z, y, x] of the model box) -> which to keep; records scores
    and the rejected candidates (RAS mm, score) in ``run``."""
    session = get_session(run.filter)

    def keep(peaks_zyx: np.ndarray) -> np.ndarray:
        ras = model_grid.index_to_ras(peaks_zyx[:, ::-1].astype(float))
        centres = np.rint(volume_grid.ras_to_index(ras)).astype(int).reshape(-1, 3)
        scores = session.score(volume_xyz, centres)
        run.scores.extend(float(s) for s in scores)
        run.rejected.extend({"ras": [round(float(v), 2) for v in point], "score": round(float(score), 4)}
                            for point, score in zip(ras, scores) if score < run.filter.threshold)
        return scores >= run.filter.threshold

    return keep


_SESSIONS: Dict[Path, FilterSession] = {}


def get_session(candidate_filter: CandidateFilter) -> FilterSession:
    """One session per filter file and process (a batch worker reuses it scan after scan)."""
    key = candidate_filter.onnx.resolve()
    if key not in _SESSIONS:
        _SESSIONS[key] = FilterSession(candidate_filter)
    return _SESSIONS[key]
