"""Follow-up against baseline (`shivacmb compare`): registration, CMB matching, ARIA-H grade.

1. Brain masks (given or computed, as for `segment`) and a 2 mm copy of each scan in its own
   orientation (block means first, so thin in-plane voxels do not alias).
2. Rigid registration of the follow-up to the baseline (SimpleITK: Mattes mutual information,
   which needs no common contrast, so SWI against T2*-GRE works; samples inside the baseline
   brain mask; three resolution levels, 8, 4 and 2 mm; started from the brain masks' centres
   of mass); optionally an affine stage after it. The transform maps baseline LPS points to
   follow-up LPS points (ITK's fixed -> moving).
3. Quality: the Dice overlap of the two brain masks after registration, over the part of the
   baseline mask that the follow-up's field of view covers. Below ``MIN_MASK_DICE`` the
   comparison is refused (`RegistrationError`): a misregistered pair would turn persistent
   CMBs into new ones. Mutual information after registration is reported too.
4. CMBs (detected on each scan, or read from given findings) are matched in the baseline
   space: follow-up centroids are mapped through the inverse transform and paired one to one
   with baseline centroids by Hungarian assignment (``evaluate.centroid_pairs``) within the
   tolerance ``max(tolerance_mm, 2 x the coarsest voxel edge of either scan)``.
5. Status: paired -> ``persistent``; follow-up only -> ``new``; baseline only -> ``not seen at
   follow-up``; a CMB whose position falls outside the other scan's field of view cannot be
   compared -> ``outside the other scan`` (never counted as new).
6. ARIA-H microhemorrhage grade from the number of new CMBs, as the lecanemab and donanemab
   labels define it (mild <= 4, moderate 5-9, severe >= 10; 0 new is no ARIA-H), see
   ``aria_h_grade`` and docs/longitudinal.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from . import __version__
from .dicomout import SEGMENTATION_NAME as DICOM_SEGMENTATION, DicomResults, comparison_results, source_series
from .dicomseg import segment_numbers
from .dicomseries import SourceSeries
from .dicomsr import ReportedCMB, centroid_lps
from .errors import InputError, RuntimeFailure
from .evaluate import centroid_pairs
from .files import atomic_write_text, check_replaceable, staged_directory
from .findings import Finding, read_findings, to_text_rows
from .geometry import LPS_RAS, Geometry, resample
from .pipeline import FINDINGS_NAME, RUN_NAME, SEGMENTATION_NAME as SEGMENT_SEGMENTATION, SegmentOptions, \
    check_writable, segment
from .preprocess import BrainMask, compute_brain_mask, load_brain_mask
from .progress import Reporter
from .runrecord import read_if_valid
from .scan import Scan, read_scan
from .segfile import read_seg_nrrd, write_seg_nrrd

PathLike = Union[str, Path]

TOLERANCE_MM = 4.0
TOLERANCE_VOXELS = 2.0  # the tolerance is at least this many of the coarsest voxel edge
REGISTRATION_MM = 2.0
SHRINK_FACTORS = (4, 2, 1)  # levels of 8, 4 and 2 mm
SMOOTHING_MM = (4.0, 2.0, 0.0)
HISTOGRAM_BINS = 32
SAMPLING = 0.3  # share of the baseline voxels drawn at each level (those in the brain mask are used)
MIN_MASK_DICE = 0.85

NEW, PERSISTENT, NOT_SEEN, OUTSIDE = "new", "persistent", "not seen at follow-up", "outside the other scan"
STATUSES = (NEW, PERSISTENT, NOT_SEEN, OUTSIDE)
GRADES = ("none", "mild", "moderate", "severe")
COLUMNS = ("status", "baseline_id", "followup_id", "baseline_r", "baseline_a", "baseline_s", "followup_r",
           "followup_a", "followup_s", "baseline_volume_mm3", "followup_volume_mm3", "distance_mm")
TSV_NAME, JSON_NAME, SEGMENTATION_NAME, REPORT_NAME = ("comparison.tsv", "comparison.json", "comparison.seg.nrrd",
                                                       "report.html")
NEW_COLOUR = (1.0, 0.55, 0.0)  # orange: new CMBs stand out from the CMB colour of the terminology


class RegistrationError(RuntimeFailure):
    """The two scans could not be aligned well enough to compare their CMBs."""


def aria_h_grade(new_cmbs: int) -> str:
    """ARIA-H microhemorrhage severity from the number of new CMBs (labels: <= 4, 5-9, >= 10; 0: none)."""
    if new_cmbs < 0:
        raise ValueError(f"number of new CMBs cannot be negative: {new_cmbs}")
    if new_cmbs == 0:
        return "none"
    return "mild" if new_cmbs <= 4 else "moderate" if new_cmbs <= 9 else "severe"


def tolerance_for(baseline: Geometry, followup: Geometry, minimum_mm: float = TOLERANCE_MM) -> float:
    """Matching distance: ``minimum_mm``, or twice the coarsest voxel edge of either scan when larger."""
    return max(float(minimum_mm), TOLERANCE_VOXELS * max(max(baseline.spacing), max(followup.spacing)))


# --- registration -------------------------------------------------------------------------


@dataclass
class Registration:
    """Follow-up registered to baseline: ``transform`` maps baseline LPS points to follow-up LPS points."""

    transform: sitk.Transform
    kind: str
    mutual_information: float  # Mattes MI after registration (ITK's sign: more negative is better)
    mask_dice: float
    seconds: float

    def to_followup_ras(self, ras: np.ndarray) -> np.ndarray:
        return _map(self.transform, ras)

    def to_baseline_ras(self, ras: np.ndarray) -> np.ndarray:
        return _map(self.transform.GetInverse(), ras)

    def summary(self) -> Dict[str, Any]:
        return {"kind": self.kind, "mutual_information": round(self.mutual_information, 5),
                "mask_dice": round(self.mask_dice, 4), "min_mask_dice": MIN_MASK_DICE,
                "seconds": round(self.seconds, 2), "baseline_to_followup_lps": _matrix(self.transform)}


def _map(transform: sitk.Transform, ras: np.ndarray) -> np.ndarray:
    points = np.asarray(ras, dtype=float).reshape(-1, 3) @ LPS_RAS
    return np.array([transform.TransformPoint(tuple(p)) for p in points]).reshape(-1, 3) @ LPS_RAS


def _matrix(transform: sitk.Transform) -> List[List[float]]:
    """4x4 matrix of an affine-like transform (LPS mm)."""
    origin = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    columns = [np.asarray(transform.TransformPoint(tuple(e))) - origin for e in np.eye(3)]
    m = np.eye(4)
    m[:3, :3] = np.column_stack(columns)
    m[:3, 3] = origin
    return np.round(m, 6).tolist()


def _coarse(image: sitk.Image, voxel_mm: float = REGISTRATION_MM) -> sitk.Image:
    """A copy on a ``voxel_mm`` grid with the image's own orientation and extent."""
    grid = Geometry.of(image)
    spacing = np.full(3, voxel_mm)
    size = np.maximum(np.ceil(np.asarray(grid.size) * grid.spacing / spacing), 1).astype(int)
    first = -0.5 + 0.5 * spacing / np.asarray(grid.spacing)
    coarse = Geometry(tuple(int(s) for s in size), tuple(spacing), tuple(grid.index_to_lps(first)), grid.direction)
    blocks = [max(1, int(voxel_mm / s)) for s in grid.spacing]  # block means first: no aliasing of fine voxels
    return resample(sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), blocks), coarse, sitk.sitkLinear)


