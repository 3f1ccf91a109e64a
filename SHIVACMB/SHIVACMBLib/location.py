"""MARS anatomical location of every CMB: region, area (lobar, deep, infratentorial) and side.

Two sources, chosen automatically:
- a parcellation the user gives (FreeSurfer aseg, aparc+aseg, wmparc or SynthSeg labels, on
  any grid), mapped to MARS regions by ``models/atlas/parcellation_labels.tsv``;
- otherwise the shipped MNI atlas (``models/atlas/``, see its README), registered to the scan
  with SimpleITK: affine, then a coarse B-spline, both by Mattes mutual information (any
  contrast: SWI, T2*-GRE, T1) inside the brain masks, on a 3 mm copy of the scan; the B-spline
  stands unless it lowers the brain overlap by more than ``BSPLINE_DICE_LOSS``. The warped
  atlas brain must overlap the scan's brain mask over the scan's field of view (Dice >=
  ``MIN_DICE``) and the affine part must scale the brain as a human brain differs from the
  atlas's (``VOLUME_RATIO``, ``AXIS_SCALE``); otherwise every CMB is ``unknown`` and run.json
  carries a warning. A wrong brain mask (a corner of the field of view, one hemisphere) fails
  one or the other: the atlas shrinks to fit it, or overlaps it badly.

A CMB takes the region of the majority of its voxels (each voxel sampled on a ~1 mm lattice,
so thick slices count by volume); ties go to the region listed first in ``SUBREGIONS``, the
MARS rating form's order. Cortex and juxtacortical white matter are lobar. Side: the
hemisphere of the region when the parcellation names one, else the side of the midsagittal
plane (MNI x = 0 through the registration; for a parcellation, the plane halfway between its
left and right labels), ``midline`` within ``MIDLINE_MM`` of it.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy.spatial import cKDTree

from .errors import InputError, RuntimeFailure
from .findings import Finding
from .geometry import LPS_RAS, Geometry, resample
from .mars import AREAS, SIDES, SUBREGIONS, UNKNOWN
from .resources import bundled_models_dir
from .scan import read_label_image

PathLike = Union[str, Path]

AREA_OF = dict(SUBREGIONS)
CODE_OF = {name: code for code, (name, _area) in enumerate(SUBREGIONS, start=1)}
WHITE_MATTER = "white_matter"  # parcellation class: lobar or deep by the distance to the cortex

ATLAS_FOLDER = "atlas"
ATLAS_TEMPLATE = "mni_t1_2mm.nii.gz"
ATLAS_LABELS = "mars_labels_1mm.nii.gz"
PARCELLATION_TABLE = "parcellation_labels.tsv"

MIDLINE_MM = 2.0
JUXTACORTICAL_MM = 5.0  # white matter this close to the cortex is lobar (FreeSurfer's wmparc uses 5 mm too)
SEARCH_MM = 4.0  # a CMB with no labelled voxel takes the labels around its centre within this radius
REGISTRATION_MM = 3.0
MIN_PARCELLATION_OVERLAP = 0.5  # of a parcellation's labelled voxels inside the scan's field of view
MIN_DICE = 0.75  # computed masks of good registrations give 0.96-0.97 (bench), wrong masks 0.38-0.66
# The B-spline follows anatomy inside the brain (ventricles, deep nuclei) that the mask's edge does not
# show: on atlas phantoms it lowers the brain overlap by up to 0.03, and keeping it on warped ones
# raised the MARS area accuracy from 96.8 to 98.7 % (`bench/location_bench.py --warp 20 --seed 720000`,
# against keeping it only when the overlap did not drop); a B-spline that ran away would lower it far more.
BSPLINE_DICE_LOSS = 0.05
BSPLINE_SAMPLING = 0.05  # of the voxels in the mask, drawn with a fixed seed: 10 % found the same regions
# Atlas brain (2.1 L with its CSF) per scan volume, the affine's determinant: adult brains of about
# 0.85-4 L pass, an atlas shrunk or blown up to fit a wrong mask does not. Per axis (singular values
# of the affine's matrix): head shapes differ from the atlas's by far less than this.
VOLUME_RATIO = (0.5, 2.5)
AXIS_SCALE = (0.6, 1.7)


@dataclass
class Located:
    """Findings with their location filled in, and what run.json says about it."""

    findings: List[Finding]
    summary: Dict[str, object]
    warnings: List[str] = field(default_factory=list)


# --- shipped data -------------------------------------------------------------------------


def atlas_dir() -> Path:
    base = bundled_models_dir()
    if base is None or not (base / ATLAS_FOLDER / ATLAS_LABELS).is_file():
        raise RuntimeFailure("the MARS location atlas (models/atlas) is missing from this installation; "
                             "reinstall, or run with --no-location")
    return base / ATLAS_FOLDER


@lru_cache(maxsize=1)
def load_atlas() -> Tuple[sitk.Image, sitk.Image]:
    """The MNI T1 template (float32, 2 mm) and the MARS label map (uint8, 1 mm)."""
    folder = atlas_dir()
    template = sitk.Cast(sitk.ReadImage(str(folder / ATLAS_TEMPLATE)), sitk.sitkFloat32)
    return template, sitk.ReadImage(str(folder / ATLAS_LABELS))


@lru_cache(maxsize=1)
def parcellation_table() -> Dict[int, Tuple[str, str]]:
    """FreeSurfer/SynthSeg label -> (MARS sub-region or ``white_matter``, side or ``-``)."""
    table = {}
    with open(atlas_dir() / PARCELLATION_TABLE, encoding="utf-8") as f:
        for row in csv.DictReader((line for line in f if not line.startswith("#")), delimiter="\t"):
            table[int(row["label"])] = (row["region"], row["side"])
    return table


# --- entry point --------------------------------------------------------------------------


def locate(scan: sitk.Image, brain_mask: sitk.Image, labels: np.ndarray, findings: Sequence[Finding],
           parcellation: Union[None, PathLike, "ParcellationLookup"] = None) -> Located:
    """Fill region, mars_area and side of ``findings`` (CMB k = label k of ``labels``, [k, j, i] on the scan grid).

    ``parcellation``: a label map's path, or one already read (a run reads it before its long steps)."""
    native = Geometry.of(scan)
    started = time.perf_counter()
    if parcellation is not None and not isinstance(parcellation, ParcellationLookup):
        parcellation = ParcellationLookup(Path(parcellation), native)
    if not findings:
        return Located([], _summary([], "none", {}))
    samples = {f.cmb_id: _voxel_samples(native, labels, f.cmb_id) for f in findings}
    if parcellation is not None:
        lookup = parcellation
        source, details, warnings = "parcellation", {"parcellation": str(parcellation.path.resolve())}, []
    else:
        lookup, check = AtlasLookup.register(scan, brain_mask)
        source, details = "atlas", check.to_dict()
        warnings = [] if lookup.ok else [f"atlas registration failed ({'; '.join(check.problems())}): "
                                         "CMB locations are unknown"]
    located = [replace(f, **lookup.locate(samples[f.cmb_id], LPS_RAS @ np.asarray(f.ras))) for f in findings]
    details["seconds"] = round(time.perf_counter() - started, 2)
    return Located(located, _summary(located, source, details), warnings)


