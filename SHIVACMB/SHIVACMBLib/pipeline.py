"""Segment one scan: read, mask, resample, infer, postprocess, write (DESIGN: data flow of one scan).

Everything is computed before anything is written; the outputs are then written into a
hidden staging folder that is renamed to ``<out>/<scan-id>/`` in one step.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import numpy as np
import SimpleITK as sitk

from . import __version__
from .dicomout import DicomResults, scan_results, source_series
from .errors import InputError, RuntimeFailure
from .files import atomic_write_text, check_replaceable, safe_name, staged_directory
from .findings import Finding, write_tsv
from .fpfilter import FilterRun, load_filter, veto
from .geometry import Geometry, resample
from .inference import FoldEnsemble, get_ensemble
from .location import Located, ParcellationLookup, locate
from .modelstore.models import ModelDescriptor, load_model
from .postprocess import OUTSIDE_RATIO, Components, find_components, map_to_native, measure
from .preprocess import BrainMask, ModelInput, compute_brain_mask, coverage_warnings, load_brain_mask, prepare_input
from .progress import Reporter, stage_reporter
from .report import write_report
from .scan import Scan, read_scan, scan_id_from_path
from .runrecord import NOT_LOCATED, RunRecord
from .segfile import write_seg_nrrd
from .settings import ScanSettings

PathLike = Union[str, Path]
LABELS_NAME = "cmb_labels"
PROBABILITY_NAME = "cmb_probability"
SEGMENTATION_NAME = "cmb.seg.nrrd"
FINDINGS_NAME = "findings.tsv"
RUN_NAME = "run.json"
REPORT_NAME = "report.html"


@dataclass(frozen=True)
class SegmentOptions(ScanSettings):
    """A scan's settings (SHIVACMBLib.settings) and what belongs to this one scan."""

    mask: Optional[PathLike] = None
    scan_id: Optional[str] = None
    parcellation: Optional[PathLike] = None  # FreeSurfer/SynthSeg labels; None = the registered MNI atlas
    dicom_source: Optional[PathLike] = None  # the DICOM series a NIfTI/NRRD scan was converted from
    batch: Optional[Dict[str, Any]] = None  # `shivacmb batch`: input fingerprint and run id, kept in run.json


@dataclass
class SegmentResult:
    scan_id: str
    output_dir: Path
    findings: List[Finding]
    run: RunRecord
    files: List[str] = field(default_factory=list)


class _Stopwatch:
    """Wall time per stage; ``snapshot`` includes the stage still running."""

    def __init__(self) -> None:
        self.times: Dict[str, float] = {}
        self._start = time.perf_counter()
        self._current: Optional[tuple] = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._current = (name, time.perf_counter())
        try:
            yield
        finally:
            self.times[name] = round(time.perf_counter() - self._current[1], 4)
            self._current = None

    def snapshot(self) -> Dict[str, float]:
        now = time.perf_counter()
        times = dict(self.times)
        if self._current is not None:
            times[self._current[0]] = round(now - self._current[1], 4)
        times["total"] = round(now - self._start, 4)
        return times