def register(baseline: Scan, followup: Scan, baseline_mask: BrainMask, followup_mask: BrainMask,
             affine: bool = False) -> Registration:
    """Register the follow-up to the baseline (rigid, then affine when asked) and measure the result."""
    start = time.perf_counter()
    fixed, moving = _coarse(baseline.image), _coarse(followup.image)
    fixed_mask = resample(baseline_mask.image, Geometry.of(fixed), sitk.sitkNearestNeighbor,
                          pixel_type=sitk.sitkUInt8)
    moving_mask = resample(followup_mask.image, Geometry.of(moving), sitk.sitkNearestNeighbor,
                           pixel_type=sitk.sitkUInt8)
    initial = sitk.CenteredTransformInitializer(fixed_mask, moving_mask, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    transform, metric = _run(fixed, moving, fixed_mask, initial)
    kind = "rigid"
    if affine:
        stage = sitk.AffineTransform(3)
        stage.SetCenter(transform.GetCenter())
        stage.SetMatrix(transform.GetMatrix())
        stage.SetTranslation(transform.GetTranslation())
        transform, metric = _run(fixed, moving, fixed_mask, stage)
        kind = "affine"
    dice = _mask_dice(fixed_mask, moving_mask, transform)
    return Registration(transform, kind, metric, dice, time.perf_counter() - start)


def _run(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image,
         initial: sitk.Transform) -> Tuple[sitk.Transform, float]:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(SAMPLING, 12345)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4, numberOfIterations=300,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    method.SetSmoothingSigmasPerLevel(list(SMOOTHING_MM))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    transform = method.Execute(fixed, moving)
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(0)
    transform = sitk.Euler3DTransform(transform) if isinstance(initial, sitk.Euler3DTransform) \
        else sitk.AffineTransform(transform)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetShrinkFactorsPerLevel([1])
    method.SetSmoothingSigmasPerLevel([0.0])
    method.SetInitialTransform(transform, inPlace=False)
    return transform, float(method.MetricEvaluate(fixed, moving))


def _mask_dice(fixed_mask: sitk.Image, moving_mask: sitk.Image, transform: sitk.Transform) -> float:
    """Dice of the brain masks after registration, where the follow-up's field of view reaches."""
    mapped = sitk.Resample(moving_mask, fixed_mask, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    seen = sitk.Resample(moving_mask * 0 + 1, fixed_mask, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    a = sitk.GetArrayViewFromImage(fixed_mask) > 0
    b = sitk.GetArrayViewFromImage(mapped) > 0
    covered = sitk.GetArrayViewFromImage(seen) > 0
    a, b = a & covered, b & covered
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 0.0


# --- matching -----------------------------------------------------------------------------


@dataclass
class Match:
    """One CMB of the comparison: its status, its finding at each time point (None where absent) and its
    position in each scan's own RAS space (where it is absent: where registration puts it)."""

    status: str
    baseline: Optional[Finding]
    followup: Optional[Finding]
    baseline_ras: Tuple[float, float, float]
    followup_ras: Tuple[float, float, float]
    distance_mm: Optional[float] = None  # between the two findings, in baseline space, after registration

    def cells(self) -> Dict[str, Any]:
        b, f = self.baseline, self.followup
        return {"status": self.status, "baseline_id": b and b.cmb_id, "followup_id": f and f.cmb_id,
                **dict(zip(("baseline_r", "baseline_a", "baseline_s"), self.baseline_ras)),
                **dict(zip(("followup_r", "followup_a", "followup_s"), self.followup_ras)),
                "baseline_volume_mm3": b and b.volume_mm3, "followup_volume_mm3": f and f.volume_mm3,
                "distance_mm": self.distance_mm}


def match_findings(baseline: Sequence[Finding], followup: Sequence[Finding], registration: Registration,
                   baseline_grid: Geometry, followup_grid: Geometry, tolerance_mm: float) -> List[Match]:
    """Classify every CMB: pairs within ``tolerance_mm`` in baseline space are persistent (see module doc)."""
    base_ras = np.array([f.ras for f in baseline], dtype=float).reshape(-1, 3)
    follow_ras = np.array([f.ras for f in followup], dtype=float).reshape(-1, 3)
    base_there = registration.to_followup_ras(base_ras)  # baseline CMBs in follow-up space
    follow_there = registration.to_baseline_ras(follow_ras)  # follow-up CMBs in baseline space
    pairs = centroid_pairs(base_ras, follow_there, tolerance_mm)
    point = lambda p: tuple(float(v) for v in p)  # noqa: E731
    rows = [Match(PERSISTENT, baseline[b], followup[f], point(base_ras[b]), point(follow_ras[f]),
                  float(np.linalg.norm(base_ras[b] - follow_there[f]))) for b, f in pairs]
    paired_base, paired_follow = {b for b, _ in pairs}, {f for _, f in pairs}
    rows += [Match(NOT_SEEN if followup_grid.contains_ras(base_there[b]) else OUTSIDE, baseline[b], None,
                   point(base_ras[b]), point(base_there[b])) for b in range(len(baseline)) if b not in paired_base]
    rows += [Match(NEW if baseline_grid.contains_ras(follow_there[f]) else OUTSIDE, None, followup[f],
                   point(follow_there[f]), point(follow_ras[f]))
             for f in range(len(followup)) if f not in paired_follow]
    order = {status: n for n, status in enumerate(STATUSES)}
    return sorted(rows, key=lambda m: (order[m.status], m.followup.cmb_id if m.followup else 0,
                                       m.baseline.cmb_id if m.baseline else 0))


def counts(rows: Sequence[Match]) -> Dict[str, int]:
    return {status: sum(1 for m in rows if m.status == status) for status in STATUSES}


def to_tsv(rows: Sequence[Match]) -> str:
    def cell(name: str, value: Any) -> str:
        if value is None:
            return "n/a"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["\t".join(COLUMNS)] + ["\t".join(cell(c, m.cells()[c]) for c in COLUMNS) for m in rows]
    return "\n".join(lines) + "\n"


def read_tsv(path: PathLike) -> List[Dict[str, str]]:
    """comparison.tsv rows as dicts of strings (for front ends)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:] if line.strip()]


# --- the command --------------------------------------------------------------------------


@dataclass
class CompareOptions:
    """Settings of one `compare` run; ``detection`` applies to scans without given findings."""

    baseline_findings: Optional[PathLike] = None
    followup_findings: Optional[PathLike] = None
    baseline_mask: Optional[PathLike] = None
    followup_mask: Optional[PathLike] = None
    affine: bool = False
    tolerance_mm: float = TOLERANCE_MM
    detection: SegmentOptions = field(default_factory=SegmentOptions)
    report: bool = True
    baseline_dicom_source: Optional[PathLike] = None  # DICOM series each NIfTI/NRRD scan was converted from
    followup_dicom_source: Optional[PathLike] = None


@dataclass
class CompareResult:
    output_dir: Path
    rows: List[Match]
    registration: Registration
    summary: Dict[str, Any]  # what comparison.json holds
    files: List[str]


def compare(baseline_path: PathLike, followup_path: PathLike, out_dir: PathLike,
            options: Optional[CompareOptions] = None, progress: Optional[Reporter] = None) -> CompareResult:
    """Register, detect (unless findings are given), match, grade, and write ``out_dir``."""
    options = options or CompareOptions()
    out = Path(out_dir)
    check_replaceable(out, _is_comparison, _COMPARISON_WHAT)
    check_writable(out)
    say = _Steps(progress)
    say("read", 0.0, "reading both scans")
    baseline, followup = read_scan(baseline_path), read_scan(followup_path)
    source_series(baseline, options.baseline_dicom_source, options.detection.dicom)  # refused here, not after hours
    series = source_series(followup, options.followup_dicom_source, options.detection.dicom)
    given = [_given_findings(scan, path, other) if path else None
             for scan, path, other in ((baseline, options.baseline_findings, followup),
                                       (followup, options.followup_findings, baseline))]
    say("mask", 0.03, "brain masks")
    masks = [load_brain_mask(m, s) if m else compute_brain_mask(s)
             for s, m in ((baseline, options.baseline_mask), (followup, options.followup_mask))]
    say("register", 0.06, "registering the follow-up to the baseline")
    registration = register(baseline, followup, masks[0], masks[1], options.affine)
    if registration.mask_dice < MIN_MASK_DICE:
        raise RegistrationError(
            f"{followup.path.name} does not register to {baseline.path.name} well enough to compare CMBs: "
            f"brain-mask Dice {registration.mask_dice:.2f} after registration, below {MIN_MASK_DICE:.2f}; not graded "
            "(same subject? give brain masks with --baseline-mask/--followup-mask)")
    started = _dt.datetime.now(_dt.timezone.utc)
    with staged_directory(out, _is_comparison, _COMPARISON_WHAT) as stage:
        inputs = [given[n] or _detect(scan, name, stage, options, say.part(0.1 + 0.4 * n, 0.5 + 0.4 * n))
                  for n, (scan, name) in enumerate(((baseline, "baseline"), (followup, "followup")))]
        say("match", 0.9, "matching CMBs")
        tolerance = tolerance_for(baseline.geometry, followup.geometry, options.tolerance_mm)
        rows = match_findings(inputs[0][0], inputs[1][0], registration, baseline.geometry, followup.geometry,
                              tolerance)
        summary = _summary(baseline, followup, inputs, registration, rows, tolerance, options, started)
        say("write", 0.95, "writing the comparison")
        dicom = _dicom_report(series, rows, inputs[1], summary) if series is not None else None
        files = _write(stage, baseline, followup, inputs[1], rows, registration, summary, options.report, dicom)
    return CompareResult(out, rows, registration, summary, files)


class _Steps:
    """Progress of the comparison; ``part`` gives a reporter for a nested `segment` run."""

    def __init__(self, progress: Optional[Reporter]) -> None:
        self.progress = progress

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        if self.progress is not None:
            self.progress(stage, fraction, message)

    def part(self, lo: float, hi: float) -> Optional[Reporter]:
        if self.progress is None:
            return None
        return lambda stage, fraction, message: self(stage, lo + (hi - lo) * fraction, message)


def _is_comparison(folder: Path) -> bool:
    """An empty folder or an earlier comparison: what the result may replace whole."""
    return not any(folder.iterdir()) or (folder / JSON_NAME).is_file()


_COMPARISON_WHAT = f"an earlier comparison (no {JSON_NAME})"


Inputs = Tuple[List[Finding], Dict[str, Any], Optional[Path]]  # findings, provenance, their cmb.seg.nrrd


def _detect(scan: Scan, name: str, stage: Path, options: CompareOptions, progress: Optional[Reporter]) -> Inputs:
    """Segment the scan into ``stage/<name>/``."""
    baseline = name == "baseline"
    detection = replace(options.detection, scan_id=name,
                        mask=options.baseline_mask if baseline else options.followup_mask,
                        dicom_source=options.baseline_dicom_source if baseline else options.followup_dicom_source)
    result = segment(scan.path, stage, detection, progress=progress)
    provenance = {"source": "detected", "folder": name, "model": result.run.model}
    return result.findings, provenance, result.output_dir / SEGMENT_SEGMENTATION


def _given_findings(scan: Scan, given: PathLike, other: Scan) -> Inputs:
    """Findings from a table or a `segment` result folder, checked against the scan (and, through the run.json
    beside them, against the other scan: swapped tables are refused); rejected ones left out."""
    given = Path(given)
    table = given / FINDINGS_NAME if given.is_dir() else given
    if not table.is_file():
        raise InputError(given, f"no findings table ({FINDINGS_NAME}, a .json findings file, or a `shivacmb segment` "
                                "result folder)")
    run = read_if_valid(table.parent / RUN_NAME)
    source = None if run is None else str(run.input["sha256"])
    if source is not None and source == other.sha256 != scan.sha256:
        raise InputError(table, f"these are the findings of {other.path.name} (its run.json names that scan), not of "
                                f"{scan.path.name}: are the baseline and follow-up findings swapped?")
    findings = [f for f in read_findings(table) if f.status != "rejected"]
    outside = sum(not scan.geometry.contains_ras(np.asarray(f.ras)) for f in findings)
    if outside:
        raise InputError(table, f"{outside} of {len(findings)} CMBs lie outside the field of view of "
                                f"{scan.path.name}: findings of another scan?")
    provenance = {"source": str(table.resolve()), **({"model": run.model} if run is not None else {})}
    return findings, provenance, table.parent / SEGMENT_SEGMENTATION


def _labels(scan: Scan, findings: Sequence[Finding], segmentation: Optional[Path]) -> np.ndarray:
    """Label map of the findings on the scan's grid: their cmb.seg.nrrd when it is on that grid, else spheres
    of each CMB's volume around its centroid."""
    grid = scan.geometry
    ids = np.array([f.cmb_id for f in findings], dtype=int)
    if segmentation is not None and segmentation.is_file():
        labels, seg_grid, _ = read_seg_nrrd(segmentation)
        if seg_grid.size == grid.size and np.allclose(seg_grid.ijk_to_lps(), grid.ijk_to_lps(), atol=1e-3):
            return np.where(np.isin(labels, ids), labels, 0).astype(np.uint16)
    labels = np.zeros(grid.array_shape, dtype=np.uint16)
    spacing = np.asarray(grid.spacing)
    for f in findings:
        radius = (3.0 * max(f.volume_mm3, 0.0) / (4.0 * np.pi)) ** (1.0 / 3.0)
        centre = grid.ras_to_index(np.asarray(f.ras))
        lo = np.maximum(np.floor(centre - radius / spacing - 1), 0).astype(int)
        hi = np.minimum(np.ceil(centre + radius / spacing + 1), np.asarray(grid.size) - 1).astype(int)
        ii, jj, kk = np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi)], indexing="ij")
        voxels = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1)
        near = voxels[np.linalg.norm(grid.index_to_ras(voxels) - np.asarray(f.ras), axis=1) <= radius]
        near = np.vstack([near, np.clip(np.round(centre), 0, np.asarray(grid.size) - 1).astype(int)])
        free = labels[near[:, 2], near[:, 1], near[:, 0]] == 0
        labels[near[free, 2], near[free, 1], near[free, 0]] = f.cmb_id
    return labels