def _voxel_samples(grid: Geometry, labels: np.ndarray, cmb_id: int) -> np.ndarray:
    """LPS points filling the CMB's voxels on a lattice of about 1 mm (one per voxel at least)."""
    k, j, i = np.nonzero(labels == cmb_id)
    steps = [np.arange(n) / n - (n - 1) / (2 * n) for n in np.maximum(np.round(grid.spacing), 1).astype(int)]
    offsets = np.stack(np.meshgrid(*steps, indexing="ij"), axis=-1).reshape(-1, 3)
    ijk = np.stack([i, j, k], axis=1)[:, None, :] + offsets[None]
    return grid.index_to_lps(ijk.reshape(-1, 3))


def _majority(codes: np.ndarray) -> int:
    """Most frequent non-zero code; ties go to the lowest code (first in SUBREGIONS); 0 if none."""
    codes = codes[codes > 0]
    if codes.size == 0:
        return 0
    return int(np.argmax(np.bincount(codes, minlength=len(SUBREGIONS) + 1)))


def _ball(centre: np.ndarray, radius: float = SEARCH_MM) -> np.ndarray:
    axis = np.arange(-radius, radius + 0.5)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    return centre + grid[np.linalg.norm(grid, axis=1) <= radius]


def _side(x_right_mm: float) -> str:
    """Side from the signed distance to the midsagittal plane (positive towards the subject's right)."""
    if abs(x_right_mm) <= MIDLINE_MM:
        return "midline"
    return "right" if x_right_mm > 0 else "left"