def segment(input_path: PathLike, out_dir: PathLike, options: Optional[SegmentOptions] = None,
            progress: Optional[Reporter] = None, model: Optional[ModelDescriptor] = None,
            ensemble: Optional[FoldEnsemble] = None) -> SegmentResult:
    """Find the CMBs of one scan and write its outputs into ``out_dir/<scan-id>/``.

    ``model``/``ensemble`` may be passed in to reuse them across scans.
    """
    options = options or SegmentOptions()
    started = _dt.datetime.now(_dt.timezone.utc)
    clock = _Stopwatch()
    if model is None:
        model = load_model(options.model, verify=False)
    threshold = model.threshold_for(options.threshold)
    if not 0.0 < threshold < 1.0:
        raise InputError(None, f"threshold must be between 0 and 1, not {threshold}")
    extent = model.extent_for(threshold)
    check_writable(Path(out_dir))
    scan_id = result_name(input_path, options.scan_id)
    out = Path(out_dir) / scan_id
    check_replaceable(out, is_result, RESULT_WHAT)
    candidate_filter = load_filter(options.fp_filter)

    with clock.stage("read"):
        stage_reporter(progress, "read")(0.0, f"reading {options.scan_id or Path(input_path).name}")
        scan = read_scan(input_path)
        series = source_series(scan, options.dicom_source, options.dicom)
        parcellation = (ParcellationLookup(Path(options.parcellation), scan.geometry)
                        if options.location and options.parcellation is not None else None)
    with clock.stage("mask"):
        stage_reporter(progress, "mask")(0.0, "brain mask")
        mask = load_brain_mask(options.mask, scan) if options.mask else compute_brain_mask(scan)
    with clock.stage("preprocess"):
        stage_reporter(progress, "preprocess")(0.0, "resampling to the model grid")
        model_input = prepare_input(scan, mask, model)
    with clock.stage("inference"):
        if ensemble is None:
            ensemble = get_ensemble(model, options.device, precision=options.precision)
        mean, folds = ensemble.predict(model_input.volume, stage_reporter(progress, "inference"))
    with clock.stage("postprocess"):
        stage_reporter(progress, "postprocess")(0.0, "finding CMBs")
        native = scan.geometry
        filter_run = FilterRun(candidate_filter) if candidate_filter is not None else None
        components = find_components(mean, model_input.mask, model_input.grid, native, threshold,
                                     OUTSIDE_RATIO, options.min_volume_mm3, options.max_volume_mm3,
                                     _filter_veto(filter_run, scan, mask, model, model_input), extent)
        del mean
        native_labels = map_to_native(components, model_input.grid, native, extent)
        findings = measure(components, folds, native_labels, model_input.grid, native, threshold)
        labels = native_labels.labels
        del folds
    located = Located(findings, {"source": NOT_LOCATED})
    if options.location:
        with clock.stage("location"):
            stage_reporter(progress, "location")(0.0, "anatomical location (MARS)")
            located = locate(scan.image, mask.image, labels, findings, parcellation)
            findings = located.findings
    dicom = None
    if series is not None:
        with clock.stage("dicom"):
            stage_reporter(progress, "dicom")(0.0, "DICOM Segmentation and report")
            dicom = scan_results(series, labels, findings, model.summary())

    run = RunRecord(
        scan_id=scan_id,
        software=_software(ensemble),
        input={"path": str(Path(scan.path).resolve()), "format": scan.format, "sha256": scan.sha256,
               "files": len(scan.files), "geometry": native.to_dict()},
        mask=mask.summary(),
        model=model.summary(),
        settings={"threshold": threshold, "extent_threshold": extent, "device": options.device,
                  "precision": options.precision, "fold_floor": model.fold_floor,
                  "outside_ratio": OUTSIDE_RATIO, "min_volume_mm3": options.min_volume_mm3,
                  "max_volume_mm3": options.max_volume_mm3, "save_probability": options.save_probability},
        inference=ensemble.summary(),
        model_box={"shape": list(model_input.grid.size), "spacing_mm": list(model_input.grid.spacing),
                   "origin_ras": np.round(model_input.grid.index_to_ras(np.zeros(3)), 3).tolist()},
        results={"cmb_count": len(findings), "dropped": components.dropped,
                 "kept_by_single_voxel_rule": native_labels.rescued,
                 "dicom": dicom.summary() if dicom is not None else None},
        fp_filter=filter_run.summary() if filter_run is not None else None,
        location=located.summary,
        warnings=(scan.warnings + coverage_warnings(scan, mask) + model_input.warnings + ensemble.warnings
                  + located.warnings),
        started=started.isoformat(timespec="seconds"),
        batch=options.batch,
    )

    stage_reporter(progress, "write")(0.0, "writing results")
    with clock.stage("write"):
        try:
            files = _write_outputs(out, scan, labels, findings, components, model_input.grid, options, run, clock,
                                   dicom)
        except OSError as err:
            raise RuntimeFailure(f"{out}: cannot write results: {err.strerror or err}") from None
    stage_reporter(progress, "write")(1.0, f"{len(findings)} CMB(s) found")
    return SegmentResult(scan_id=scan_id, output_dir=out, findings=findings, run=run, files=files)