def _summary(baseline: Scan, followup: Scan, inputs: Sequence[Inputs], registration: Registration,
             rows: Sequence[Match], tolerance: float, options: CompareOptions, started: _dt.datetime) -> Dict[str, Any]:
    found = counts(rows)
    scans = {}
    for name, scan, (findings, provenance, _) in (("baseline", baseline, inputs[0]), ("followup", followup, inputs[1])):
        scans[name] = {"path": str(Path(scan.path).resolve()), "sha256": scan.sha256, "cmb_count": len(findings),
                       "findings": provenance, "geometry": scan.geometry.to_dict()}
    return {
        "software": {"name": "shivacmb", "version": __version__, "simpleitk": sitk.Version.VersionString()},
        **scans,
        "registration": registration.summary(),
        "matching": {"tolerance_mm": round(tolerance, 3), "minimum_tolerance_mm": options.tolerance_mm,
                     "tolerance_voxels": TOLERANCE_VOXELS},
        "counts": found,
        "aria_h": {"new_microhemorrhages": found[NEW], "grade": aria_h_grade(found[NEW]),
                   "rule": "lecanemab/donanemab labels, ARIA-H microhemorrhage: mild <= 4 new, moderate 5-9, "
                           "severe >= 10 (0 new: none); a radiologist confirms every new CMB"},
        "started": started.isoformat(timespec="seconds"),
    }


