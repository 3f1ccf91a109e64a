"""Cohort runs (`shivacmb batch`): find the scans, run them on dask.distributed, resume, summarise.

Inputs are a folder (every image file and DICOM series folder below it), a BIDS dataset
(``*_T2starw``, ``*_swi``, ``*_GRE`` images; outputs form a BIDS derivatives dataset) or a CSV
with columns ``scan_id,image[,mask][,parcellation][,dicom_source]``.

A scan is *done* when its ``run.json`` holds the same fingerprint (checksums of its input
files, the model's fold checksums and the settings that change results) and every file it
lists exists; a rerun skips it. A scan that fails is recorded in ``.shivacmb-batch/failed/``
with its error and is not retried unless asked (``retry_failed``); the others go on. Outputs
of a scan appear whole or not at all (the pipeline's staged folder), so a batch killed at any
moment leaves only complete results, and the cohort tables and report are written (atomically)
only when every scan has been processed.

Workers are long-lived processes: each keeps its model and onnxruntime sessions warm between
scans, and runs two scans at a time so that one is read, preprocessed, located and written
while the other is in the network (:class:`~.inference.FoldEnsemble` lets one scan at a time
through the folds).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .. import __version__
from ..errors import InputError, ShivaError, one_line
from ..files import atomic_write_text, checksum, clean_stale_siblings, safe_name
from ..findings import COLUMNS as FINDING_COLUMNS
from ..findings import Finding, read_tsv, to_text_rows
from ..fpfilter import load_filter
from ..location import count_locations
from ..mars import AREAS, SIDES, UNKNOWN
from ..modelstore.models import ModelDescriptor, load_model
from ..pipeline import FINDINGS_NAME, LABELS_NAME, PROBABILITY_NAME, REPORT_NAME, RUN_NAME, SegmentOptions, segment
from ..rating.export import tsv_text
from ..runrecord import RunRecord, read_if_valid
from ..scan import find_scans, scan_id_from_path, source_files
from ..settings import ScanSettings

PathLike = Union[str, Path]
STATE_DIR = ".shivacmb-batch"  # failure records and the staging area of BIDS outputs, inside OUT
LOG_NAME = "batch_log.jsonl"  # one line per scan outcome, every run appended
SUMMARY_NAME = "cohort_summary.tsv"
FINDINGS_TABLE = "cohort_findings.tsv"
COHORT_REPORT = "report.html"
WORKER_MEMORY_GIB = 4  # memory a local CPU worker plans for: a worker per core, at most one per this much
BIDS_SUFFIXES = ("T2starw", "swi", "GRE")
BIDS_SKIPPED_PARTS = ("phase", "real", "imag")  # CMBs are read on magnitude images
BIDS_DESC = "cmb"
AREA_COLUMNS = tuple(f"{area}_{side}" for area in AREAS for side in SIDES)
SUMMARY_COLUMNS = ("scan_id", "status", "cmb_count") + AREA_COLUMNS + (
    "location_unknown", "boston", "total_volume_mm3", "seconds_total", "seconds_inference", "provider", "model",
    "model_version", "image", "output", "report", "error")


# --- what to run -------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One scan of the cohort and where its outputs go (``folder`` relative to the output root)."""

    scan_id: str
    image: Path
    mask: Optional[Path] = None
    parcellation: Optional[Path] = None
    dicom_source: Optional[Path] = None  # the DICOM series a NIfTI/NRRD image was converted from
    folder: str = ""  # default: the scan id
    prefix: str = ""  # BIDS: file names start with it and use BIDS suffixes

    @property
    def output_folder(self) -> str:
        return self.folder or self.scan_id

    def output_name(self, name: str) -> str:
        """Name of one of the pipeline's output files for this scan (BIDS names when there is a prefix)."""
        if not self.prefix:
            return name
        for stem, suffix in ((LABELS_NAME, "dseg"), (PROBABILITY_NAME, "probseg"), ("cmb.seg", "dseg.seg")):
            if name.startswith(stem + "."):
                return f"{self.prefix}{suffix}{name[len(stem):]}"
        return self.prefix + name

    def output(self, out: Path, name: str) -> Path:
        return out / self.output_folder / self.output_name(name)


