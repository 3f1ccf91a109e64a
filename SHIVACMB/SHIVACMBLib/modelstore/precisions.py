"""Reduced precisions proven on this computer: `shivacmb models verify NAME --precision bf16|int8`.

A reduced precision changes every layer's arithmetic, and what that does to a model's detections depends
on the model, the onnxruntime build and the CPU. So bf16 and int8 run only where a verification on this
computer showed the same detections as fp32: the check runs the model in fp32 and in the reduced
precision on the same device over the demo phantom and held-out phantoms (or the scans given), pairs
the components above threshold one to one (:func:`parity.compare_detections`), and records the outcome
per model (its folds' sha256), precision, provider, onnxruntime build and CPU in the user cache folder,
beside the model's int8 copy (:mod:`quantize`). `segment --precision P` reads the record; without a
passing one fp32 runs, with a warning that says how to check P. A run in fp32 on a CPU with int8 or
bf16 units says what it could use (:func:`offers`, :func:`hint`).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from ..files import atomic_write_text, checksum
from ..runtimes import OPENVINO, cpu_signature, fast_precisions, installed_builds, runtime_key
from .models import ModelDescriptor, cache_dir

if TYPE_CHECKING:
    from .parity import Parity

CPU_PRECISIONS = ("bf16", "int8")  # used only once verified here
HELDOUT_PHANTOMS = 8  # held-out phantoms of a check, after the demo phantom
INT8_RECIPE = 1  # bumped when quantize.py makes copies differently: older copies are made again
Say = Callable[[str], None]


def store_dir(model: ModelDescriptor) -> Path:
    """Where a model's int8 copy and precision records live: one folder per set of fold files."""
    key = hashlib.sha256(" ".join(f.sha256 for f in model.folds).encode()).hexdigest()[:20]
    return cache_dir() / "precisions" / key


def int8_file(model: ModelDescriptor) -> Path:
    """The model's int8 copy (every fold in one graph)."""
    return store_dir(model) / f"int8-r{INT8_RECIPE}.onnx"


def record_file(model: ModelDescriptor, precision: str, provider: str) -> Path:
    """The record of ``precision``'s check on ``provider`` with this onnxruntime build and CPU."""
    return store_dir(model) / f"{precision}-{provider.replace('ExecutionProvider', '').lower()}-{runtime_key()}.json"