def _location(code: int, side: str) -> Dict[str, str]:
    if code == 0:
        return {"region": UNKNOWN, "mars_area": UNKNOWN, "side": UNKNOWN}
    name, area = SUBREGIONS[code - 1]
    return {"region": name, "mars_area": area, "side": side}


# --- source (b): the MNI atlas ------------------------------------------------------------


@dataclass(frozen=True)
class RegistrationCheck:
    """What tells a registration of the atlas to a scan from a failed one."""

    dice: float  # warped atlas brain vs the scan's brain mask, over the scan's field of view
    volume_ratio: float  # atlas volume per scan volume: the determinant of the affine part
    axis_scales: Tuple[float, float, float]  # the affine part's scale along its principal axes
    deformable: str = "kept"  # the B-spline step: kept, or why not ("lowered the brain overlap", "failed")

    @classmethod
    def of(cls, dice: float, affine: sitk.AffineTransform, deformable: str = "kept") -> "RegistrationCheck":
        matrix = np.asarray(affine.GetMatrix()).reshape(3, 3)
        scales = np.linalg.svd(matrix, compute_uv=False)
        return cls(float(dice), float(np.linalg.det(matrix)), tuple(float(s) for s in scales), deformable)

    def problems(self) -> List[str]:
        """Why the registration is not trusted (empty when it is)."""
        found = []
        if self.dice < MIN_DICE:
            found.append(f"brain overlap Dice {self.dice:.2f} < {MIN_DICE}")
        if not VOLUME_RATIO[0] <= self.volume_ratio <= VOLUME_RATIO[1]:
            found.append(f"atlas volume scaled by {self.volume_ratio:.2f}, outside {VOLUME_RATIO[0]}-{VOLUME_RATIO[1]}")
        if not all(AXIS_SCALE[0] <= s <= AXIS_SCALE[1] for s in self.axis_scales):
            found.append(f"atlas axes scaled by {'/'.join(f'{s:.2f}' for s in self.axis_scales)}, "
                         f"outside {AXIS_SCALE[0]}-{AXIS_SCALE[1]}")
        return found

    def to_dict(self) -> Dict[str, object]:
        method = ("affine + B-spline, Mattes MI" if self.deformable == "kept"
                  else f"affine, Mattes MI (the B-spline {self.deformable})")
        return {"registration": method, "dice": round(self.dice, 3), "min_dice": MIN_DICE,
                "volume_ratio": round(self.volume_ratio, 3), "axis_scales": [round(s, 3) for s in self.axis_scales],
                "failed": self.problems()}


@dataclass
class AtlasLookup:
    """Atlas labels at scan points through ``transform`` (scan LPS -> MNI LPS)."""

    transform: sitk.Transform
    ok: bool

    @classmethod
    def register(cls, scan: sitk.Image, brain_mask: sitk.Image) -> Tuple["AtlasLookup", RegistrationCheck]:
        transform, check = register_atlas(scan, brain_mask)
        return cls(transform, not check.problems()), check

    def locate(self, points: np.ndarray, centre: np.ndarray) -> Dict[str, str]:
        if not self.ok:
            return _location(0, UNKNOWN)
        atlas = load_atlas()[1]
        code = _majority(_labels_at(atlas, self._map(points)))
        if code == 0:
            code = _majority(_labels_at(atlas, self._map(_ball(centre))))
        mni_right = -self._map(centre[None])[0, 0]
        return _location(code, _side(mni_right))

    def _map(self, points: np.ndarray) -> np.ndarray:
        return np.array([self.transform.TransformPoint(tuple(float(v) for v in p)) for p in points])


def _labels_at(image: sitk.Image, lps: np.ndarray) -> np.ndarray:
    """Label values at LPS points (nearest voxel; 0 outside the image)."""
    grid = Geometry.of(image)
    ijk = np.rint(grid.lps_to_index(lps)).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.asarray(grid.size)), axis=1)
    values = np.zeros(len(lps), dtype=np.int64)
    array = sitk.GetArrayViewFromImage(image)
    values[inside] = array[ijk[inside, 2], ijk[inside, 1], ijk[inside, 0]]
    return values


