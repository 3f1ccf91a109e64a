"""Model folders: the ``model.json`` descriptor, checksum verification, and the installed-model registry.

A model is a folder holding ``model.json`` and its ONNX fold files (format in docs/ARCHITECTURE.md).
Models are looked up in the user model folder(s) first, then in the project's embedded
``models/``. ``SHIVACMB_MODELS`` (paths separated by ``os.pathsep``) replaces the user folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ..errors import ModelError
from ..files import checksum
from ..resources import bundled_models_dir

DESCRIPTOR = "model.json"
DEFAULT_MODEL = "shivacmb-demo-swi"
MODELS_ENV = "SHIVACMB_MODELS"
CACHE_ENV = "SHIVACMB_CACHE"
LAYOUTS = ("NDHWC", "NCDHW")
ACTIVATIONS = ("none", "sigmoid", "softmax")
NORMALIZATIONS = ("percentile", "none")


@dataclass(frozen=True)
class Fold:
    file: str
    sha256: str
    path: Path


@dataclass(frozen=True)
class Normalization:
    method: str = "percentile"
    percentile: float = 99.0
    clip: float = 1.3


@dataclass(frozen=True)
class ModelDescriptor:
    """A parsed ``model.json`` (see DESIGN: model descriptor)."""

    path: Path
    name: str
    version: str
    target: str
    modalities: Tuple[str, ...]
    description: str
    license: str
    source: str
    shape: Tuple[int, int, int]
    layout: str
    spacing_mm: Tuple[float, float, float]
    orientation: str
    normalization: Normalization
    activation: str
    channel: int
    threshold: float
    fold_floor: float
    folds: Tuple[Fold, ...]
    metrics: Dict[str, Any] = field(default_factory=dict)
    extent_threshold: Optional[float] = None  # hysteresis: a CMB's voxels reach down to it (postprocess)

    def threshold_for(self, option: Optional[float]) -> float:
        """The threshold a run uses: the option given (``--threshold``), else the model's own."""
        return self.threshold if option is None else float(option)

    def extent_for(self, threshold: float) -> float:
        """The extent threshold a run at ``threshold`` uses: the model's own, never above the threshold."""
        return threshold if self.extent_threshold is None else min(self.extent_threshold, threshold)

    def summary(self) -> Dict[str, Any]:
        """What run.json and `models list` report about this model."""
        return {
            "name": self.name,
            "version": self.version,
            "target": self.target,
            "modalities": list(self.modalities),
            "license": self.license,
            "source": self.source,
            "description": self.description,
            "threshold": self.threshold,
            **({} if self.extent_threshold is None else {"extent_threshold": self.extent_threshold}),
            "path": str(self.path),
            "folds": [{"file": f.file, "sha256": f.sha256} for f in self.folds],
        }


def extent_threshold_problem(extent: float, threshold: float) -> Optional[str]:
    """What is wrong with an extent threshold beside this threshold (None: nothing); model.json and `train export`
    both check it."""
    return None if 0.0 < extent <= threshold else f"above 0 and at most the threshold ({threshold})"


def user_model_dirs() -> List[Path]:
    """Folders where users install models: ``SHIVACMB_MODELS`` if set, else the per-user data folder."""
    env = os.environ.get(MODELS_ENV, "").strip()
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]
    import platformdirs

    return [Path(platformdirs.user_data_dir("shivacmb", appauthor=False)) / "models"]


def cache_dir() -> Path:
    """The per-user cache folder (``SHIVACMB_CACHE`` replaces it): TensorRT engines, the int8 copies of models and
    the records of their precision checks, the phantoms those checks use. Anything in it can be made again."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("shivacmb", appauthor=False))


def model_search_dirs() -> List[Path]:
    """Every folder scanned for models, in priority order."""
    dirs = user_model_dirs()
    bundled = bundled_models_dir()
    if bundled is not None:
        dirs.append(bundled)
    return dirs


def installed_models() -> List[Union[ModelDescriptor, Tuple[Path, str]]]:
    """Every model folder found, parsed; unreadable ones as (folder, problem).

    Hidden folders are installs in progress, or left by an interrupted one: never models.
    """
    found: List[Union[ModelDescriptor, Tuple[Path, str]]] = []
    for base in model_search_dirs():
        if not base.is_dir():
            continue
        for folder in sorted(p for p in base.iterdir() if not p.name.startswith(".") and (p / DESCRIPTOR).is_file()):
            try:
                found.append(read_descriptor(folder))
            except ModelError as err:
                found.append((folder, str(err)))
    return found


def find_model(name_or_dir: Optional[str]) -> Path:
    """Folder of a model given as a folder path or an installed model's name (default model if None)."""
    name = name_or_dir or DEFAULT_MODEL
    as_path = Path(name).expanduser()
    if as_path.is_dir():
        if not (as_path / DESCRIPTOR).is_file():
            raise ModelError(f"{as_path}: not a model folder (no {DESCRIPTOR})")
        return as_path
    available = []
    for entry in installed_models():
        if isinstance(entry, ModelDescriptor):
            if name in (entry.name, entry.path.name):
                return entry.path
            available.append(entry.name)
    listed = ", ".join(sorted(set(available))) or "none"
    hint = "" if name_or_dir else " (no --model given, so the default model was looked for)"
    raise ModelError(f"no model named '{name}'{hint}; installed: {listed}. "
                     "Give --model FOLDER or see `shivacmb models list`")


