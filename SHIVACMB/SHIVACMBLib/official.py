"""Install TensorFlow/Keras SHIVA-CMB weights as an ONNX model: `shivacmb models install|convert|verify --parity`.

The official downloads (SHiVAi layout) hold a descriptor JSON (``model_info.json``: ``target``,
``modalities``, ``version``, ``files`` = [{"name", "md5"}], one per fold) and the fold files: Keras
``.h5`` (v1) or SavedModel folders (v2). A file's ``name`` is relative to the descriptor's folder
or to its parent (SHiVAi writes ``<model folder>/<fold>``); a folder's md5 is SHiVAi's: the bytes
of all its files in sorted path order. Installing verifies the zip's sha256 (when given) and
every md5, converts each fold (:mod:`tfconvert`), checks parity with the TF original on a phantom
(:mod:`parity`) and writes ``model.json`` with the sources kept in ``source/`` for later parity
checks. All of it happens in a hidden folder renamed into place at the end: a failure leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .errors import InputError, ModelError
from .files import atomic_write_text, checksum, staged_directory
from .models import DESCRIPTOR, ModelDescriptor, read_descriptor, user_model_dirs
from .parity import FP32_TOLERANCE, REDUCED_TOLERANCE, Parity, compare, describe_input, parity_input

SHIVA_BOX = (160, 214, 176)  # SHiVAi's model input, used when a fold accepts any size
SOURCE_DIR = "source"
LICENSE = "CC-BY-NC-SA-4.0"
MIXED_TOLERANCE = 5e-3  # an fp16 original differs from exact arithmetic by its own rounding
VALUE_PRESERVING = ("Cast", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze")  # after the activation
Say = Callable[[str], None]


@dataclass
class SourceModel:
    """A descriptor JSON and its fold files, before conversion."""

    descriptor: Path
    data: Dict[str, Any]
    folds: List[Path]
    md5: List[Optional[str]]

    @property
    def root(self) -> Path:
        return self.descriptor.parent


@dataclass
class Converted:
    """What `install`/`convert` produced."""

    folder: Path
    model: ModelDescriptor
    parity: List[Parity] = field(default_factory=list)
    seconds: float = 0.0


def md5_of(path: Path) -> str:
    """md5 of a file, or of a folder as SHiVAi computes it (every file's bytes, sorted paths)."""
    digest = hashlib.md5()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for name in files:
        with open(name, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def unpack(source: Path, into: Path, sha256: Optional[str] = None) -> Path:
    """A zip extracted into ``into`` (sha256 checked first; no member may leave it), or a folder copied."""
    if not source.exists():
        raise InputError(source, "no such file or folder")
    if source.is_dir():
        if sha256:
            raise InputError(source, "--sha256 checks a downloaded zip, not a folder")
        shutil.copytree(source, into, dirs_exist_ok=True)
        return into
    if sha256 and checksum([source]) != sha256.lower():
        raise ModelError(f"{source}: sha256 mismatch (expected {sha256.lower()}, file has {checksum([source])}); "
                         "the download is incomplete or not the published file")
    try:
        with zipfile.ZipFile(source) as archive:
            for member in archive.namelist():
                parts = PurePosixPath(member).parts
                if member.startswith(("/", "\\")) or ".." in parts or ":" in member:
                    raise InputError(source, f"zip member '{member}' would land outside the model folder")
            archive.extractall(into)
    except zipfile.BadZipFile:
        raise InputError(source, "not a zip file or a folder of SHIVA-CMB weights") from None
    return into


def find_descriptor(root: Path) -> Path:
    """The one SHiVAi descriptor (JSON with a 'files' list) under ``root``."""
    found = []
    for path in sorted(root.rglob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("files"), list):
            found.append(path)
    if not found:
        raise ModelError(f"{root}: no model descriptor (a JSON file with a 'files' list, e.g. model_info.json)")
    if len(found) > 1:
        listed = ", ".join(str(p.relative_to(root)) for p in found)
        raise ModelError(f"{root}: several model descriptors ({listed}); give the folder of one of them")
    return found[0]


def read_source(descriptor: Path, check_md5: bool = True) -> SourceModel:
    """Parse a SHiVAi descriptor, find its folds and check their md5; refuses non-CMB models."""
    data = json.loads(descriptor.read_text(encoding="utf-8"))
    target = str(data.get("target", ""))
    if target.upper() != "CMB":
        raise ModelError(f"{descriptor}: target is '{target}': these weights do not segment cerebral "
                         "microbleeds (CMB)")
    if "script" in data:
        raise ModelError(f"{descriptor}: the model needs its Python script ({data['script'].get('name')}); "
                         "models defined by code are not converted (only .h5 and SavedModel folds)")
    entries = data.get("files") or []
    if not entries or not all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries):
        raise ModelError(f"{descriptor}: 'files' must list the folds as objects with 'name' and 'md5'")
    folds, sums, missing, corrupt = [], [], [], []
    for entry in entries:
        path = _locate(descriptor.parent, entry["name"])
        if path is None:
            missing.append(entry["name"])
            continue
        folds.append(path)
        sums.append(entry.get("md5"))
        if check_md5 and entry.get("md5") and md5_of(path) != str(entry["md5"]).lower():
            corrupt.append(entry["name"])
    if missing:
        raise ModelError(f"{descriptor}: fold(s) missing: {', '.join(missing)}")
    if corrupt:
        raise ModelError(f"{descriptor}: md5 mismatch for {', '.join(corrupt)}; the file(s) are corrupt or "
                         "not the published ones")
    return SourceModel(descriptor, data, folds, sums)


def md5_summary(model: SourceModel) -> str:
    """'md5 verified', or which folds the descriptor gives no md5 for (those could not be checked)."""
    unchecked = [path.name for path, md5 in zip(model.folds, model.md5) if not md5]
    if not unchecked:
        return "md5 verified"
    return f"md5 verified for {len(model.folds) - len(unchecked)}, NOT checked (no md5 given) for {', '.join(unchecked)}"


def _locate(folder: Path, name: str) -> Optional[Path]:
    rel = PurePosixPath(name.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts:
        return None
    for base in (folder, folder.parent):
        if (base / rel).exists():
            return base / rel
    return None


def default_name(data: Dict[str, Any]) -> str:
    modalities = "-".join(str(m).lower() for m in data.get("modalities") or ["swi"])
    version = str(data.get("version") or "").lower()
    return slug(f"shiva-cmb-{modalities}" + (f"-{version}" if version else ""))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


def install(source: Path, name: Optional[str] = None, sha256: Optional[str] = None, force: bool = False,
            parity_scan: Optional[Path] = None, say: Say = print) -> Converted:
    """Install official SHIVA-CMB weights (zip or folder) into the first user model folder."""
    from .tfconvert import require_converter

    require_converter()
    base = user_model_dirs()[0]
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".unpack-", dir=base) as tmp:  # same disk: moves, not copies
        scratch = Path(tmp)
        unpack(source, scratch, sha256)
        model = read_source(find_descriptor(scratch))
        say(f"{source}: {len(model.folds)} fold(s), {md5_summary(model)} ({model.descriptor.name}: target "
            f"{model.data.get('target')}, modalities {model.data.get('modalities')}, "
            f"version {model.data.get('version')})")
        final = base / slug(name or default_name(model.data))
        _check_free(final, force)
        meta = {"name": final.name, "version": str(model.data.get("version", "")),
                "modalities": [str(m).lower() for m in model.data.get("modalities") or ["swi"]],
                "license": LICENSE, "source": f"SHIVA-CMB weights ({source.name})",
                "description": f"SHIVA-CMB {model.data.get('version', '')} by {model.data.get('author') or 'the SHIVA-CMB authors'}"
                               f" ({model.data.get('release date') or 'undated'}), converted from TensorFlow to ONNX"}
        with staged_directory(final) as stage:
            kept = stage / SOURCE_DIR
            kept.mkdir()
            for entry in scratch.iterdir():
                os.replace(entry, kept / entry.name)
            moved = [kept / p.relative_to(scratch) for p in model.folds]
            result = build(stage, moved, meta, model.md5, parity_scan, say,
                           source_descriptor=str(PurePosixPath(SOURCE_DIR, *model.descriptor.relative_to(scratch).parts)))
    return _relocated(result, final)


def convert(source: Path, out: Path, name: Optional[str] = None, force: bool = False,
            parity_scan: Optional[Path] = None, say: Say = print) -> Converted:
    """Convert one Keras/SavedModel fold into a model folder ``out`` (model.json + fold0.onnx)."""
    from .tfconvert import fold_kind, require_converter

    require_converter()
    if not source.exists():
        raise InputError(source, "no such file or folder")
    fold_kind(source)
    _check_free(out, force)
    meta = {"name": slug(name or source.stem), "version": "", "modalities": ["swi"], "license": "",
            "source": str(source.resolve()), "description": f"converted from {source.name} to ONNX"}
    with staged_directory(out) as stage:
        kept = stage / SOURCE_DIR / source.name
        kept.parent.mkdir()
        if source.is_dir():
            shutil.copytree(source, kept)
        else:
            shutil.copy2(source, kept)
        result = build(stage, [kept], meta, [md5_of(kept)], parity_scan, say)
    return _relocated(result, out)


def _check_free(folder: Path, force: bool) -> None:
    if folder.exists() and not force:
        raise ModelError(f"{folder}: already exists; give another --name/--out or --force to replace it")


def _relocated(result: Converted, folder: Path) -> Converted:
    result.folder = folder
    result.model = read_descriptor(folder)
    return result


def build(folder: Path, folds: Sequence[Path], meta: Dict[str, Any], md5s: Sequence[Optional[str]],
          parity_scan: Optional[Path], say: Say, source_descriptor: Optional[str] = None) -> Converted:
    """Convert every fold into ``folder``, write model.json, check parity (failing = ModelError)."""
    import onnx

    from .tfconvert import OPSET, converter_versions, load_fold, to_onnx

    started = time.perf_counter()
    entries, records, loaded, shape, proto = [], [], [], None, None
    for index, path in enumerate(folds):
        clock = time.perf_counter()
        fold = load_fold(path)
        box = tuple(fold.input_shape[1:4]) if all(fold.input_shape[1:4]) else SHIVA_BOX
        if shape is not None and box != shape:
            raise ModelError(f"{path}: input box {box} differs from the first fold's {shape}")
        shape = box
        proto = to_onnx(fold)
        target = folder / f"fold{index}.onnx"
        onnx.save(proto, str(target))
        say(f"fold {index}: {path.name} ({fold.kind}, loaded by {fold.loader}"
            f"{', mixed_float16' if fold.mixed_precision else ''}) -> {target.name} in {time.perf_counter() - clock:.1f} s")
        entries.append({"file": target.name, "sha256": checksum([target])})
        records.append({"source": str(PurePosixPath(*path.relative_to(folder).parts)), "md5": md5s[index],
                        "kind": fold.kind, "loader": fold.loader, "mixed_precision": fold.mixed_precision})
        loaded.append(fold)
    activation, channel = output_rule(proto)
    descriptor = {**meta, "target": "CMB",
                  "input": {"shape": list(shape), "layout": "NDHWC", "spacing_mm": [1, 1, 1], "orientation": "RAS",
                            "normalization": {"method": "percentile", "percentile": 99, "clip": 1.3}},
                  "output": {"activation": activation, "channel": channel},
                  "threshold": 0.5, "fold_floor": 0.001, "folds": entries,
                  "conversion": {"tools": converter_versions(), "opset": OPSET, "source_descriptor": source_descriptor,
                                 "folds": records}}
    atomic_write_text(folder / DESCRIPTOR, json.dumps(descriptor, indent=2) + "\n")
    seconds = time.perf_counter() - started
    parities = check_parity(read_descriptor(folder), loaded, parity_scan, say)
    descriptor["conversion"]["seconds"] = round(seconds, 1)
    descriptor["conversion"]["parity"] = {"input": describe_input(parity_scan),
                                          "folds": [p.as_dict() for p in parities]}
    atomic_write_text(folder / DESCRIPTOR, json.dumps(descriptor, indent=2) + "\n")
    failed = [i for i, p in enumerate(parities) if not p.passed]
    if failed:
        raise ModelError(f"{folds[failed[0]]}: the ONNX conversion does not compute what the original computes "
                         f"({parities[failed[0]].text()}); nothing was installed")
    return Converted(folder, read_descriptor(folder), parities, seconds)


def output_rule(proto: Any) -> Tuple[str, int]:
    """(activation, channel) for model.json: 'none' when the graph ends in a sigmoid/softmax."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    output = proto.graph.output[0]
    node = producers.get(output.name)
    while node is not None and node.op_type in VALUE_PRESERVING:
        node = producers.get(node.input[0])
    dims = output.type.tensor_type.shape.dim
    channels = dims[-1].dim_value if dims and dims[-1].dim_value else 1
    if node is not None and node.op_type in ("Sigmoid", "Softmax"):
        activation = "none"
    else:
        activation = "softmax" if channels > 1 else "sigmoid"
    return activation, channels - 1  # one channel: 0; background + CMB: the last


def check_parity(model: ModelDescriptor, folds: Sequence[Any], scan: Optional[Path], say: Say) -> List[Parity]:
    """Each TF fold and its ONNX conversion (onnxruntime, CPU) on the same normalised input."""
    from .inference import FoldEnsemble, model_layout, to_probability
    from .tfconvert import tf_predict

    feed = model_layout(parity_input(model, scan), model.layout)
    say(f"parity check on {describe_input(scan)}, box {model.shape}")
    results = []
    for index, (fold, raw) in enumerate(zip(folds, FoldEnsemble(model, "cpu").raw_outputs(feed))):
        reference = to_probability(tf_predict(fold, feed), model)
        tolerance = MIXED_TOLERANCE if fold.mixed_precision else FP32_TOLERANCE
        result = compare(reference, to_probability(raw, model), model.threshold, tolerance)
        say(f"fold {index}: {'ok' if result.passed else 'FAILED'}  {result.text()}")
        results.append(result)
    return results


def verify_parity(model: ModelDescriptor, scan: Optional[Path] = None, say: Say = print) -> List[Parity]:
    """Re-run the parity check of an installed converted model against the sources it keeps."""
    from .tfconvert import load_fold

    data = json.loads((model.path / DESCRIPTOR).read_text(encoding="utf-8"))
    records = (data.get("conversion") or {}).get("folds")
    if not records or len(records) != len(model.folds):
        raise ModelError(f"{model.path / DESCRIPTOR}: no conversion record for every fold: this model was not "
                         "converted by `shivacmb models install/convert`, there is no original to compare with")
    folds = []
    for record in records:
        path = model.path / record["source"]
        if not path.exists():
            raise ModelError(f"{path}: original fold missing (model '{model.name}')")
        if record.get("md5") and md5_of(path) != record["md5"]:
            raise ModelError(f"{path}: md5 mismatch; the original fold was changed since it was installed")
        folds.append(load_fold(path))
    return check_parity(model, folds, scan, say)


def precision_parity(model: ModelDescriptor, device: str, precision: str, scan: Optional[Path] = None,
                     say: Say = print) -> Parity:
    """``precision`` on ``device`` against fp32 on onnxruntime's own CPU kernels: the mean of the folds, as
    `segment` uses it."""
    from .inference import CPU, FoldEnsemble

    volume = parity_input(model, scan)
    reference, _ = FoldEnsemble(model, "cpu", providers=[CPU]).predict(volume)
    reduced = FoldEnsemble(model, device, precision=precision)
    result = compare(reference, reduced.predict(volume)[0], model.threshold, REDUCED_TOLERANCE, detections=True)
    for note in reduced.warnings:
        say(f"warning: {note}")
    say(f"{reduced.running_precision} on {reduced.provider} vs fp32 on {CPU}: {'ok' if result.passed else 'DIFFERS'}  "
        f"{result.text()}")
    return result