@dataclass(frozen=True)
class Cohort:
    """The scans of one batch and the kind of input they came from."""

    jobs: Tuple[Job, ...]
    source: Path
    bids: bool = False


def discover(source: PathLike, bids_filters: Sequence[str] = (), out: Optional[PathLike] = None) -> Cohort:
    """The jobs of a folder, a BIDS dataset or a CSV file; refuses an input that names no scan, or a scan id
    that cannot name a file. A folder or dataset never yields files of the output folder ``out`` (the
    batch's own results when ``out`` lies inside it)."""
    source = Path(source).absolute()  # workers may run elsewhere: every path they get is absolute
    outside = Path(out).absolute() if out is not None else None
    if not source.exists():
        raise InputError(source, "no such file or folder")
    if source.is_file():
        if bids_filters:
            raise InputError(source, "--bids-filter applies to a BIDS dataset, not to a CSV file")
        jobs = _csv_jobs(source)
    elif (source / "dataset_description.json").is_file():
        return Cohort(_bids_jobs(source, _parse_filters(bids_filters), outside), source, bids=True)
    else:
        if bids_filters:
            raise InputError(source, "--bids-filter needs a BIDS dataset (no dataset_description.json here)")
        jobs = _folder_jobs(source, outside)
    return Cohort(tuple(jobs), source)


def _within(path: Path, folder: Optional[Path]) -> bool:
    return folder is not None and (path == folder or folder in path.parents)


def is_own_output(path: Path) -> bool:
    """A label map, probability map or segmentation a run wrote, or a result folder (its DICOM results are no DICOM
    series): never a scan, wherever it lies."""
    name = path.name.lower()
    return (name.startswith((LABELS_NAME + ".", PROBABILITY_NAME + ".")) or name.endswith(".seg.nrrd")
            or (path.is_dir() and (path / RUN_NAME).is_file()))


def _csv_jobs(path: Path) -> List[Job]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(path, f"cannot read scan list: {err}") from None
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t" if "\t" in text.split("\n", 1)[0] else ","))
    if not rows or not {"scan_id", "image"} <= set(rows[0]):
        raise InputError(path, "a scan list needs a header line with columns scan_id,image[,mask][,parcellation]"
                               "[,dicom_source]")
    jobs = []
    for number, row in enumerate(rows, start=2):
        scan_id, image = (row.get("scan_id") or "").strip(), (row.get("image") or "").strip()
        if not scan_id or not image:
            raise InputError(path, f"line {number}: scan_id and image are both needed")
        safe_name(scan_id, f"line {number}: scan_id", path)
        jobs.append(Job(scan_id, _relative_to(path, image), _relative_to(path, row.get("mask")),
                        _relative_to(path, row.get("parcellation")), _relative_to(path, row.get("dicom_source"))))
    _check_unique([j.scan_id for j in jobs], path, "scan_id")
    return jobs


def _relative_to(listing: Path, value: Optional[str]) -> Optional[Path]:
    """A path from a scan list: absolute, or relative to the list's folder; None when empty."""
    if not (value or "").strip():
        return None
    path = Path(value.strip()).expanduser()
    return path if path.is_absolute() else listing.parent / path


def _folder_jobs(folder: Path, out: Optional[Path]) -> List[Job]:
    """Scan id = file name without extensions; where two files share it, their relative paths tell them apart."""
    paths = [p for p in find_scans(folder) if not _within(p, out) and not is_own_output(p)]
    if not paths:
        raise InputError(folder, f"no scans found outside the output folder {out}")
    ids = [scan_id_from_path(p) for p in paths]
    if len(set(ids)) < len(ids):
        ids = ["_".join(p.relative_to(folder).parent.parts + (scan_id_from_path(p),)) for p in paths]
        _check_unique(ids, folder, "scan id")
    for scan_id, path in zip(ids, paths):
        safe_name(scan_id, "scan id (from the file name; rename it or list the scans in a CSV)", path)
    return [Job(scan_id, path) for scan_id, path in zip(ids, paths)]