def register_atlas(scan: sitk.Image, brain_mask: sitk.Image) -> Tuple[sitk.Transform, RegistrationCheck]:
    """Transform from scan LPS to MNI LPS, and its check (overlap of the warped atlas brain with the mask,
    scale of the affine part)."""
    template = load_atlas()[0]
    fixed, fixed_mask = _registration_grid(scan, brain_mask)
    moving_mask = sitk.Cast(template > 0, sitk.sitkUInt8)
    overlap = _Overlap(Geometry.of(scan), brain_mask, moving_mask)
    affine = _initial_affine(fixed_mask, moving_mask)
    method = _method(fixed_mask, moving_mask)
    method.SetOptimizerAsRegularStepGradientDescent(2.0, 0.01, 120, relaxationFactor=0.6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0])
    method.SetInitialTransform(affine, inPlace=True)
    method.Execute(fixed, template)
    best, best_dice, deformable = affine, overlap.dice(affine), "failed"

    bspline = sitk.BSplineTransformInitializer(fixed, [3, 3, 3], order=3)
    method = _method(fixed_mask, moving_mask)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(BSPLINE_SAMPLING, 1)  # fixed seed: the same scan gives the same result
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=20,
                                maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=40)
    method.SetMovingInitialTransform(affine)
    method.SetInitialTransform(bspline, inPlace=True)
    try:
        method.Execute(fixed, template)
        warped = sitk.CompositeTransform([affine, bspline])
        dice = overlap.dice(warped)
        deformable = "lowered the brain overlap"
        if dice >= best_dice or (dice >= best_dice - BSPLINE_DICE_LOSS and dice >= MIN_DICE):
            best, best_dice, deformable = warped, dice, "kept"
    except RuntimeError:  # the deformable step is a refinement: the affine result stands without it
        pass
    return best, RegistrationCheck.of(best_dice, affine, deformable)


def _method(fixed_mask: sitk.Image, moving_mask: sitk.Image) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricFixedMask(fixed_mask)
    method.SetMetricMovingMask(moving_mask)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    return method