def _dicom_report(series: SourceSeries, rows: Sequence[Match], followup_inputs: Inputs,
                  summary: Dict[str, Any]) -> DicomResults:
    """comparison.sr.dcm: every CMB with its status, in the follow-up's frame of reference (a CMB seen only at
    baseline where registration puts it), referencing the follow-up's segments when it was segmented here."""
    import pydicom

    _, provenance, segmentation_path = followup_inputs
    segmentation = None
    if provenance["source"] == "detected" and (segmentation_path.parent / DICOM_SEGMENTATION).is_file():
        segmentation = pydicom.dcmread(str(segmentation_path.parent / DICOM_SEGMENTATION))
    numbers = segment_numbers(segmentation) if segmentation is not None else {}
    cmbs = []
    for m in rows:
        finding = m.followup or m.baseline
        cells = to_text_rows([finding])[0]
        if m.followup is not None:
            cmbs.append(ReportedCMB(f"CMB {finding.cmb_id}", cells, centroid_lps(cells), numbers.get(finding.cmb_id),
                                    m.status))
        else:
            r, a, s = (round(v, 2) for v in m.followup_ras)
            cmbs.append(ReportedCMB(f"baseline CMB {finding.cmb_id}", cells, (-r, -a, s), None, m.status))
    aria = summary["aria_h"]
    return comparison_results(series, cmbs, aria["new_microhemorrhages"], aria["grade"],
                              provenance.get("model") or {}, segmentation)


