"""Realistic phantoms: atlas anatomy (``anatomy``), domain-randomised SWI and T2*-GRE contrast.

Four families share the anatomy and the ground truth format of ``synthetic`` (``write_phantom``):

- ``atlas``, for training, validation and the in-distribution held-out set: per tissue class a
  random intensity within the SWI or T2*-GRE family and a smooth texture; random head size
  (brain tissue about 1,050-1,730 mL), pose, smooth non-linear warp and atrophy; random voxel
  size, slice thickness, orientation and obliquity; bias field, Rician noise, motion ghosts,
  Gibbs ringing; CMBs as dark spheres with a dipole blooming halo that grows with echo time;
  mimics: medullary, cortical and deep veins in every direction, calcifications (pineal,
  choroid plexus, pallidum, parenchymal dots), pallidal and dentate iron, air-bone artefacts by
  the sinuses and mastoids, flow voids of the basal arteries; whole heads and skull-stripped
  scans (zero outside a brain mask that cuts the outer sulci).
- ``wide``, for training only: the atlas family with lower SNR, slices up to 4 mm, half of the scans
  skull-stripped and CMBs with soft edges and slightly unequal axes.
- ``broad``, for training only: ``wide`` with every tissue's intensity drawn from the union of both
  modalities' ranges (widened by 15 %), noise whose level varies across the scan, heavier atrophy and
  warps, CMB edges from sharp to three voxels wide, and two CMBs in five next to a sulcus or a ventricle.
- ``ood``, the out-of-distribution test family, never sampled for training or model selection:
  other mechanisms, not only other ranges: contrast from tissue proton density and T2* at 1.5 or
  3 T (SWI with a phase mask), multi-coil noise (non-central chi, coil sensitivities, a
  parallel-imaging g-factor), heavier atrophy and larger warps, non-square in-plane voxels,
  ellipsoidal CMBs with a Gaussian core, tortuous branching veins, ring- and rod-shaped
  calcifications, periodic-motion ghosts and ringing along two axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy.spatial import cKDTree

from . import anatomy
from .anatomy import CODE, HeadShape
from ..geometry import Geometry
from .render import B0_AXIS, _box_points, _local_box, _voxel_width, render_cmb, render_mimic
from .synthetic import (CMB_DARKNESS, ECHO_TIME_MS, IRON_DARKNESS, VEIN_DARKNESS, Acquisition, Phantom, PhantomObject,
                        Subject, _bias_field, _polyline, _smoothing_sigma, _subject_transform, acquisition_grid,
                        cmb_count, cmb_diameter, free_place, random_rotation)

AREA_NAMES = {1: "lobar", 2: "deep", 3: "infratentorial"}
MIDLINE_MM = 2.0
HEAD_CENTRE = (0.0, -15.0, 8.0)  # MNI RAS of the acquisition grid's centre

# intensity ranges relative to white matter, per modality (atlas family); the skull's marrow stays dark
# on gradient echoes (its trabecular bone dephases the fat's signal)
CONTRAST_RANGES = {
    "swi": {"csf": (1.05, 1.6), "ventricle": (1.05, 1.6), "cortex": (0.72, 0.95), "white_matter": (1.0, 1.0),
            "striatum": (0.68, 0.92), "pallidum": (0.5, 0.8), "thalamus": (0.78, 0.96), "brainstem": (0.82, 1.02),
            "cerebellar_cortex": (0.75, 0.95), "cerebellar_white_matter": (0.88, 1.05), "dentate": (0.5, 0.8),
            "skull": (0.02, 0.12), "marrow": (0.1, 0.45), "scalp": (0.5, 1.3), "muscle": (0.3, 0.7),
            "eye": (0.9, 1.6), "air": (0.0, 0.02)},
    "t2s": {"csf": (1.15, 1.9), "ventricle": (1.15, 1.9), "cortex": (1.03, 1.35), "white_matter": (1.0, 1.0),
            "striatum": (0.95, 1.2), "pallidum": (0.7, 1.0), "thalamus": (0.92, 1.15), "brainstem": (0.88, 1.05),
            "cerebellar_cortex": (1.03, 1.35), "cerebellar_white_matter": (0.92, 1.05), "dentate": (0.7, 1.0),
            "skull": (0.02, 0.12), "marrow": (0.1, 0.5), "scalp": (0.5, 1.3), "muscle": (0.25, 0.6),
            "eye": (1.1, 1.9), "air": (0.0, 0.02)},
}
BRAIN_ABOVE = 1.05  # how much brighter than the brightest brain tissue the broad family keeps CSF
# ood family: proton density and T2* (ms at 3 T; 1.5 T scales T2* by 1.6) per tissue, and SWI phase-mask factors
PD_T2STAR = {"csf": (1.0, 400.0), "ventricle": (1.0, 400.0), "cortex": (0.8, 52.0), "white_matter": (0.69, 46.0),
             "striatum": (0.8, 38.0), "pallidum": (0.78, 22.0), "thalamus": (0.75, 42.0), "brainstem": (0.72, 44.0),
             "cerebellar_cortex": (0.82, 50.0), "cerebellar_white_matter": (0.7, 45.0), "dentate": (0.75, 24.0),
             "skull": (0.05, 2.0), "marrow": (0.6, 15.0), "scalp": (0.9, 30.0), "muscle": (0.7, 28.0),
             "eye": (0.95, 200.0), "air": (0.0, 1.0)}
PHASE_MASK = {"cortex": 0.92, "striatum": 0.88, "pallidum": 0.7, "thalamus": 0.93, "dentate": 0.72}


@dataclass(frozen=True)
class Family:
    """The random ranges (and mechanisms) of one phantom family."""

    name: str
    scale: Tuple[float, float]  # head scale per axis (the atlas brain is about 1.73 L of tissue)
    rotation_deg: float
    warp_mm: float  # amplitude of each of the warp's sinusoids
    warp_terms: int
    warp_wavelength_mm: float
    ventricle_growth_mm: Tuple[float, float]
    sulcal_widening_mm: Tuple[float, float]
    snr: Tuple[float, float]
    contrast: str  # "ranges" (CONTRAST_RANGES) or "relaxation" (PD_T2STAR)
    noise: str  # "rician" or "multicoil"
    texture: Tuple[float, float]  # amplitude of the smooth within-tissue variation
    ghost_chance: float
    ringing_chance: float
    skull_stripped_chance: float
    cmb_shape: str  # "sphere" or "ellipsoid"
    vein_wiggle: float
    vein_branches: bool
    calcification_shapes: Tuple[str, ...]
    square_pixels: bool
    slice_mm: Tuple[float, float]
    cmb_edge: Tuple[float, float] = (1.0, 1.0)  # "soft" CMBs: width of the edge, in voxel widths
    periodic_ghosts: bool = False  # ghosts at 1/3 or 1/4 of the field of view (else one at 1/2)
    ringing_axes: int = 1
    csf_adjacent: float = 0.0  # chance that a CMB sits 1-3.5 mm from CSF (a sulcus or a ventricle)


ATLAS = Family(name="atlas", scale=(0.85, 1.0), rotation_deg=15.0, warp_mm=3.0, warp_terms=6,
               warp_wavelength_mm=40.0, ventricle_growth_mm=(0.0, 3.0), sulcal_widening_mm=(0.0, 2.0),
               snr=(15.0, 45.0), contrast="ranges", noise="rician", texture=(0.0, 0.06), ghost_chance=0.2,
               ringing_chance=0.2, skull_stripped_chance=0.3, cmb_shape="sphere", vein_wiggle=0.25,
               vein_branches=False, calcification_shapes=("cluster", "dot"), square_pixels=True,
               slice_mm=(1.2, 3.0))
OOD = Family(name="ood", scale=(0.82, 1.02), rotation_deg=20.0, warp_mm=3.5, warp_terms=8,
             warp_wavelength_mm=30.0, ventricle_growth_mm=(2.0, 6.0), sulcal_widening_mm=(1.0, 3.0),
             snr=(12.0, 40.0), contrast="relaxation", noise="multicoil", texture=(0.02, 0.08), ghost_chance=0.3,
             ringing_chance=0.3, skull_stripped_chance=0.3, cmb_shape="ellipsoid", vein_wiggle=0.45,
             vein_branches=True, calcification_shapes=("ring", "rod", "cluster"), square_pixels=False,
             slice_mm=(1.5, 3.0), periodic_ghosts=True, ringing_axes=2)
# training only: the atlas family with wider acquisition ranges, more skull-stripped scans and CMBs with soft
# edges and slightly unequal axes (blooming blurs a CMB's edge on real scans)
WIDE = replace(ATLAS, name="wide", snr=(10.0, 45.0), skull_stripped_chance=0.5, slice_mm=(1.2, 4.0),
               cmb_shape="soft", cmb_edge=(1.0, 3.0))
# training only: domain randomisation beyond both modalities' ranges (every tissue's intensity from the union
# of the SWI and T2*-GRE ranges, widened), noise whose level varies smoothly across the scan, heavier atrophy
# and larger warps, CMBs with sharp to very soft edges, two in five of them next to a sulcus or a ventricle
BROAD = replace(WIDE, name="broad", scale=(0.8, 1.04), warp_mm=4.0, ventricle_growth_mm=(0.0, 6.0),
                sulcal_widening_mm=(0.0, 3.5), snr=(10.0, 45.0), contrast="broad", noise="rician_field",
                texture=(0.0, 0.1), ghost_chance=0.3, ringing_chance=0.3, vein_wiggle=0.35, cmb_edge=(0.5, 3.0),
                csf_adjacent=0.4)
FAMILY = {f.name: f for f in (ATLAS, WIDE, BROAD, OOD)}


# --- subject and acquisition --------------------------------------------------------------


def random_subject(rng: np.random.Generator, family: Family) -> Subject:
    k = family.warp_terms
    return Subject(rotation=random_rotation(rng, family.rotation_deg), scale=rng.uniform(*family.scale, 3),
                   position=rng.uniform(-8, 8, 3), warp_amplitude=rng.uniform(-family.warp_mm, family.warp_mm, (k, 3)),
                   warp_frequency=rng.normal(0, 1.0 / family.warp_wavelength_mm, (k, 3)),
                   warp_phase=rng.uniform(0, 2 * np.pi, k))


def random_acquisition(rng: np.random.Generator, family: Family, modality: Optional[str],
                       spacing: Optional[Sequence[float]]) -> Acquisition:
    modality = modality or str(rng.choice(("swi", "t2s")))
    if spacing is None:
        if rng.random() < 0.45:
            spacing = (float(rng.uniform(0.5, 1.0) if family.square_pixels else rng.uniform(0.6, 1.1)),) * 3
        else:
            in_plane = float(rng.uniform(0.45, 1.0))
            other = in_plane if family.square_pixels else in_plane * float(rng.uniform(1.0, 1.3))
            spacing = (in_plane, other, float(rng.uniform(*family.slice_mm)))
    base = [np.eye(3), np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]]).T,
            np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]]).T][int(rng.choice(3, p=[0.7, 0.15, 0.15]))]
    direction = random_rotation(rng, 20.0 if rng.random() < 0.5 else 0.0) @ base @ np.diag(rng.choice([-1.0, 1.0], 3))
    return Acquisition(modality=modality, echo_time_ms=float(rng.uniform(*ECHO_TIME_MS[modality])),
                       spacing=tuple(float(s) for s in spacing), direction=direction,
                       snr=float(rng.uniform(*family.snr)), bias=float(rng.uniform(0.0, 0.35)))


# --- contrast -----------------------------------------------------------------------------


def tissue_intensities(rng: np.random.Generator, family: Family, modality: str, echo_time_ms: float) -> np.ndarray:
    """Intensity of each ``anatomy.HEAD_TISSUES`` code, white matter = 1."""
    lut = np.zeros(len(anatomy.HEAD_TISSUES), np.float32)
    if family.contrast == "broad":
        for name in CONTRAST_RANGES["swi"]:
            lo = min(CONTRAST_RANGES[m][name][0] for m in CONTRAST_RANGES)
            hi = max(CONTRAST_RANGES[m][name][1] for m in CONTRAST_RANGES)
            lut[CODE[name]] = rng.uniform(0.85 * lo, 1.15 * hi) if name != "white_matter" else 1.0
        # CSF's long T2* keeps it brighter than brain tissue on every gradient echo: a sulcus never a dark line
        lut[CODE["csf"]] = max(lut[CODE["csf"]], BRAIN_ABOVE * lut[list(anatomy.BRAIN_TISSUES)].max())
        lut[CODE["ventricle"]] = lut[CODE["csf"]] * rng.uniform(0.95, 1.05)
        return lut
    if family.contrast == "ranges":
        for name, (lo, hi) in CONTRAST_RANGES[modality].items():
            lut[CODE[name]] = rng.uniform(lo, hi)
        lut[CODE["ventricle"]] = lut[CODE["csf"]] * rng.uniform(0.95, 1.05)
        return lut
    field_scale = 1.0 if rng.random() < 0.6 else 1.6  # 3 T or 1.5 T
    for name, (pd, t2s) in PD_T2STAR.items():
        pd_scan = pd * rng.uniform(0.93, 1.07)
        t2s_scan = t2s * field_scale * rng.uniform(0.85, 1.15)
        value = pd_scan * np.exp(-echo_time_ms / t2s_scan)
        if modality == "swi":
            value *= PHASE_MASK.get(name, 1.0) ** rng.uniform(2.0, 4.0)
        lut[CODE[name]] = value
    return lut / lut[CODE["white_matter"]]


# --- objects ------------------------------------------------------------------------------


def _side(x_mni: float) -> str:
    return "midline" if abs(x_mni) <= MIDLINE_MM else ("right" if x_mni > 0 else "left")


def place_cmbs(rng: np.random.Generator, subject: Subject, head: np.ndarray, n: int, taken: List[np.ndarray],
               modality: str, family: Family, margin_mm: float = 0.0) -> List[PhantomObject]:
    """CMBs in brain tissue of this head, 60 % lobar, 25 % deep, 15 % infratentorial (``margin_mm``: at
    least that far from another MARS area; the family's ``csf_adjacent`` share of them next to CSF)."""
    atlas = anatomy.head_atlas()
    sites = anatomy.cmb_sites(margin_mm)
    near_csf = anatomy.cmb_sites(margin_mm, near_csf=True) if family.csf_adjacent > 0 else sites
    cmbs: List[PhantomObject] = []
    for _ in range(n):
        area = int(rng.choice((1, 2, 3), p=[0.6, 0.25, 0.15]))
        diameter = cmb_diameter(rng)
        pool = near_csf if family.csf_adjacent > 0 and rng.random() < family.csf_adjacent else sites
        place = free_place(rng, pool[area], subject, taken, diameter / 2,
                           lambda h: head[tuple(atlas.index(h))] in anatomy.BRAIN_TISSUES)  # not where atrophy left CSF
        if place is None:
            continue
        h, x = place
        cmb = PhantomObject(label=len(cmbs) + 1, kind="cmb", cls="cmb", area=AREA_NAMES[area],
                            centre=tuple(float(v) for v in x), diameter_mm=round(diameter, 2),
                            darkness=float(rng.uniform(*CMB_DARKNESS[modality])), side=_side(float(h[0])))
        if family.cmb_shape != "sphere":
            spread = (0.75, 1.3) if family.cmb_shape == "ellipsoid" else (0.85, 1.15)
            axes = random_rotation(rng, 90.0) * rng.uniform(*spread, 3)[None, :]
            edge = [float(rng.uniform(*family.cmb_edge))] if family.cmb_shape == "soft" else []
            cmb.parts = [tuple(float(v) for v in axes.ravel()) + tuple(edge)]  # axes (columns, relative), edge
        cmbs.append(cmb)
    return cmbs


def place_mimics(rng: np.random.Generator, subject: Subject, modality: str, taken: List[np.ndarray],
                 family: Family) -> List[PhantomObject]:
    """Veins, calcifications and flow voids in MNI coordinates, returned in scanner RAS."""
    mimics: List[PhantomObject] = []

    def add(cls: str, place: str, path_mni: np.ndarray, radius: float, darkness: float,
            parts: Optional[np.ndarray] = None) -> None:
        points = subject.to_scanner(path_mni if parts is None else parts[:, :3])
        obj = PhantomObject(label=0, kind="mimic", cls=cls, area=place, centre=tuple(float(v) for v in points.mean(0)),
                            diameter_mm=round(2 * radius, 2), darkness=darkness, side=_side(float(path_mni[:, 0].mean())))
        if parts is None:
            obj.path = [tuple(float(v) for v in p) for p in points]
        else:
            obj.parts = [(*map(float, p), float(r)) for p, r in zip(points, parts[:, 3])]
        mimics.append(obj)
        taken.extend(np.array([*p, radius]) for p in points)

    vein = VEIN_DARKNESS[modality]
    wiggle = family.vein_wiggle
    starts = anatomy.periventricular_points()
    for _ in range(int(rng.integers(5, 14))):  # medullary veins: from the ventricles towards the cortex
        start = starts[rng.integers(len(starts))].astype(float)
        centre = np.asarray(anatomy.VENTRICLE_CENTRES[int(start[0] > 0)])
        path = _polyline(rng, start, start - centre + rng.normal(0, 5, 3), rng.uniform(12, 35), wiggle=wiggle)
        add("vein", "medullary", path, rng.uniform(0.3, 0.75), rng.uniform(*vein))
        if family.vein_branches and rng.random() < 0.5:
            fork = path[int(rng.integers(2, len(path) - 1))]
            add("vein", "medullary", _polyline(rng, fork, rng.normal(size=3), rng.uniform(6, 14), wiggle=wiggle),
                rng.uniform(0.25, 0.5), rng.uniform(*vein))
    surface = anatomy.surface_points()
    tree = cKDTree(surface)
    for _ in range(int(rng.integers(5, 12))):  # cortical veins on the brain's surface, in the sulci too
        start = surface[rng.integers(len(surface))].astype(float)
        path = _polyline(rng, start, rng.normal(size=3), rng.uniform(20, 60), steps=10, wiggle=wiggle * 0.6)
        path = surface[tree.query(path)[1]].astype(float)
        add("vein", "cortical", path, rng.uniform(0.6, 1.4), rng.uniform(*vein))
    for points in anatomy.DEEP_VEINS:
        add("vein", "deep", np.asarray(points, float) + rng.normal(0, 0.7, (len(points), 3)),
            rng.uniform(0.7, 1.3), rng.uniform(*vein))
    for points, radius in anatomy.ARTERIES:
        if rng.random() < 0.85:
            add("flow_void", "basal artery", np.asarray(points, float) + rng.normal(0, 1.0, 3),
                radius * rng.uniform(0.8, 1.2), rng.uniform(0.03, 0.15))
    places = [("pineal", anatomy.PINEAL, 0.5), ("choroid plexus", anatomy.CHOROID[0], 0.35),
              ("choroid plexus", anatomy.CHOROID[1], 0.35), ("pallidum", (-19.0, -3.0, -1.0), 0.1),
              ("pallidum", (19.0, -3.0, -1.0), 0.1)]
    wm = anatomy.white_matter_points()
    for _ in range(int(rng.integers(0, 3))):  # small parenchymal calcifications
        places.append(("parenchyma", tuple(wm[rng.integers(len(wm))].astype(float)), 1.0))
    for place, centre, chance in places:
        if rng.random() < chance:
            shape = str(rng.choice(family.calcification_shapes)) if place != "parenchyma" else \
                ("rod" if "rod" in family.calcification_shapes and rng.random() < 0.5 else "dot")
            parts = calcification_parts(rng, np.asarray(centre, float), shape)
            add("calcification", place, parts[:, :3], float(parts[:, 3].max()) + 1.0, rng.uniform(0.08, 0.35),
                parts=parts)
    for number, mimic in enumerate(mimics, start=1):
        mimic.label = number
    return mimics


def calcification_parts(rng: np.random.Generator, centre: np.ndarray, shape: str) -> np.ndarray:
    """Spheres (x, y, z, radius; MNI mm) of a calcification: an irregular cluster, a small dot, a ring or a rod."""
    if shape == "dot":
        n = int(rng.integers(1, 3))
        return np.column_stack([centre + rng.normal(0, 0.4, (n, 3)), rng.uniform(0.5, 1.1, n)])
    if shape == "ring":
        u, v = np.linalg.qr(rng.normal(size=(3, 3)))[0][:, :2].T
        angles = np.linspace(0, 2 * np.pi, 9)[:-1] + rng.uniform(0, 1)
        radius = rng.uniform(2.0, 3.5)
        points = centre + radius * (np.cos(angles)[:, None] * u + np.sin(angles)[:, None] * v)
        return np.column_stack([points, rng.uniform(0.6, 1.0, len(points))])
    if shape == "rod":
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        steps = np.linspace(-1, 1, 5)[:, None] * rng.uniform(1.5, 3.0)
        return np.column_stack([centre + steps * axis, rng.uniform(0.5, 0.9, 5)])
    n = int(rng.integers(2, 5))
    return np.column_stack([centre + rng.normal(0, 1.3, (n, 3)), rng.uniform(0.8, 2.0, n)])


def render_ellipsoid_cmb(grid: Geometry, signal: np.ndarray, labels: np.ndarray, cmb: PhantomObject,
                         bloom: float) -> None:
    """An ellipsoidal CMB and a dipole halo along B0: with a Gaussian core (the ood family's CMB) or, where its
    parts carry an edge width (the wide family's), a uniform core with that soft edge."""
    axes = np.asarray(cmb.parts[0][:9]).reshape(3, 3) * cmb.diameter_mm / 2  # columns: semi-axes in scanner RAS
    centre = np.asarray(cmb.centre)
    reach = float(np.linalg.norm(axes, axis=0).max())
    box = _local_box(grid, centre, 3.2 * reach + 3.0)
    if box is None:
        return
    p = _box_points(grid, box).reshape(-1, 3)
    local = (p - centre) @ np.linalg.inv(axes).T  # ellipsoid coordinates: 1 on the surface
    rho = np.linalg.norm(local, axis=1)
    width = np.maximum(_voxel_width(grid, local / np.maximum(rho, 1e-6)[:, None]) / max(reach, 0.5), 1e-6)
    # partial-volume coverage of the ellipsoid times a Gaussian of sigma 0.9 (surface units), scaled to 1 at half
    # the radius: full darkness inside half the radius, fading towards the surface
    if len(cmb.parts[0]) > 9:
        core = np.clip((1 - rho) / (width * cmb.parts[0][9]) + 0.5, 0, 1)
    else:
        core = np.clip((1 - rho) / width + 0.5, 0, 1) * np.exp(-0.5 * (rho / 0.9) ** 2) / np.exp(-0.5 / 0.81 * 0.25)
        core = np.clip(core, 0, 1)
    diff = p - centre
    dist = np.linalg.norm(diff, axis=1)
    cos2 = ((diff / np.maximum(dist, 1e-6)[:, None]) @ B0_AXIS) ** 2
    r = cmb.diameter_mm / 2
    halo = np.exp(-bloom * (r / np.maximum(dist, r)) ** 3 * np.abs(3 * cos2 - 1) / 2)
    multiplier = core * cmb.darkness + (1 - core) * halo
    shape = signal[box].shape
    signal[box] *= multiplier.reshape(shape)
    labels[box][(multiplier < 0.5).reshape(shape)] = cmb.label
    nearest = np.rint(grid.ras_to_index(centre)).astype(int)
    if np.all(nearest >= 0) and np.all(nearest < np.asarray(grid.size)):
        labels[nearest[2], nearest[1], nearest[0]] = cmb.label


# --- template image -----------------------------------------------------------------------


def template_images(rng: np.random.Generator, family: Family, acq: Acquisition, head: np.ndarray
                    ) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """The head's intensities on the atlas grid ([x, y, z], float32), its iron and air-bone mimic labels
    and their names."""
    atlas = anatomy.head_atlas()
    image = tissue_intensities(rng, family, acq.modality, acq.echo_time_ms)[head]
    texture = rng.uniform(*family.texture)
    if texture > 0:
        image *= 1 + texture * anatomy.smooth_noise(rng, atlas.size, 10.0)
    mimic = np.zeros(atlas.size, np.uint8)
    names: List[str] = []
    iron = rng.uniform(*IRON_DARKNESS[acq.modality])
    x = np.asarray(atlas.axes()[0])[:, None, None]
    for code, place in ((CODE["pallidum"], "pallidum"), (CODE["dentate"], "dentate")):
        for side, on_side in (("left", x < 0), ("right", x > 0)):
            inside = (head == code) & on_side
            image[inside] *= iron * rng.uniform(0.95, 1.05)
            names.append(f"iron:{place} {side}")
            mimic[inside] = len(names)
    for place in ("frontal", "mastoid left", "mastoid right", "sphenoid"):
        centre, radii = anatomy.SINUSES[place]
        reach = np.asarray(radii) + 30.0
        lo = np.maximum(atlas.index(np.asarray(centre) - reach), 0)
        hi = atlas.index(np.asarray(centre) + reach) + 1
        window = tuple(slice(a, b) for a, b in zip(lo, hi))
        xs, ys, zs = (np.asarray(axis[a:b]).reshape([-1 if n == m else 1 for m in range(3)])
                      for n, (axis, a, b) in enumerate(zip(atlas.axes(), lo, hi)))
        rho = np.sqrt(((xs - centre[0]) / radii[0]) ** 2 + ((ys - centre[1]) / radii[1]) ** 2
                      + ((zs - centre[2]) / radii[2]) ** 2)
        distance = np.maximum(rho - 1, 0) * min(radii)
        factor = (1 - rng.uniform(0.3, 1.0) * np.exp(-(distance / rng.uniform(6.0, 11.0)) ** 2)).astype(np.float32)
        image[window] *= factor
        artefact = np.isin(head[window], anatomy.BRAIN_TISSUES) & (factor < 0.6) & (mimic[window] == 0)
        if artefact.any():
            names.append(f"air_bone:{place}")
            mimic[window][artefact] = len(names)
    return image, mimic, names


def stripping_mask(rng: np.random.Generator, head: np.ndarray) -> np.ndarray:
    """A skull-stripping tool's brain mask: the brain, its edge moved in and out by up to 2 mm, the outer
    part of the sulci cut away (dark space between the gyri)."""
    atlas = anatomy.head_atlas()
    offset = 1.2 * anatomy.smooth_noise(rng, atlas.size, 16.0)
    keep = (atlas.outside_mm <= np.clip(offset, 0, 2)) & (atlas.inside_mm >= np.clip(-offset, 0, 2))
    sulcal = (head == CODE["csf"]) & (atlas.inside_mm < rng.uniform(2.0, 8.0))
    return keep & ~sulcal


# --- noise and artefacts ------------------------------------------------------------------


def add_noise(rng: np.random.Generator, family: Family, signal: np.ndarray, snr: float, grid: Geometry
              ) -> np.ndarray:
    """Rician noise (atlas), Rician noise whose level varies smoothly by up to 1.6 times across the scan
    (broad), or the root sum of squares of 4-8 coils with smooth sensitivities and a parallel-imaging
    g-factor that raises the noise towards the centre (ood)."""
    sigma = 1.0 / snr
    if family.noise == "rician":
        return np.hypot(signal + rng.normal(0, sigma, signal.shape).astype(np.float32),
                        rng.normal(0, sigma, signal.shape).astype(np.float32))
    if family.noise == "rician_field":
        level = sigma * _bias_field(grid, rng, float(rng.uniform(0.1, 0.5)))
        return np.hypot(signal + level * rng.normal(0, 1, signal.shape).astype(np.float32),
                        level * rng.normal(0, 1, signal.shape).astype(np.float32))
    shape = signal.shape
    grid = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    g_factor = 1.0 + rng.uniform(0.2, 0.8) * np.exp(-sum(g ** 2 for g in grid) / 0.5)
    total = np.zeros(shape, np.float32)
    weights = np.zeros(shape, np.float32)
    coils = int(rng.integers(4, 9))
    for coil in range(coils):
        angle = 2 * np.pi * coil / coils + rng.uniform(-0.3, 0.3)
        sensitivity = np.exp(-((grid[2] - np.cos(angle)) ** 2 + (grid[1] - np.sin(angle)) ** 2) / 1.5)
        noisy = sensitivity * signal + sigma * g_factor * rng.normal(0, 1, shape).astype(np.float32)
        total += noisy ** 2 + (sigma * g_factor * rng.normal(0, 1, shape).astype(np.float32)) ** 2
        weights += sensitivity ** 2
    return np.sqrt(total / np.maximum(weights, 1e-3))


def add_ghosts(rng: np.random.Generator, family: Family, signal: np.ndarray) -> np.ndarray:
    """Motion ghosts along a phase-encode axis: shifted faint copies (half the field of view, or
    periodic motion's 1/3 and 1/4 in the ood family)."""
    axis = int(rng.choice((1, 2)))
    n = signal.shape[axis]
    shifts = [n // int(rng.choice((3, 4)))] * 2 if family.periodic_ghosts else [n // 2]
    out = signal.copy()
    for number, shift in enumerate(shifts, start=1):
        out += rng.uniform(0.02, 0.08) * np.roll(signal, number * shift, axis=axis)
    return out


def add_ringing(rng: np.random.Generator, family: Family, signal: np.ndarray) -> np.ndarray:
    """Gibbs ringing: k-space cut to 60-85 % of its extent along one axis (two in the ood family)."""
    axes = [int(rng.integers(0, 3))] if family.ringing_axes == 1 else list(rng.choice(3, family.ringing_axes, False))
    out = signal
    for axis in axes:
        n = out.shape[axis]
        spectrum = np.fft.fft(out, axis=axis)
        keep = np.abs(np.fft.fftfreq(n)) <= 0.5 * rng.uniform(0.6, 0.85)
        spectrum *= keep.reshape([-1 if a == axis else 1 for a in range(3)])
        out = np.abs(np.fft.ifft(spectrum, axis=axis)).astype(np.float32)
    return out


# --- the phantom --------------------------------------------------------------------------


@dataclass
class _Resampler:
    """Template ([x, y, z] arrays on the atlas grid) -> acquisition grid through the subject's transform."""

    grid: Geometry
    transform: sitk.Transform
    sigma: List[float] = field(default_factory=list)

    def linear(self, array: np.ndarray) -> np.ndarray:
        image = anatomy.head_atlas().geometry().with_image(np.ascontiguousarray(array.transpose(2, 1, 0)))
        if max(self.sigma) > 0.05:
            image = sitk.SmoothingRecursiveGaussian(image, [max(s, 0.01) for s in self.sigma])
        return self._resample(image, sitk.sitkLinear, sitk.sitkFloat32)

    def nearest(self, array: np.ndarray) -> np.ndarray:
        image = anatomy.head_atlas().geometry().with_image(np.ascontiguousarray(array.transpose(2, 1, 0)))
        return self._resample(image, sitk.sitkNearestNeighbor, sitk.sitkUInt16)

    def _resample(self, image: sitk.Image, interpolator: int, pixel: int) -> np.ndarray:
        reference = self.grid.with_image(np.zeros(self.grid.array_shape, dtype=np.uint8))
        return sitk.GetArrayFromImage(sitk.Resample(image, reference, self.transform, interpolator, 0.0, pixel))


def make_head_phantom(seed: int, family: str = "atlas", modality: Optional[str] = None,
                      spacing: Optional[Sequence[float]] = None, n_cmb: Optional[int] = None,
                      skull_stripped: Optional[bool] = None, site_margin_mm: float = 0.0) -> Phantom:
    """One realistic phantom with its ground truth, entirely determined by ``seed`` and the overrides
    (``site_margin_mm``: CMBs at least that far from a MARS area other than their own, where a demo
    checks the location step)."""
    fam = FAMILY[family]
    rng = np.random.default_rng(seed)
    subject = random_subject(rng, fam)
    acq = random_acquisition(rng, fam, modality, spacing)
    grid = acquisition_grid(subject, acq, centre=HEAD_CENTRE)
    shape = HeadShape(ventricle_growth_mm=float(rng.uniform(*fam.ventricle_growth_mm)),
                      sulcal_widening_mm=float(rng.uniform(*fam.sulcal_widening_mm)),
                      subarachnoid_mm=float(rng.uniform(1.0, 3.0)), skull_mm=float(rng.uniform(4.0, 9.0)),
                      scalp_mm=float(rng.uniform(4.0, 9.0)))
    head = anatomy.make_head(rng, shape)
    stripped = bool(rng.random() < fam.skull_stripped_chance) if skull_stripped is None else skull_stripped
    taken: List[np.ndarray] = []
    mimics = place_mimics(rng, subject, acq.modality, taken, fam)
    count = cmb_count(rng) if n_cmb is None else int(n_cmb)
    cmbs = place_cmbs(rng, subject, head, count, taken, acq.modality, fam, site_margin_mm)
    tpl_image, tpl_mimics, names = template_images(rng, fam, acq, head)
    base_sigma = float(rng.uniform(0.3, 0.6))  # partial volume of the 1 mm anatomy itself
    resampler = _Resampler(grid, _subject_transform(subject, grid),
                           [float(np.hypot(s, base_sigma)) for s in _smoothing_sigma(subject, acq)])
    signal = resampler.linear(tpl_image)
    mimic_labels = resampler.nearest(tpl_mimics)
    keep = resampler.nearest(stripping_mask(rng, head).astype(np.uint8)) > 0 if stripped else None
    del tpl_image, tpl_mimics, head

    objects: List[PhantomObject] = []
    for index, name in enumerate(names, start=1):
        where = np.argwhere(mimic_labels == index)
        if len(where) == 0:
            continue
        cls, place = name.split(":")
        objects.append(PhantomObject(label=index, kind="mimic", cls=cls, area=place,
                                     centre=tuple(float(v) for v in grid.index_to_ras(where.mean(axis=0)[::-1])),
                                     diameter_mm=0.0, side=place.split()[-1] if " " in place else "midline"))
    for mimic in mimics:
        mimic.label += len(names)
        render_mimic(grid, signal, mimic_labels, mimic)
        objects.append(mimic)
    cmb_labels = np.zeros(grid.array_shape, dtype=np.uint16)
    bloom = 0.9 * acq.echo_time_ms / 20.0 * (1.3 if acq.modality == "swi" else 1.0)
    for cmb in cmbs:
        render = render_ellipsoid_cmb if fam.cmb_shape == "ellipsoid" else render_cmb
        render(grid, signal, cmb_labels, cmb, bloom * rng.uniform(0.7, 1.3))
    mimic_labels[cmb_labels > 0] = 0

    signal *= _bias_field(grid, rng, acq.bias)
    if rng.random() < fam.ringing_chance:
        signal = add_ringing(rng, fam, signal)
    if rng.random() < fam.ghost_chance:
        signal = add_ghosts(rng, fam, signal)
    noisy = add_noise(rng, fam, signal, acq.snr, grid)
    del signal
    if keep is not None:
        noisy[~keep] = 0
    scale = float(rng.uniform(800, 3000)) / max(float(np.percentile(noisy[::4, ::4, ::4], 99.5)), 1e-6)
    image = np.clip(noisy * scale, 0, 32767).astype(np.int16)
    info = {"seed": seed, "family": fam.name, "modality": acq.modality, "echo_time_ms": round(acq.echo_time_ms, 1),
            "spacing_mm": [round(s, 3) for s in acq.spacing], "size": list(grid.size),
            "orientation": grid.orientation(), "obliquity_deg": round(grid.obliquity_degrees(), 1),
            "snr": round(acq.snr, 1), "n_cmb": len(cmbs), "n_mimics": sum(1 for o in objects if o.kind == "mimic"),
            "skull_stripped": stripped, "brain_ml": round(brain_volume_ml(subject), 0)}
    return Phantom(image=grid.with_image(image), cmb_labels=grid.with_image(cmb_labels),
                   mimic_labels=grid.with_image(mimic_labels), objects=cmbs + objects, info=info)


def brain_volume_ml(subject: Subject) -> float:
    """Brain tissue volume of this subject: the atlas's, scaled by the head's scale (the warp keeps it near)."""
    return anatomy.tissue_ml() * float(np.prod(subject.scale))