def _filter_veto(run: Optional[FilterRun], scan: Scan, mask: BrainMask, model: ModelDescriptor,
                 model_input: ModelInput) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """The candidate filter's keep rule, on the model's box when the filter can read it, else on its own copy."""
    if run is None:
        return None
    filter_input = model_input
    if not run.filter.fits(model_input.grid, model.normalization):
        filter_input = prepare_input(scan, mask, run.filter.input_spec(model_input.grid.size))
    return veto(run, filter_input.volume.transpose(2, 1, 0), filter_input.grid, model_input.grid)


def result_name(input_path: PathLike, scan_id: Optional[str]) -> str:
    """The result folder's name: ``scan_id``, else the input's file name; refused unless a safe name."""
    if scan_id is not None:
        return safe_name(scan_id, "--scan-id")
    return safe_name(scan_id_from_path(input_path), "scan id (the input's file name; give --scan-id)", input_path)


RESULT_WHAT = f"an earlier result (a folder with a shivacmb {RUN_NAME})"


def is_result(folder: Path) -> bool:
    """An empty folder, or one holding the run.json of a shivacmb run: a result a new run may replace."""
    if not any(folder.iterdir()):
        return True
    try:
        run = json.loads((folder / RUN_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(run, dict) and isinstance(run.get("software"), dict) and run["software"].get("name") == "shivacmb"


def check_writable(out_dir: Path) -> None:
    """Refuse an output folder that cannot be created or written, before any computation."""
    existing = next(p for p in [out_dir, *out_dir.parents] if p.exists())
    if not existing.is_dir():
        raise InputError(existing, "output path is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(existing, "output folder is not writable")


def _write_outputs(out: Path, scan: Scan, labels: np.ndarray, findings: List[Finding], components: Components,
                   box: Geometry, options: SegmentOptions, run: RunRecord, clock: _Stopwatch,
                   dicom: Optional[DicomResults]) -> List[str]:
    native = scan.geometry
    ext = scan.output_extension
    with staged_directory(out, is_result, RESULT_WHAT) as stage:
        files = [LABELS_NAME + ext, SEGMENTATION_NAME, FINDINGS_NAME]
        sitk.WriteImage(native.with_image(labels), str(stage / files[0]), True)
        write_seg_nrrd(stage / SEGMENTATION_NAME, labels, native, findings)
        write_tsv(findings, stage / FINDINGS_NAME)
        if dicom is not None:
            files += dicom.write(stage)
        if options.save_probability:
            files.append(PROBABILITY_NAME + ext)
            probability = resample(box.with_image(components.probability), native, sitk.sitkLinear)
            sitk.WriteImage(probability, str(stage / files[-1]), True)
            del probability
        if options.report:
            files.append(REPORT_NAME)
            run.timings_s = clock.snapshot()
            write_report(stage / REPORT_NAME, scan.image, labels, findings, run)
        files.append(RUN_NAME)
        run.results["files"] = files
        run.finished = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        run.timings_s = clock.snapshot()
        atomic_write_text(stage / RUN_NAME, run.to_json())
    return files


def _software(ensemble: FoldEnsemble) -> Dict[str, str]:
    return {"name": "shivacmb", "version": __version__, "python": platform.python_version(),
            "onnxruntime": ensemble.onnxruntime_version, "simpleitk": sitk.Version.VersionString(),
            "numpy": np.__version__, "platform": platform.platform()}