def _registration_grid(scan: sitk.Image, brain_mask: sitk.Image) -> Tuple[sitk.Image, sitk.Image]:
    """The scan and its brain mask on a 3 mm LPS grid around the mask (mask dilated by 3 mm)."""
    mask_grid = Geometry.of(brain_mask)
    k, j, i = np.nonzero(sitk.GetArrayViewFromImage(brain_mask))
    corners = mask_grid.index_to_lps(np.array([[a, b, c] for a in (i.min(), i.max()) for b in (j.min(), j.max())
                                               for c in (k.min(), k.max())], dtype=float))
    low, high = corners.min(axis=0) - 15.0, corners.max(axis=0) + 15.0
    size = np.ceil((high - low) / REGISTRATION_MM).astype(int) + 1
    grid = Geometry(tuple(int(s) for s in size), (REGISTRATION_MM,) * 3, tuple(low), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    sigma = max(REGISTRATION_MM / 2.0, *[s / 2.0 for s in Geometry.of(scan).spacing])
    fine = Geometry(tuple(int(s) * 2 for s in size), (REGISTRATION_MM / 2.0,) * 3, tuple(low), grid.direction)
    image = sitk.SmoothingRecursiveGaussian(resample(scan, fine, sitk.sitkLinear), sigma)
    image = resample(image, grid, sitk.sitkLinear)
    mask = resample(brain_mask, grid, sitk.sitkNearestNeighbor, pixel_type=sitk.sitkUInt8)
    return image, sitk.Cast(sitk.BinaryDilate(mask > 0, [1, 1, 1]), sitk.sitkUInt8)


def _initial_affine(fixed_mask: sitk.Image, moving_mask: sitk.Image) -> sitk.AffineTransform:
    """Same axes (both in patient space), centres of the masks matched, scaled by their volume ratio."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(fixed_mask)
    fixed_centre, fixed_volume = np.asarray(stats.GetCentroid(1)), stats.GetPhysicalSize(1)
    stats.Execute(moving_mask)
    moving_centre, moving_volume = np.asarray(stats.GetCentroid(1)), stats.GetPhysicalSize(1)
    scale = (moving_volume / fixed_volume) ** (1.0 / 3.0)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(tuple(fixed_centre))
    affine.SetMatrix(tuple((np.eye(3) * scale).ravel()))
    affine.SetTranslation(tuple(moving_centre - fixed_centre))
    return affine


class _Overlap:
    """Dice of the warped atlas brain with the scan's brain mask over the whole field of view of the scan
    (3 mm voxels), so that atlas brain outside a wrong mask's neighbourhood counts against it."""

    def __init__(self, scan_grid: Geometry, brain_mask: sitk.Image, atlas_brain: sitk.Image):
        self.grid = scan_grid.coarsened(REGISTRATION_MM)
        self.atlas_brain = atlas_brain
        mask = resample(brain_mask, self.grid, sitk.sitkNearestNeighbor, pixel_type=sitk.sitkUInt8)
        self.mask = sitk.GetArrayFromImage(mask) > 0

    def dice(self, transform: sitk.Transform) -> float:
        warped = resample(self.atlas_brain, self.grid, sitk.sitkNearestNeighbor, pixel_type=sitk.sitkUInt8,
                          transform=transform)
        atlas = sitk.GetArrayViewFromImage(warped) > 0
        total = np.count_nonzero(self.mask) + np.count_nonzero(atlas)
        return float(2.0 * np.count_nonzero(self.mask & atlas) / max(1, total))


# --- source (a): a user parcellation ------------------------------------------------------


class ParcellationLookup:
    """MARS regions from a FreeSurfer/SynthSeg label map through the shipped table, checked against the scan
    it is for (its labelled voxels must lie mostly in the scan's field of view)."""

    def __init__(self, path: Path, scan_grid: Geometry):
        self.path = path
        if path.name.lower().endswith((".mgz", ".mgh")):
            raise InputError(path, "FreeSurfer .mgz/.mgh cannot be read; convert it to NIfTI first "
                                   f"(mri_convert {path.name} {path.name[:-4]}.nii.gz)")
        self.image = read_label_image(path)
        if not np.issubdtype(sitk.GetArrayViewFromImage(self.image).dtype, np.integer):  # labels stored as floats
            self.image = sitk.Cast(sitk.Round(self.image), sitk.sitkInt32)
        array = sitk.GetArrayViewFromImage(self.image)
        values = np.unique(array).astype(int)
        table = parcellation_table()
        known = [v for v in values if v in table]
        if not known:
            raise InputError(path, "no FreeSurfer/SynthSeg label found (aseg, aparc+aseg, wmparc or SynthSeg "
                                   "label maps are expected)")
        self.grid = Geometry.of(self.image)
        k, j, i = np.nonzero(np.isin(array, known))
        step = max(1, i.size // 200_000)  # a sample is enough to measure the overlap
        inside = float(np.mean(scan_grid.contains_ras(self.grid.index_to_ras(np.stack([i, j, k], 1)[::step]))))
        if inside < MIN_PARCELLATION_OVERLAP:
            raise InputError(path, f"parcellation does not overlap the scan: only {inside:.0%} of its labelled "
                                   "voxels lie in the scan's field of view (is it in the scan's space?)")
        self.table = table
        self._cortex: Optional[Tuple[cKDTree, np.ndarray]] = None
        self._plane = self._midsagittal_plane(np.asarray(array))

    def _midsagittal_plane(self, array: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Point and unit normal (towards the right) halfway between the left and right labels."""
        centres = {}
        for side in ("left", "right"):
            labels = [v for v, (_r, s) in self.table.items() if s == side]
            k, j, i = np.nonzero(np.isin(array, labels))
            if i.size == 0:
                raise InputError(self.path, f"parcellation has no {side} hemisphere label")
            centres[side] = self.grid.index_to_lps(np.array([i.mean(), j.mean(), k.mean()]))
        normal = LPS_RAS @ (centres["right"] - centres["left"])  # RAS direction towards the right
        return LPS_RAS @ ((centres["right"] + centres["left"]) / 2.0), normal / np.linalg.norm(normal)

    def locate(self, points: np.ndarray, centre: np.ndarray) -> Dict[str, str]:
        code, side = self._majority_region(points)
        if code == 0:
            code, side = self._majority_region(_ball(centre))
        if side not in ("left", "right"):
            point, normal = self._plane
            side = _side(float((LPS_RAS @ centre - point) @ normal))
        return _location(code, side)

    def _majority_region(self, points: np.ndarray) -> Tuple[int, str]:
        values = _labels_at(self.image, points)
        codes = np.zeros(len(points), dtype=np.int64)
        sides = np.full(len(points), "-", dtype=object)
        for value in np.unique(values):
            region, side = self.table.get(int(value), ("none", "-"))
            where = values == value
            sides[where] = side
            if region == WHITE_MATTER:
                codes[where] = self._white_matter(points[where])
            elif region in CODE_OF:
                codes[where] = CODE_OF[region]
        code = _majority(codes)
        voted = sides[codes == code] if code else sides[:0]
        side = max(("left", "right"), key=lambda s: np.count_nonzero(voted == s))
        return code, side if np.count_nonzero(voted == side) * 2 > len(voted) else "-"

    def _white_matter(self, points: np.ndarray) -> np.ndarray:
        """Juxtacortical white matter takes the lobe of the nearest cortex; deeper is deep white matter."""
        tree, lobes = self._cortex_index()
        if tree is None:
            return np.full(len(points), CODE_OF["deep_white_matter"])
        distance, nearest = tree.query(points)
        return np.where(distance <= JUXTACORTICAL_MM, lobes[nearest], CODE_OF["deep_white_matter"])

    def _cortex_index(self) -> Tuple[Optional[cKDTree], np.ndarray]:
        if self._cortex is None:
            array = sitk.GetArrayViewFromImage(self.image)
            cortical = {v: CODE_OF[r] for v, (r, _s) in self.table.items()
                        if r in CODE_OF and AREA_OF[r] == "lobar"}
            k, j, i = np.nonzero(np.isin(array, list(cortical)))
            if i.size == 0:
                self._cortex = (None, np.zeros(0, dtype=np.int64))
            else:
                lobes = np.vectorize(cortical.get)(np.asarray(array)[k, j, i].astype(int))
                self._cortex = (cKDTree(self.grid.index_to_lps(np.stack([i, j, k], axis=1))), lobes)
        return self._cortex


# --- counts -------------------------------------------------------------------------------


def _summary(findings: Sequence[Finding], source: str, details: Dict[str, object]) -> Dict[str, object]:
    return {"source": source, **details, **count_locations(findings)}


def count_locations(findings: Sequence[Finding]) -> Dict[str, object]:
    """Counts by MARS area x side (all CMBs not rejected; definite and possible apart when rated), by
    sub-region, and the Boston-criteria distribution (strictly lobar, mixed, deep)."""
    kept = [f for f in findings if f.status != "rejected"]
    counts = {"by_area_side": _area_side(kept), "by_region": _by_region(kept)}
    rated = [f for f in kept if f.status in ("definite", "possible")]
    if rated:
        counts["by_rating"] = {status: _area_side([f for f in kept if f.status == status])
                               for status in ("definite", "possible")}
    counts["boston"] = boston_distribution(kept)
    return counts


def _area_side(findings: Sequence[Finding]) -> Dict[str, Dict[str, int]]:
    table = {area: {side: 0 for side in SIDES} for area in AREAS}
    table[UNKNOWN] = {"count": 0}
    for f in findings:
        if f.mars_area in AREAS and f.side in SIDES:
            table[f.mars_area][f.side] += 1
        else:
            table[UNKNOWN]["count"] += 1
    return table


def _by_region(findings: Sequence[Finding]) -> Dict[str, int]:
    names = [name for name, _area in SUBREGIONS] + [UNKNOWN]
    return {name: n for name in names if (n := sum(1 for f in findings if (f.region if f.region in CODE_OF
                                                                          else UNKNOWN) == name))}


def boston_distribution(findings: Sequence[Finding]) -> str:
    """``strictly_lobar``, ``mixed`` (lobar and deep/infratentorial), ``deep`` (deep/infratentorial only),
    ``none`` (no CMB), or ``unknown`` when a CMB without location could change the answer."""
    areas = {f.mars_area for f in findings}
    if not findings:
        return "none"
    lobar = "lobar" in areas
    deep = bool(areas & {"deep", "infratentorial"})
    if lobar and deep:
        return "mixed"
    if areas - set(AREAS):
        return UNKNOWN
    return "strictly_lobar" if lobar else "deep"