def _check_unique(ids: Sequence[str], source: Path, what: str) -> None:
    seen = set()
    for value in ids:
        if value in seen:
            raise InputError(source, f"{what} '{value}' appears twice; every scan needs its own")
        seen.add(value)


def _parse_filters(filters: Sequence[str]) -> Dict[str, Tuple[str, ...]]:
    """``--bids-filter ENTITY=VALUE[,VALUE]`` (``suffix`` selects the image type) -> entity -> values."""
    parsed: Dict[str, Tuple[str, ...]] = {}
    for text in filters:
        key, sep, values = text.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise InputError(None, f"--bids-filter '{text}': write ENTITY=VALUE[,VALUE...], e.g. ses=01 or "
                                   "suffix=swi")
        parsed[key.strip()] = tuple(v.strip() for v in values.split(",") if v.strip())
    return parsed


def bids_entities(name: str) -> Tuple[List[Tuple[str, str]], str]:
    """``sub-01_ses-1_acq-x_swi.nii.gz`` -> ([("sub", "01"), ("ses", "1"), ("acq", "x")], "swi")."""
    stem = scan_id_from_path(name)
    *pairs, suffix = stem.split("_")
    entities = []
    for pair in pairs:
        key, sep, value = pair.partition("-")
        if not sep:
            return [], ""
        entities.append((key, value))
    return entities, suffix


def _bids_jobs(root: Path, filters: Dict[str, Tuple[str, ...]], out: Optional[Path]) -> List[Job]:
    jobs = []
    for subject in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        for image in sorted(subject.rglob("*.nii*")):
            if (not image.name.endswith((".nii", ".nii.gz")) or any(part.startswith(".") for part in image.parts)
                    or _within(image, out)):
                continue
            entities, suffix = bids_entities(image.name)
            if suffix not in BIDS_SUFFIXES or not entities or entities[0][0] != "sub":
                continue
            values = dict(entities, suffix=suffix)
            if "part" not in filters and values.get("part") in BIDS_SKIPPED_PARTS:
                continue
            if any(values.get(key) not in allowed for key, allowed in filters.items()):
                continue
            prefix = "_".join(f"{k}-{v}" for k, v in entities) + f"_desc-{BIDS_DESC}_"
            folder = image.parent.relative_to(root)
            for name in (scan_id_from_path(image), *folder.parts):
                safe_name(name, "BIDS name", image)
            jobs.append(Job(scan_id_from_path(image), image, folder=folder.as_posix(), prefix=prefix))
    if not jobs:
        wanted = ", ".join(f"*_{s}" for s in BIDS_SUFFIXES)
        raise InputError(root, f"no {wanted} NIfTI image in this BIDS dataset"
                               + (" matches the --bids-filter" if filters else ""))
    places = [f"{j.folder}/{j.prefix}" for j in jobs]
    for place in set(places):
        clashing = [j.image.name for j in jobs if f"{j.folder}/{j.prefix}" == place]
        if len(clashing) > 1:
            raise InputError(root, f"{' and '.join(clashing[:2])} would share output names; choose one with "
                                   "--bids-filter (e.g. suffix=swi)")
    return jobs


# --- settings, fingerprints and records --------------------------------------------------


@dataclass(frozen=True)
class BatchSettings(ScanSettings):
    """The scan settings every scan of the batch runs with (SHIVACMBLib.settings), and how workers run them."""

    threads: Optional[int] = None  # onnxruntime and SimpleITK threads per worker (None: every core)
    retry_failed: bool = False

    def result_settings(self, model: ModelDescriptor) -> Dict[str, Any]:
        """The settings a scan's results depend on (ScanSettings.reuse_values), the model and candidate filter
        by their checksums and the threshold resolved (and the extent threshold, for a model that has one)."""
        candidate_filter = load_filter(self.fp_filter)
        threshold = model.threshold_for(self.threshold)
        extent = {} if model.extent_threshold is None else {"extent_threshold": model.extent_for(threshold)}
        return {**self.reuse_values(),
                "model": {"name": model.name, "version": model.version, "folds": [f.sha256 for f in model.folds]},
                "fp_filter": None if candidate_filter is None else {**candidate_filter.summary(),
                                                                    "sha256": candidate_filter.sha256},
                "threshold": threshold, **extent}


