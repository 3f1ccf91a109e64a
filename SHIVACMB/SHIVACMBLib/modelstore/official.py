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

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from ..errors import InputError, ModelError, RuntimeFailure, ShivaError, one_line
from ..files import atomic_write_text, checksum, safe_name, staged_directory
from .models import DESCRIPTOR, ModelDescriptor, read_descriptor, user_model_dirs
from .parity import FP32_TOLERANCE, Parity, compare, describe_input, parity_input

SHIVA_BOX = (160, 214, 176)  # SHiVAi's model input, used when a fold accepts any size
SOURCE_DIR = "source"
LICENSE = "CC-BY-NC-SA-4.0"
MIXED_TOLERANCE = 5e-3  # an fp16 original differs from exact arithmetic by its own rounding
VALUE_PRESERVING = ("Cast", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze")  # after the activation
Say = Callable[[str], None]
MAX_MEMBERS = 10_000  # zip limits checked before anything is written
MAX_UNPACKED = 16 * 2**30
MAX_RATIO = 100  # expansion of one member (weights barely compress; zip bombs expand thousands of times)
MIN_BOMB_BYTES = 2**20  # small members (JSON) may compress well


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
    """A zip extracted into ``into`` (sha256 and :func:`check_archive` first), or a folder copied."""
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
            members = check_archive(source, archive)
            free = shutil.disk_usage(next(p for p in [into, *into.parents] if p.exists())).free
            needed = sum(m.file_size for m in members)
            if needed > free:
                raise RuntimeFailure(f"{source}: unpacking needs {needed / 2**20:.0f} MB, {into.parent} has "
                                     f"{free / 2**20:.0f} MB free")
            for member in members:
                _extract(source, archive, member, into)
    except zipfile.BadZipFile as err:
        raise InputError(source, f"not a zip file or a folder of SHIVA-CMB weights ({err})") from None
    return into


def check_archive(source: Path, archive: zipfile.ZipFile) -> List[zipfile.ZipInfo]:
    """The members of a zip, refused before anything is written when one could leave the folder, is a
    link or a device, or when the sizes its directory announces make it a zip bomb."""
    members = archive.infolist()
    if len(members) > MAX_MEMBERS:
        raise InputError(source, f"zip holds {len(members)} members, more than the {MAX_MEMBERS} a model can have")
    total = 0
    for member in members:
        name = member.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or ".." in parts or ":" in name:
            raise InputError(source, f"zip member '{name}' would land outside the model folder")
        kind = stat.S_IFMT(member.external_attr >> 16)
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            what = "a symbolic link" if kind == stat.S_IFLNK else "a device, pipe or socket"
            raise InputError(source, f"zip member '{name}' is {what}; model files are plain files")
        if member.file_size > MIN_BOMB_BYTES and member.file_size > MAX_RATIO * max(member.compress_size, 1):
            ratio = member.file_size / max(member.compress_size, 1)
            raise InputError(source, f"zip member '{name}' expands {ratio:.0f} times ({member.file_size / 2**20:.0f} "
                                     "MB): not model weights")
        total += member.file_size
    if total > MAX_UNPACKED:
        raise InputError(source, f"zip expands to {total / 2**30:.1f} GiB, more than the "
                                 f"{MAX_UNPACKED / 2**30:.0f} GiB a model can have")
    return members


def _extract(source: Path, archive: zipfile.ZipFile, member: zipfile.ZipInfo, into: Path) -> None:
    """One checked member, never more bytes than its directory entry announces; errors name the member."""
    target = into.joinpath(*PurePosixPath(member.filename.replace("\\", "/")).parts)
    try:
        if member.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(member) as stream, open(target, "xb") as copy:
            shutil.copyfileobj(stream, copy, 1 << 20)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise InputError(source, f"zip member '{member.filename}' is corrupt ({one_line(err)})") from None
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise InputError(source, f"zip member '{member.filename}' clashes with another member") from None
    except OSError as err:
        raise RuntimeFailure(f"{source}: cannot unpack '{member.filename}': {err.strerror or err}") from None


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
    """Install official SHIVA-CMB weights (zip or folder) into the first user model folder.

    TensorFlow is imported only once the download has passed its checks, when the first fold is
    converted; errors name the download and its members, never the hidden folders they were unpacked into.
    """
    from .tfconvert import check_converter

    check_converter()
    if name is not None:
        safe_name(name, "--name")
    base = user_model_dirs()[0]
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".unpack-", dir=base) as tmp:  # same disk: moves, not copies
        scratch = Path(tmp)
        places = {scratch: str(source)}
        with _errors_named(places, source):
            unpack(source, scratch, sha256)
            model = read_source(find_descriptor(scratch))
            say(f"{source}: {len(model.folds)} fold(s), {md5_summary(model)} ({model.descriptor.name}: target "
                f"{model.data.get('target')}, modalities {model.data.get('modalities')}, "
                f"version {model.data.get('version')})")
            final = base / (name or default_name(model.data))
            _check_free(final, force)
            meta = {"name": final.name, "version": str(model.data.get("version", "")),
                    "modalities": [str(m).lower() for m in model.data.get("modalities") or ["swi"]],
                    "license": LICENSE, "source": f"SHIVA-CMB weights ({source.name})",
                    "description": f"SHIVA-CMB {model.data.get('version', '')} by {model.data.get('author') or 'the SHIVA-CMB authors'}"
                                   f" ({model.data.get('release date') or 'undated'}), converted from TensorFlow to ONNX"}
            with staged_directory(final, _is_model, MODEL_WHAT) as stage:
                kept = stage / SOURCE_DIR
                places[kept] = str(source)
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
    from .tfconvert import check_converter, fold_kind

    check_converter()
    if not source.exists():
        raise InputError(source, "no such file or folder")
    fold_kind(source)
    _check_free(out, force)
    meta = {"name": safe_name(name, "--name") if name is not None else slug(source.stem), "version": "",
            "modalities": ["swi"], "license": "", "source": str(source.resolve()),
            "description": f"converted from {source.name} to ONNX"}
    places: Dict[Path, str] = {}
    with _errors_named(places, source), staged_directory(out, _is_model, MODEL_WHAT) as stage:
        kept = stage / SOURCE_DIR / source.name
        places[kept] = str(source)
        kept.parent.mkdir()
        if source.is_dir():
            shutil.copytree(source, kept)
        else:
            shutil.copy2(source, kept)
        result = build(stage, [kept], meta, [md5_of(kept)], parity_scan, say)
    return _relocated(result, out)


MODEL_WHAT = f"a model folder (no {DESCRIPTOR})"


def _is_model(folder: Path) -> bool:
    """An empty folder or a model folder: what --force may replace."""
    return not any(folder.iterdir()) or (folder / DESCRIPTOR).is_file()


@contextlib.contextmanager
def _errors_named(places: Dict[Path, str], source: Path) -> Iterator[None]:
    """Errors that name the download, not the hidden folders it is unpacked and converted in (removed by
    then); a full disk or another write failure becomes a RuntimeFailure naming the file."""
    def named(text: str) -> str:
        for place, shown in places.items():
            text = text.replace(str(place), shown)
        return text

    try:
        yield
    except ShivaError as err:
        err.args = (named(str(err)),)
        raise
    except OSError as err:
        where = named(str(err.filename)) if err.filename else str(source)
        raise RuntimeFailure(f"{where}: cannot write the model: {err.strerror or err}") from None


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
    from ..inference import FoldEnsemble, model_layout, to_probability
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