def _write(stage: Path, baseline: Scan, followup: Scan, followup_inputs: Inputs, rows: Sequence[Match],
           registration: Registration, summary: Dict[str, Any], report: bool,
           dicom: Optional[DicomResults]) -> List[str]:
    from .report import write_comparison_report

    findings, _, segmentation = followup_inputs
    labels = _labels(followup, findings, segmentation)
    new_ids = {m.followup.cmb_id for m in rows if m.status == NEW}
    styles = {f.cmb_id: (f"new CMB {f.cmb_id}", NEW_COLOUR) for f in findings if f.cmb_id in new_ids}
    files = [TSV_NAME, SEGMENTATION_NAME]
    try:
        atomic_write_text(stage / TSV_NAME, to_tsv(rows))
        write_seg_nrrd(stage / SEGMENTATION_NAME, labels, followup.geometry, findings, styles=styles)
        if dicom is not None:
            files += dicom.write(stage)
            summary["dicom"] = dicom.summary()
        if report:
            files.append(REPORT_NAME)
            write_comparison_report(stage / REPORT_NAME, baseline.image, followup.image, labels, rows,
                                    registration.transform, summary)
        files.append(JSON_NAME)
        summary["files"] = files
        summary["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        atomic_write_text(stage / JSON_NAME, json.dumps(summary, indent=2) + "\n")
    except OSError as err:
        raise RuntimeFailure(f"{stage.parent}: cannot write the comparison: {err.strerror or err}") from None
    return files