def fingerprint(job: Job, model: ModelDescriptor, settings: BatchSettings) -> Dict[str, Any]:
    """Checksums of the scan's input files and the settings its results depend on."""
    inputs = {"image": checksum(source_files(job.image))}
    for name in ("mask", "parcellation", "dicom_source"):
        path = getattr(job, name)
        inputs[name] = checksum(source_files(path)) if path is not None else None
    return {"inputs": inputs, **settings.result_settings(model)}


def done_run(job: Job, out: Path, expected: Dict[str, Any]) -> Optional[RunRecord]:
    """The scan's run.json when it is done with these inputs and settings and all its files exist."""
    run = read_if_valid(job.output(out, RUN_NAME))
    if run is None or run.fingerprint != expected:
        return None
    return run if all(job.output(out, name).is_file() for name in run.files) else None


def failure_path(out: Path, job: Job) -> Path:
    return out / STATE_DIR / "failed" / f"{job.scan_id}.json"


def record_failure(out: Path, job: Job, error: str, expected: Optional[Dict[str, Any]], run_id: str) -> None:
    path = failure_path(out, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"scan_id": job.scan_id, "image": str(job.image), "error": error,
                                        "fingerprint": expected, "run_id": run_id, "time": _now()}, indent=2))


def read_failure(out: Path, job: Job) -> Optional[Dict[str, Any]]:
    return _read_json(failure_path(out, job))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --- one scan, on a worker ---------------------------------------------------------------

_MODELS: Dict[Optional[str], ModelDescriptor] = {}


def _worker_model(name: Optional[str]) -> ModelDescriptor:
    """The model, read once per worker process (its sessions are cached by inference.get_ensemble)."""
    if name not in _MODELS:
        _MODELS[name] = load_model(name, verify=False)
    return _MODELS[name]


def process(job: Job, out: str, settings: BatchSettings, run_id: str) -> Dict[str, Any]:
    """Run one scan unless it is done (or failed before and no retry is asked); never raises for the scan's own
    problems: the outcome says ``done``, ``skipped`` or ``failed`` with the error."""
    started = time.perf_counter()
    root = Path(out)
    outcome: Dict[str, Any] = {"scan_id": job.scan_id, "worker": f"{socket.gethostname()}:{os.getpid()}"}
    expected = None
    try:
        model = _worker_model(settings.model)
        expected = fingerprint(job, model, settings)
        if done_run(job, root, expected) is not None:
            return dict(outcome, status="skipped", seconds=time.perf_counter() - started)
        failed = read_failure(root, job)
        if failed and failed.get("fingerprint") == expected and not settings.retry_failed:
            return dict(outcome, status="failed", error=failed["error"], previous=True,
                        seconds=time.perf_counter() - started)
        _run_scan(job, root, model, settings, {"fingerprint": expected, "run_id": run_id})
    except ShivaError as err:
        error = str(err)
    except Exception as err:  # noqa: BLE001 - one scan's failure must not stop the cohort
        error = f"internal error: {type(err).__name__}: {one_line(err)}"
    else:
        with contextlib.suppress(FileNotFoundError):
            failure_path(root, job).unlink()
        return dict(outcome, status="done", seconds=time.perf_counter() - started)
    record_failure(root, job, error, expected, run_id)
    return dict(outcome, status="failed", error=error, seconds=time.perf_counter() - started)