def read_record(model: ModelDescriptor, precision: str, provider: str) -> Optional[Dict[str, Any]]:
    """The last check of ``precision`` on ``provider`` here, None when there is none (or it is unreadable, or its
    int8 copy is gone or changed since)."""
    try:
        record = json.loads(record_file(model, precision, provider).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if precision == "int8" and record.get("int8_sha256") != _sha256_or_none(int8_file(model)):
        return None
    return record if isinstance(record, dict) else None


def _sha256_or_none(path: Path) -> Optional[str]:
    return checksum([path]) if path.is_file() else None


def unverified_note(model: ModelDescriptor, precision: str, provider: str) -> Optional[str]:
    """Why ``precision`` does not run for ``model`` on ``provider`` here (None when a check passed)."""
    record = read_record(model, precision, provider)
    if record is not None and record.get("passed"):
        return None
    if record is None:
        return (f"--precision {precision} has not been checked for model '{model.name}' on this computer: `shivacmb "
                f"models verify {model.name} --precision {precision}` compares its detections with fp32's; fp32 runs")
    return (f"--precision {precision} found other CMBs than fp32 with model '{model.name}' on this computer "
            f"({record.get('summary', 'models verify')}); fp32 runs")


def offers(model: ModelDescriptor, provider: str) -> Dict[str, Dict[str, Any]]:
    """The reduced precisions this CPU has units for, where ``provider`` runs them (OpenVINO), each with its unit and
    its status for ``model`` here: ``verified`` (with the speed-up measured), ``not verified`` or ``differs``."""
    found: Dict[str, Dict[str, Any]] = {}
    for precision, unit in fast_precisions().items() if provider == OPENVINO else ():
        record = read_record(model, precision, provider)
        status = "not verified" if record is None else "verified" if record.get("passed") else "differs"
        found[precision] = {"unit": unit, "status": status}
        if status == "verified":
            found[precision]["speedup"] = record.get("speedup")
    return found


def hint(model_ref: str, offered: Dict[str, Dict[str, Any]]) -> str:
    """One sentence on the faster precisions a fp32 CPU run could use ("" when none is worth saying)."""
    parts = []
    for precision, offer in offered.items():
        if offer["status"] == "verified":
            speed = f"{offer['speedup']:.1f}x the fp32 network's speed, " if offer.get("speedup") else ""
            parts.append(f"--precision {precision} ({speed}the same detections) is verified for this model here")
        elif offer["status"] == "not verified":
            parts.append(f"this CPU computes {precision} fast ({offer['unit']}): `shivacmb models verify {model_ref} "
                         f"--precision {precision}` checks whether it finds what fp32 finds, then --precision "
                         f"{precision} uses it")
    return "; ".join(parts)


def verify_precision(model: ModelDescriptor, device: str, precision: str, scan: Optional[Path] = None,
                     phantoms: int = HELDOUT_PHANTOMS, say: Say = print) -> List["Parity"]:
    """``precision`` against fp32 on ``device``: the fold mean of each scan (``scan``, else the demo phantom and
    ``phantoms`` held-out ones), judged on the detections. bf16 and int8 checks that ran in that precision
    are recorded: they decide whether `segment` uses it here."""
    from ..inference import FoldEnsemble
    from .parity import HELDOUT_SEED, REDUCED_TOLERANCE, compare, parity_input, phantom_scans

    if precision == "int8" and not int8_file(model).is_file():
        make_int8(model, say)
    reference = FoldEnsemble(model, device)
    reduced = FoldEnsemble(model, device, precision=precision, unverified=True)
    for note in reduced.warnings:
        say(f"warning: {note}")
    scans: List[Optional[Path]] = [scan] if scan else [None, *phantom_scans(HELDOUT_SEED, phantoms)]
    names = [_scan_name(item, scan) for item in scans]
    results: List["Parity"] = []
    seconds = [0.0, 0.0]
    for item, name in zip(scans, names):
        volume = parity_input(model, item)
        maps = []
        for index, ensemble in enumerate((reference, reduced)):
            started = time.perf_counter()
            maps.append(ensemble.predict(volume)[0])
            seconds[index] += time.perf_counter() - started
        result = compare(maps[0], maps[1], model.threshold, REDUCED_TOLERANCE, detections=True)
        say(f"{name}: {'ok' if result.passed else 'DIFFERS'}  {result.text()}")
        results.append(result)
    same = sum(r.passed for r in results)
    speedup = seconds[0] / max(seconds[1], 1e-9)
    summary = (f"{reduced.running_precision} on {reduced.provider} vs fp32 on {reference.provider}: the same "
               f"detections in {same} of {len(results)} scan(s), {speedup:.1f}x as fast")
    say(summary)
    if precision in CPU_PRECISIONS and reduced.running_precision == precision:
        _record(model, reduced.provider, precision, results, speedup, summary, names)
        say(f"recorded: `segment --precision {precision}` "
            + ("now uses it on this computer" if same == len(results) else "keeps running fp32 on this computer"))
    return results


def make_int8(model: ModelDescriptor, say: Say = print) -> Path:
    """Make the model's int8 copy, calibrated on the calibration phantoms."""
    from .quantize import calibration_boxes, quantize_int8

    say("int8: making the calibration phantoms' boxes (once per computer)")
    quantize_int8(model, int8_file(model), list(calibration_boxes(model)), say)
    return int8_file(model)


def _scan_name(item: Optional[Path], given: Optional[Path]) -> str:
    """The demo phantom, a held-out phantom by its name, or the scan given by its path."""
    from .parity import describe_input

    return describe_input(item) if item is None or given else f"held-out phantom {item.name.split('.')[0]}"


def _record(model: ModelDescriptor, provider: str, precision: str, results: List["Parity"], speedup: float,
            summary: str, names: List[str]) -> None:
    record = {"model": {"name": model.name, "version": model.version, "folds": [f.sha256 for f in model.folds]},
              "precision": precision, "provider": provider, "runtime": ", ".join(installed_builds()),
              "cpu": cpu_signature(), "passed": all(r.passed for r in results), "speedup": round(speedup, 2),
              "summary": summary, "checked": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "scans": [{"scan": name, **r.as_dict()} for name, r in zip(names, results)]}
    if precision == "int8":
        record["int8_sha256"] = checksum([int8_file(model)])
    path = record_file(model, precision, provider)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