def load_model(name_or_dir: Optional[str], verify: bool = True) -> ModelDescriptor:
    """Find, parse and (by default) checksum-verify a model."""
    model = read_descriptor(find_model(name_or_dir))
    if verify:
        verify_model(model)
    return model


def verify_model(model: ModelDescriptor) -> None:
    """Check every fold file exists and has its sha256; the error names the bad file."""
    for fold in model.folds:
        if not fold.path.is_file():
            raise ModelError(f"{fold.path}: fold file missing (model '{model.name}')")
        actual = checksum([fold.path])
        if actual != fold.sha256.lower():
            raise ModelError(f"{fold.path}: sha256 mismatch (model '{model.name}' expects {fold.sha256}, "
                             f"file has {actual}); the file is corrupt or was replaced")


def read_descriptor(folder: Union[str, Path]) -> ModelDescriptor:
    """Parse and validate ``folder/model.json``."""
    folder = Path(folder)
    path = folder / DESCRIPTOR
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: missing") from None
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: must hold a JSON object")
    return _Parser(path, data).descriptor(folder)


class _Parser:
    """Validates descriptor fields; every error names the file and the key."""

    def __init__(self, path: Path, data: Dict[str, Any]):
        self.path = path
        self.data = data

    def fail(self, key: str, problem: str) -> ModelError:
        return ModelError(f"{self.path}: '{key}' {problem}")

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is ...:
                    raise self.fail(key, "is missing")
                return default
            node = node[part]
        if kind is float and isinstance(node, int) and not isinstance(node, bool):
            node = float(node)
        if not isinstance(node, kind) or (kind in (int, float) and isinstance(node, bool)):
            raise self.fail(key, f"must be {kind.__name__}, not {type(node).__name__}")
        return node

    def triple(self, key: str, kind: type, default: Any = ...) -> tuple:
        values = self.get(key, list, default)
        if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise self.fail(key, "must be a list of three numbers")
        if not all(v > 0 for v in values) or (kind is int and not all(float(v).is_integer() for v in values)):
            raise self.fail(key, f"must hold three positive {'integers' if kind is int else 'numbers'}")
        return tuple(kind(v) for v in values)

    def choice(self, key: str, allowed: Tuple[str, ...], default: Any = ...) -> str:
        value = self.get(key, str, default)
        if value not in allowed:
            raise self.fail(key, f"is '{value}', expected one of {', '.join(allowed)}")
        return value

    def descriptor(self, folder: Path) -> ModelDescriptor:
        target = self.get("target", str)
        if target.upper() != "CMB":
            raise self.fail("target", f"is '{target}': this is not a cerebral microbleed (CMB) model")
        orientation = self.get("input.orientation", str, "RAS")
        if orientation != "RAS":
            raise self.fail("input.orientation", f"is '{orientation}'; only RAS model grids are supported")
        threshold = self.get("threshold", float, 0.5)
        if not 0.0 < threshold < 1.0:
            raise self.fail("threshold", f"is {threshold}, expected a value between 0 and 1")
        extent = self.get("extent_threshold", float, None)
        problem = None if extent is None else extent_threshold_problem(extent, threshold)
        if problem:
            raise self.fail("extent_threshold", f"is {extent}, expected a value {problem}")
        return ModelDescriptor(
            path=folder,
            name=self.get("name", str),
            version=str(self.data.get("version", "")),
            target="CMB",
            modalities=tuple(self.get("modalities", list, [])),
            description=self.get("description", str, ""),
            license=self.get("license", str, ""),
            source=self.get("source", str, ""),
            shape=self.triple("input.shape", int),
            layout=self.choice("input.layout", LAYOUTS),
            spacing_mm=self.triple("input.spacing_mm", float, [1.0, 1.0, 1.0]),
            orientation=orientation,
            normalization=self.normalization(),
            activation=self.choice("output.activation", ACTIVATIONS, "none"),
            channel=self.get("output.channel", int, 0),
            threshold=threshold,
            fold_floor=self.get("fold_floor", float, 0.001),
            folds=self.folds(folder),
            metrics=self.get("metrics", dict, {}),
            extent_threshold=extent,
        )

    def normalization(self) -> Normalization:
        method = self.choice("input.normalization.method", NORMALIZATIONS, "percentile")
        percentile = self.get("input.normalization.percentile", float, 99.0)
        clip = self.get("input.normalization.clip", float, 1.3)
        if not 0 < percentile <= 100 or clip <= 0:
            raise self.fail("input.normalization", "needs 0 < percentile <= 100 and clip > 0")
        return Normalization(method, percentile, clip)

    def folds(self, folder: Path) -> Tuple[Fold, ...]:
        entries = self.get("folds", list)
        if not entries:
            raise self.fail("folds", "is empty: a model needs at least one fold file")
        folds = []
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                    or not isinstance(entry.get("sha256"), str):
                raise self.fail(f"folds[{n}]", "must be an object with string 'file' and 'sha256'")
            rel = Path(entry["file"])
            if rel.is_absolute() or ".." in rel.parts:
                raise self.fail(f"folds[{n}].file", "must be a path inside the model folder")
            if len(entry["sha256"]) != 64:
                raise self.fail(f"folds[{n}].sha256", "must be a 64-character hex sha256")
            folds.append(Fold(entry["file"], entry["sha256"].lower(), folder / rel))
        return tuple(folds)