def _run_scan(job: Job, root: Path, model: ModelDescriptor, settings: BatchSettings, batch: Dict[str, Any]) -> None:
    from ..inference import get_ensemble

    if settings.threads:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(settings.threads)
    options = SegmentOptions(**settings.values(), mask=job.mask, scan_id=job.scan_id, parcellation=job.parcellation,
                             dicom_source=job.dicom_source, batch=batch)
    ensemble = get_ensemble(model, settings.device, settings.threads, settings.precision, keep_memory=True)
    if not job.prefix:
        segment(job.image, root, options, model=model, ensemble=ensemble)
        return
    staging = root / STATE_DIR / "bids"
    result = segment(job.image, staging, options, model=model, ensemble=ensemble)
    _place_bids_files(job, root, result.output_dir, result.files)


def _place_bids_files(job: Job, root: Path, staged: Path, files: Sequence[str]) -> None:
    """Move a finished scan's files to their BIDS names, run.json (the mark of a done scan) last."""
    target = root / job.output_folder
    target.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        job.output(root, RUN_NAME).unlink()  # an older result stops counting as done before its files change
    for name in sorted(files, key=lambda n: n == RUN_NAME):
        os.replace(staged / name, target / job.output_name(name))
    shutil.rmtree(staged, ignore_errors=True)


# --- the batch ---------------------------------------------------------------------------

Progress = Callable[[Dict[str, Any]], None]


@dataclass
class BatchResult:
    """Counts of the batch and where its cohort outputs are."""

    total: int
    done: int = 0
    skipped: int = 0
    failed: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    files: List[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class ClusterSettings:
    """Where the scans run: an existing scheduler, or a local cluster sized to this machine."""

    scheduler: Optional[str] = None
    workers: Optional[int] = None
    threads_per_worker: int = 2  # scans in flight per worker (one in the network, one around it)


def run_batch(cohort: Cohort, out: PathLike, settings: BatchSettings = BatchSettings(),
              cluster: ClusterSettings = ClusterSettings(), progress: Optional[Progress] = None) -> BatchResult:
    """Run every scan of ``cohort`` into ``out`` and write the cohort tables and report when all are processed."""
    out = Path(out).absolute()
    model = load_model(settings.model)  # verified once here: a broken model stops the batch before it starts
    if settings.model and Path(settings.model).is_dir():
        settings = replace(settings, model=str(Path(settings.model).absolute()))
    out.mkdir(parents=True, exist_ok=True)
    if cohort.bids:
        _write_dataset_description(out, cohort.source, model)
    _tidy(out, cohort.jobs)
    run_id = f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    result = BatchResult(total=len(cohort.jobs))
    started = time.perf_counter()
    with _client(cluster, settings) as (client, threads):
        worker_settings = settings if settings.threads or threads is None else replace(settings, threads=threads)
        sizes = [input_bytes(job) for job in cohort.jobs]  # largest scans first: the last ones to finish are short
        futures = {client.submit(process, job, str(out), worker_settings, run_id, pure=False, priority=size,
                                 key=f"scan-{index}-{run_id}"): job
                   for index, (job, size) in enumerate(zip(cohort.jobs, sizes))}
        from distributed import as_completed

        with open(out / LOG_NAME, "a", encoding="utf-8") as log:
            for future in as_completed(futures):
                job = futures[future]
                outcome = _outcome(future, job, out, run_id)
                log.write(json.dumps(dict(outcome, run_id=run_id, time=_now())) + "\n")
                log.flush()
                _count(result, outcome)
                if progress:
                    progress(dict(outcome, total=result.total, done=result.done, skipped=result.skipped,
                                  failed=len(result.failed),
                                  remaining=result.total - result.done - result.skipped - len(result.failed)))
    result.seconds = time.perf_counter() - started
    result.files = write_cohort_outputs(cohort, out)
    return result


def input_bytes(job: Job) -> int:
    """Size of a scan's files on disk (0 when they cannot be listed: the scan will fail and say why)."""
    try:
        return sum(path.stat().st_size for path in source_files(job.image))
    except (OSError, ShivaError):
        return 0


def _outcome(future: Any, job: Job, out: Path, run_id: str) -> Dict[str, Any]:
    """The task's outcome; a worker that died on the scan (crash, out of memory) makes it a failed scan."""
    try:
        return future.result()
    except Exception as err:  # noqa: BLE001 - KilledWorker and the like: record, go on
        error = f"worker lost while running this scan ({type(err).__name__}: {one_line(err)})"
        record_failure(out, job, error, None, run_id)
        return {"scan_id": job.scan_id, "status": "failed", "error": error}


def _count(result: BatchResult, outcome: Dict[str, Any]) -> None:
    if outcome["status"] == "done":
        result.done += 1
    elif outcome["status"] == "skipped":
        result.skipped += 1
    else:
        result.failed.append((outcome["scan_id"], outcome.get("error", "")))


def _tidy(out: Path, jobs: Sequence[Job]) -> None:
    """Remove what processes killed on this host left half-made (staging folders of scans)."""
    staging = out / STATE_DIR / "bids"
    for job in jobs:
        final = staging / job.scan_id if job.prefix else out / job.output_folder
        if final.parent.is_dir():
            clean_stale_siblings(final)


def _write_dataset_description(out: Path, source: Path, model: ModelDescriptor) -> None:
    description = {"Name": "SHIVA-CMB cerebral microbleeds", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                   "GeneratedBy": [{"Name": "shivacmb", "Version": __version__,
                                    "Description": f"model {model.name} {model.version}"}],
                   "SourceDatasets": [{"URL": source.resolve().as_uri()}]}
    atomic_write_text(out / "dataset_description.json", json.dumps(description, indent=2) + "\n")


@contextlib.contextmanager
def _client(cluster: ClusterSettings, settings: BatchSettings) -> Iterator[Tuple[Any, Optional[int]]]:
    """A dask client, and the threads each local worker's network may use (None for an existing cluster)."""
    import dask

    try:
        from distributed import Client
    except ImportError:
        raise ShivaError("shivacmb batch needs dask.distributed: pip install 'shivacmb[batch]'") from None
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        if cluster.scheduler:
            with Client(cluster.scheduler, timeout="30s") as client:
                yield client, None
            return
        local, threads = local_cluster(cluster, settings.device)
        with local, Client(local) as client:
            yield client, threads


def worker_plan(cores: int, gpus: int, workers: Optional[int] = None, memory_gib: Optional[float] = None,
                cores_per_worker: int = 1) -> Tuple[List[Dict[str, str]], int]:
    """Environment of each local worker and the threads of each worker's network: one worker per GPU
    (``CUDA_VISIBLE_DEVICES`` set to it) when there are GPUs, else CPU workers sharing the cores."""
    if gpus and not workers:
        return [{"CUDA_VISIBLE_DEVICES": str(index)} for index in range(gpus)], max(1, cores // gpus)
    workers = workers or default_workers(cores, memory_gib, cores_per_worker)
    return [{} for _ in range(workers)], max(1, cores // workers)


def local_cluster(cluster: ClusterSettings, device: str) -> Tuple[Any, int]:
    """A local dask cluster planned by :func:`worker_plan`, and the threads each worker's network gets."""
    import logging

    from distributed import Nanny, Scheduler, SpecCluster

    from ..inference import available_cores

    gpus = gpu_count() if device in ("auto", "cuda", "tensorrt") else 0
    envs, threads = worker_plan(available_cores(), gpus, cluster.workers, cores_per_worker=cpu_cores_per_worker())
    specs = {f"worker-{index}": {"cls": Nanny, "options": {"nthreads": cluster.threads_per_worker, "env": env,
                                                            "silence_logs": logging.ERROR}}
             for index, env in enumerate(envs)}
    return SpecCluster(workers=specs, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}},
                       silence_logs=logging.ERROR), threads


def default_workers(cores: int, memory_gib: Optional[float] = None, cores_per_worker: int = 1) -> int:
    """CPU workers for this machine: one per ``cores_per_worker`` cores, at most one per WORKER_MEMORY_GIB of
    memory (see :func:`cpu_cores_per_worker`)."""
    if memory_gib is None:
        import psutil

        memory_gib = psutil.virtual_memory().total / 2 ** 30
    return max(1, min(cores // cores_per_worker, int(memory_gib // WORKER_MEMORY_GIB)))


def cpu_cores_per_worker() -> int:
    """Cores per CPU worker: 2 where OpenVINO runs the network, else 1 (docs/performance.md, "Cohorts").

    onnxruntime's own kernels use a second core poorly, so single-threaded networks, a worker per core, did
    best (2 cores: 163.8 against 172.7 s for 12 scans); OpenVINO's use it well, and two workers running a
    network each at once slowed each other: on 2 cores one worker (network on both, the other scan's reading
    and location beside it) did 24 scans in 100 s, two workers in 111-112 s, in two runs each."""
    from ..inference import OPENVINO, onnxruntime_module

    return 2 if OPENVINO in onnxruntime_module().get_available_providers() else 1


def gpu_count() -> int:
    """NVIDIA GPUs onnxruntime could use here (0 without the CUDA provider or nvidia-smi)."""
    from ..inference import CUDA, onnxruntime_module

    if CUDA not in onnxruntime_module().get_available_providers():
        return 0
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in listed.splitlines() if line.startswith("GPU "))


# --- cohort outputs ----------------------------------------------------------------------


def summary_rows(cohort: Cohort, out: Path) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
    """One row per scan (its state on disk now) and one row per CMB of the scans that are done."""
    rows, findings_rows = [], []
    for job in cohort.jobs:
        row = {name: "" for name in SUMMARY_COLUMNS}
        row.update(scan_id=job.scan_id, image=str(job.image))
        run = read_if_valid(job.output(out, RUN_NAME))
        failed = read_failure(out, job)  # removed when the scan succeeds, so it is the latest word
        if failed or run is None:
            row.update(status="failed" if failed else "missing", error=(failed or {}).get("error", ""))
            rows.append(row)
            continue
        findings = read_tsv(job.output(out, FINDINGS_NAME))
        row.update(_scan_row(job, run, findings))
        rows.append(row)
        findings_rows += [{"scan_id": job.scan_id, **row} for row in to_text_rows(findings)]
    return rows, findings_rows


def _scan_row(job: Job, run: RunRecord, findings: Sequence[Finding]) -> Dict[str, str]:
    counts = count_locations(findings)  # CMBs not rejected
    table = counts["by_area_side"]
    kept = [f for f in findings if f.status != "rejected"]
    return {"status": "done", "cmb_count": str(len(kept)),
            **{f"{area}_{side}": str(table[area][side]) for area in AREAS for side in SIDES},
            "location_unknown": str(table[UNKNOWN]["count"]), "boston": str(counts["boston"]) if run.located else "",
            "total_volume_mm3": f"{sum(f.volume_mm3 for f in kept):.2f}",
            "seconds_total": f"{run.timings_s['total']:.2f}",
            "seconds_inference": f"{run.timings_s['inference']:.2f}",
            "provider": run.provider, "model": run.model["name"], "model_version": run.model["version"],
            "output": job.output_folder,
            "report": f"{job.output_folder}/{job.output_name(REPORT_NAME)}" if REPORT_NAME in run.files else ""}


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_cohort_outputs(cohort: Cohort, out: Path) -> List[Path]:
    """cohort_summary.tsv, cohort_findings.tsv and report.html from the scans' outputs on disk."""
    from .cohortreport import write_cohort_report

    rows, findings_rows = summary_rows(cohort, out)
    atomic_write_text(out / SUMMARY_NAME, tsv_text(rows, SUMMARY_COLUMNS))
    atomic_write_text(out / FINDINGS_TABLE, tsv_text(findings_rows, ("scan_id",) + FINDING_COLUMNS))
    write_cohort_report(out / COHORT_REPORT, rows, findings_rows)
    return [out / SUMMARY_NAME, out / FINDINGS_TABLE, out / COHORT_REPORT]
