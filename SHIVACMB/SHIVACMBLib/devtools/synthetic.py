"""Synthetic T2*-GRE / SWI head scans with known CMBs and CMB mimics (the project's phantoms).

Anatomy is procedural (no template data): a 1 mm head in its own coordinates (RAS mm) with
scalp, skull, CSF, sinus air, folded cortex, white matter, ventricles, deep nuclei, brainstem
and cerebellum. Each phantom draws, from its seed:
- a subject: random scaling, smooth elastic warp, head rotation and position;
- an acquisition: modality (contrast and vein conspicuity), echo time (blooming), voxel size
  (isotropic 0.5-1 mm or anisotropic up to 1x1x3 mm), slice orientation (oblique allowed),
  bias field and Rician noise;
- 0-30 CMBs (most scans 0-2, a few with dozens), 2-10 mm, weighted to 2-4 mm, lobar, deep or
  infratentorial, each a dark sphere with a dipole-shaped blooming halo along B0 (the
  scanner's superior axis), rendered with partial volume on the native grid;
- mimics that are not CMBs: veins (medullary, cortical, deep; any direction), calcifications
  (pineal, choroid plexus; irregular, no halo), symmetric pallidal and dentate iron, air-bone
  artefacts next to the frontal sinus and mastoids, flow voids of the basal arteries.

Ground truth: a CMB label map (label k = CMB k: the voxels at least half darkened by it), a
mimic label map (one label per mimic instance) and an object table, all on the scan's grid.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..files import atomic_path, atomic_write_text
from ..geometry import LPS_RAS, Geometry
from ..mars import AREAS
from .render import render_cmb, render_mimic

MODALITIES = ("swi", "t2s")
MIMIC_CLASSES = ("vein", "calcification", "iron", "air_bone", "flow_void")

# template tissue codes
AIR, SCALP, SKULL, CSF, GM, WM, DEEP, PALLIDUM, STEM, CB_GM, CB_WM, DENTATE, VENTRICLE, SINUS, NECK = range(15)
BRAIN_CODES = (GM, WM, DEEP, PALLIDUM, STEM, CB_GM, CB_WM, DENTATE)

# tissue intensities relative to white matter (SWI magnitude with phase mask / T2*-GRE)
CONTRAST = {
    "swi": {SCALP: 0.9, SKULL: 0.06, CSF: 1.2, GM: 0.84, WM: 1.0, DEEP: 0.78, PALLIDUM: 0.78, STEM: 0.92,
            CB_GM: 0.85, CB_WM: 0.96, DENTATE: 0.85, VENTRICLE: 1.2, SINUS: 0.02, NECK: 0.6, AIR: 0.0},
    "t2s": {SCALP: 0.75, SKULL: 0.06, CSF: 1.35, GM: 1.12, WM: 0.9, DEEP: 1.0, PALLIDUM: 0.95, STEM: 0.9,
            CB_GM: 1.1, CB_WM: 0.92, DENTATE: 1.0, VENTRICLE: 1.35, SINUS: 0.02, NECK: 0.5, AIR: 0.0},
}
VEIN_DARKNESS = {"swi": (0.15, 0.4), "t2s": (0.55, 0.8)}  # multiplier at the vein's core
CMB_DARKNESS = {"swi": (0.05, 0.25), "t2s": (0.1, 0.35)}
IRON_DARKNESS = {"swi": (0.45, 0.75), "t2s": (0.6, 0.85)}
ECHO_TIME_MS = {"swi": (15.0, 30.0), "t2s": (15.0, 40.0)}

TEMPLATE_SPACING = 1.0
TEMPLATE_LOW = np.array([-92.0, -124.0, -84.0])  # RAS mm of the first template voxel
TEMPLATE_SIZE = (185, 237, 172)  # x, y, z voxels


# --- template -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ellipsoid:
    centre: Tuple[float, float, float]
    radii: Tuple[float, float, float]

    def rho(self, p: np.ndarray) -> np.ndarray:
        """Normalised radius: < 1 inside."""
        return np.sqrt((((p - np.asarray(self.centre)) / np.asarray(self.radii)) ** 2).sum(axis=-1))


HEAD = Ellipsoid((0, -10, -8), (80, 102, 90))
OUTER_SKULL = Ellipsoid((0, -8, 4), (77, 97, 68))
INNER_SKULL = Ellipsoid((0, -8, 4), (71, 91, 62))
CEREBRUM = Ellipsoid((0, -5, 12), (66, 84, 52))
CEREBELLUM = Ellipsoid((0, -55, -30), (50, 32, 21))
BRAINSTEM = Ellipsoid((0, -26, -30), (11, 12, 27))
SINUSES = {"frontal": Ellipsoid((0, 80, -14), (15, 8, 12)), "sphenoid": Ellipsoid((0, 22, -44), (13, 12, 9)),
           "mastoid_left": Ellipsoid((-52, -28, -40), (10, 10, 10)),
           "mastoid_right": Ellipsoid((52, -28, -40), (10, 10, 10))}
VENTRICLES = [Ellipsoid((-12, -5, 15), (6, 28, 8)), Ellipsoid((12, -5, 15), (6, 28, 8)),
              Ellipsoid((0, -10, 0), (2, 12, 7))]
DEEP_NUCLEI = [Ellipsoid((s * 13, 8, 14), (5, 10, 7)) for s in (-1, 1)] \
    + [Ellipsoid((s * 24, 2, 2), (6, 13, 9)) for s in (-1, 1)] \
    + [Ellipsoid((s * 10, -18, 6), (8, 12, 8)) for s in (-1, 1)]
PALLIDA = [Ellipsoid((s * 18, 0, 0), (4, 8, 6)) for s in (-1, 1)]
DENTATES = [Ellipsoid((s * 15, -58, -27), (5, 8, 5)) for s in (-1, 1)]
# places where CMBs are never put (iron mimics, ventricles' choroid plexus, pineal)
PINEAL = (0.0, -32.0, 5.0)
CHOROID = [(-13.0, -27.0, 15.0), (13.0, -27.0, 15.0)]
# basal arteries (flow voids): polylines in head coordinates, radius mm
ARTERIES = [([(0, -13, -58), (0, -13, -42), (0, -14, -30)], 1.7),
            ([(-15, 6, -62), (-15, 5, -46), (-14, 4, -36)], 2.1),
            ([(15, 6, -62), (15, 5, -46), (14, 4, -36)], 2.1),
            ([(-14, 4, -36), (-24, 4, -33), (-34, 2, -30)], 1.4),
            ([(14, 4, -36), (24, 4, -33), (34, 2, -30)], 1.4)]


def _sulcal_pattern(p: np.ndarray) -> np.ndarray:
    """A smooth 3D pattern whose near-zero set folds the cortex into gyri."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    return (np.sin(0.38 * x + 1.2 * np.sin(0.07 * y)) + np.sin(0.34 * y + 1.3 * np.sin(0.08 * z))
            + np.sin(0.41 * z + 1.1 * np.sin(0.07 * x)))


@dataclass(frozen=True)
class Template:
    """The procedural head on its 1 mm grid: tissue codes, cerebral depth and lookups."""

    codes: np.ndarray  # [x, y, z] uint8
    depth: np.ndarray  # [x, y, z] float32, mm from the cerebral surface (0 outside the cerebrum)

    def code_at(self, p: np.ndarray) -> np.ndarray:
        return _nearest(self.codes, p)

    def depth_at(self, p: np.ndarray) -> np.ndarray:
        return _nearest(self.depth, p)

    def points(self, codes: Sequence[int]) -> np.ndarray:
        """Head coordinates of every template voxel with one of ``codes``."""
        idx = np.argwhere(np.isin(self.codes, codes))
        return TEMPLATE_LOW + idx * TEMPLATE_SPACING

    def geometry(self) -> Geometry:
        origin_lps = LPS_RAS @ TEMPLATE_LOW
        return Geometry(TEMPLATE_SIZE, (TEMPLATE_SPACING,) * 3, tuple(origin_lps), (-1, 0, 0, 0, -1, 0, 0, 0, 1))


def _nearest(array: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Values of a template array at the voxels nearest head points (clamped to the grid)."""
    idx = np.rint((np.asarray(p) - TEMPLATE_LOW) / TEMPLATE_SPACING).astype(int)
    idx = np.clip(idx, 0, np.asarray(TEMPLATE_SIZE) - 1)
    return array[idx[..., 0], idx[..., 1], idx[..., 2]]


def _template_axes() -> List[np.ndarray]:
    """Head coordinates (mm) of the template's voxel centres along x, y and z."""
    return [TEMPLATE_LOW[a] + np.arange(TEMPLATE_SIZE[a]) * TEMPLATE_SPACING for a in range(3)]


@lru_cache(maxsize=1)
def template() -> Template:
    """Build the procedural head once per process (about 10 s on one core)."""
    p = np.stack(np.meshgrid(*_template_axes(), indexing="ij"), axis=-1).astype(np.float32)
    codes = np.zeros(TEMPLATE_SIZE, dtype=np.uint8)
    head = HEAD.rho(p) < 1
    codes[head] = SCALP
    codes[head & (p[..., 2] < -55)] = NECK
    codes[OUTER_SKULL.rho(p) < 1] = SKULL
    codes[INNER_SKULL.rho(p) < 1] = CSF
    for sinus in SINUSES.values():
        codes[sinus.rho(p) < 1] = SINUS

    cb_depth = CEREBELLUM.rho(p)
    stem = BRAINSTEM.rho(p) < 1
    infratentorial = ((cb_depth < 1) & (p[..., 2] < -14 + 0.25 * (p[..., 1] + 55))) | stem
    cerebrum = (CEREBRUM.rho(p) < 1) & ~infratentorial & (p[..., 2] > -36)
    depth = np.where(cerebrum, ndimage.distance_transform_edt(cerebrum, sampling=TEMPLATE_SPACING), 0.0)
    depth = depth.astype(np.float32)
    fold = np.abs(_sulcal_pattern(p))
    sulcus = (fold < 0.22) & (depth < 9.0)
    cortex = depth < 3.0 + 1.2 * (1 + np.sin(0.11 * p[..., 0] + 0.13 * p[..., 1]))
    codes[cerebrum] = WM
    codes[cerebrum & (cortex | (fold < 0.5) & (depth < 11.0))] = GM
    codes[cerebrum & sulcus] = CSF
    for nucleus in DEEP_NUCLEI:
        codes[cerebrum & (nucleus.rho(p) < 1)] = DEEP
    for pallidum in PALLIDA:
        codes[cerebrum & (pallidum.rho(p) < 1)] = PALLIDUM
    for ventricle in VENTRICLES:
        codes[ventricle.rho(p) < 1] = VENTRICLE

    cerebellum = infratentorial & ~stem
    folia = np.abs(np.sin(0.5 * p[..., 2] + 0.15 * p[..., 1])) < 0.3
    codes[cerebellum] = CB_WM
    codes[cerebellum & ((cb_depth > 0.78) | ((cb_depth > 0.45) & folia))] = CB_GM
    codes[cerebellum & (cb_depth > 0.85) & folia] = CSF
    for dentate in DENTATES:
        codes[cerebellum & (dentate.rho(p) < 1)] = DENTATE
    codes[stem] = STEM
    return Template(codes=codes, depth=depth)


def area_of(codes: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """MARS area (index into AREAS) of template points: lobar = cortex and white matter within 12 mm
    of the cerebral surface; deep = nuclei and deeper white matter; infratentorial = stem and cerebellum."""
    area = np.where(np.isin(codes, (STEM, CB_GM, CB_WM, DENTATE)), 2, 1)
    return np.where(np.isin(codes, (GM, WM)) & (depth <= 12.0), 0, area)


# --- subject ------------------------------------------------------------------------------


@dataclass
class Subject:
    """Where the head sits in the scanner: ``head = A @ (x + warp(x)) + b`` for scanner RAS x."""

    rotation: np.ndarray  # head-to-scanner rotation
    scale: np.ndarray  # per head axis
    position: np.ndarray  # scanner RAS of the head origin
    warp_amplitude: np.ndarray  # (K, 3) mm
    warp_frequency: np.ndarray  # (K, 3) 1/mm
    warp_phase: np.ndarray  # (K,)

    @property
    def matrix(self) -> np.ndarray:
        """Scanner RAS -> head coordinates, linear part."""
        return np.diag(1.0 / self.scale) @ self.rotation.T

    def warp(self, x: np.ndarray) -> np.ndarray:
        phase = x @ self.warp_frequency.T + self.warp_phase  # (N, K)
        return np.sin(phase) @ self.warp_amplitude

    def to_scanner(self, h: np.ndarray) -> np.ndarray:
        """Scanner RAS of head points: the inverse of the class's map (fixed point: the warp is small
        and smooth)."""
        y = np.asarray(h, dtype=float) @ np.linalg.inv(self.matrix).T + self.position
        x = y.copy()
        for _ in range(8):
            x = y - self.warp(x)
        return x


def random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.radians(rng.uniform(-max_degrees, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def random_subject(rng: np.random.Generator) -> Subject:
    k = 4
    return Subject(rotation=random_rotation(rng, 15.0), scale=rng.uniform(0.9, 1.08, 3),
                   position=rng.uniform(-8, 8, 3), warp_amplitude=rng.uniform(-2.5, 2.5, (k, 3)),
                   warp_frequency=rng.normal(0, 1.0 / 40.0, (k, 3)), warp_phase=rng.uniform(0, 2 * np.pi, k))


# --- acquisition --------------------------------------------------------------------------


@dataclass
class Acquisition:
    modality: str
    echo_time_ms: float
    spacing: Tuple[float, float, float]
    direction: np.ndarray  # columns: voxel axes in scanner RAS
    snr: float
    bias: float  # bias field strength (fraction)


def random_acquisition(rng: np.random.Generator, modality: Optional[str] = None,
                       spacing: Optional[Sequence[float]] = None) -> Acquisition:
    modality = modality or str(rng.choice(MODALITIES))
    if spacing is None:
        if rng.random() < 0.5:
            spacing = (float(rng.uniform(0.5, 1.0)),) * 3
        else:
            in_plane = float(rng.uniform(0.45, 1.0))
            spacing = (in_plane, in_plane, float(rng.uniform(1.2, 3.0)))
    # slice orientation: axial, coronal or sagittal stacks, possibly oblique, any axis sign
    base = [np.eye(3), np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]]).T,
            np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]]).T][int(rng.choice(3, p=[0.7, 0.15, 0.15]))]
    flips = np.diag(rng.choice([-1.0, 1.0], 3))
    direction = random_rotation(rng, 20.0 if rng.random() < 0.5 else 0.0) @ base @ flips
    if np.linalg.det(direction) < 0:  # left-handed frames (as radiological NIfTI) in a quarter of the scans
        direction = direction if rng.random() < 0.5 else direction @ np.diag([1.0, 1.0, -1.0])
    return Acquisition(modality=modality, echo_time_ms=float(rng.uniform(*ECHO_TIME_MS[modality])),
                       spacing=tuple(float(s) for s in spacing), direction=direction,
                       snr=float(rng.uniform(18, 45)), bias=float(rng.uniform(0.0, 0.3)))


def acquisition_grid(subject: Subject, acq: Acquisition, fov_mm: Sequence[float] = (176, 216, 176),
                     centre: Sequence[float] = (0.0, -10.0, 0.0)) -> Geometry:
    """A grid covering the head (``centre``: head coordinates of its middle) along the acquisition's own axes."""
    centre = subject.to_scanner(np.array([centre], dtype=float))[0]
    spacing = np.asarray(acq.spacing)
    size = np.ceil(np.asarray(fov_mm) / spacing).astype(int)
    d_lps = LPS_RAS @ acq.direction
    origin = LPS_RAS @ centre - d_lps @ (spacing * (size - 1) / 2.0)
    return Geometry(tuple(int(s) for s in size), tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                    tuple(float(v) for v in d_lps.ravel()))


# --- objects ------------------------------------------------------------------------------


@dataclass
class PhantomObject:
    label: int
    kind: str  # "cmb" or "mimic"
    cls: str  # "cmb" or a mimic class
    area: str  # MARS area for CMBs, anatomical place for mimics
    centre: Tuple[float, float, float]  # scanner RAS mm
    diameter_mm: float
    darkness: float = 0.0
    path: List[Tuple[float, float, float]] = field(default_factory=list)  # tubes: scanner RAS polyline
    parts: List[Tuple[float, ...]] = field(default_factory=list)  # clusters: x, y, z, radius
    side: str = ""  # left, right or midline (of the head; empty where not recorded)


def cmb_count(rng: np.random.Generator) -> int:
    """Most scans have none to two CMBs, a few have dozens (a cohort-like, heavy-tailed count)."""
    u = rng.random()
    if u < 0.3:
        return 0
    if u < 0.65:
        return int(rng.integers(1, 3))
    if u < 0.85:
        return int(rng.integers(3, 7))
    if u < 0.95:
        return int(rng.integers(7, 16))
    return int(rng.integers(16, 31))


def cmb_diameter(rng: np.random.Generator) -> float:
    """2-10 mm, most between 2 and 4 mm."""
    return float(2.0 + 8.0 * rng.beta(1.1, 4.5))


@lru_cache(maxsize=1)
def _cmb_sites() -> Dict[str, np.ndarray]:
    tpl = template()
    sites = {}
    codes_by_area = {"lobar": (GM, WM), "deep": (DEEP, WM), "infratentorial": (STEM, CB_GM, CB_WM)}
    keep_away = [*(e.centre for e in PALLIDA + DENTATES), PINEAL, *CHOROID]
    for area, codes in codes_by_area.items():
        points = tpl.points(codes)
        wanted = area_of(tpl.code_at(points), tpl.depth_at(points)) == AREAS.index(area)
        points = points[wanted]
        far = np.min(np.linalg.norm(points[:, None, :] - np.asarray(keep_away)[None], axis=2), axis=1) > 12.0
        sites[area] = points[far]
    return sites


def free_place(rng: np.random.Generator, points: np.ndarray, subject: Subject, taken: List[np.ndarray],
               radius: float, allowed: Optional[Callable[[np.ndarray], bool]] = None
               ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """A point of ``points`` (head coordinates, moved by up to 0.5 mm) that ``allowed`` accepts and whose scanner
    position keeps 4 mm clear of every object ``taken`` (rows x, y, z, radius), which it joins: (head, scanner),
    or None after 50 tries."""
    for _attempt in range(50):
        h = points[rng.integers(len(points))] + rng.uniform(-0.5, 0.5, 3)
        if allowed is not None and not allowed(h):
            continue
        x = subject.to_scanner(h[None])[0]
        if all(np.linalg.norm(x - t[:3]) > t[3] + radius + 4.0 for t in taken):
            taken.append(np.array([*x, radius]))
            return h, x
    return None


def place_cmbs(rng: np.random.Generator, subject: Subject, n: int, taken: List[np.ndarray],
               modality: str) -> List[PhantomObject]:
    sites = _cmb_sites()
    cmbs: List[PhantomObject] = []
    for _ in range(n):
        area = str(rng.choice(AREAS, p=[0.6, 0.25, 0.15]))
        diameter = cmb_diameter(rng)
        place = free_place(rng, sites[area], subject, taken, diameter / 2)
        if place is None:
            continue
        _h, x = place
        cmbs.append(PhantomObject(label=len(cmbs) + 1, kind="cmb", cls="cmb", area=area,
                                  centre=tuple(float(v) for v in x), diameter_mm=round(diameter, 2),
                                  darkness=float(rng.uniform(*CMB_DARKNESS[modality]))))
    return cmbs


def _polyline(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, length: float,
              steps: int = 6, wiggle: float = 0.25) -> np.ndarray:
    points = [start]
    d = direction / np.linalg.norm(direction)
    for _ in range(steps):
        d = d + rng.normal(0, wiggle, 3)
        d /= np.linalg.norm(d)
        points.append(points[-1] + d * length / steps)
    return np.array(points)


def place_mimics(rng: np.random.Generator, subject: Subject, modality: str, taken: List[np.ndarray]
                 ) -> List[PhantomObject]:
    """Veins, calcifications and flow voids (iron and air-bone artefacts live in the template)."""
    tpl = template()
    mimics: List[PhantomObject] = []

    def add(cls: str, place: str, path_head: np.ndarray, radius: float, darkness: float,
            parts: Optional[np.ndarray] = None) -> None:
        path = subject.to_scanner(path_head)
        centre = path.mean(axis=0) if parts is None else subject.to_scanner(parts[:, :3]).mean(axis=0)
        obj = PhantomObject(label=len(mimics) + 1, kind="mimic", cls=cls, area=place,
                            centre=tuple(float(v) for v in centre), diameter_mm=round(2 * radius, 2),
                            darkness=darkness, path=[tuple(float(v) for v in p) for p in path])
        if parts is not None:
            scanner = subject.to_scanner(parts[:, :3])
            obj.parts = [(*map(float, p), float(r)) for p, r in zip(scanner, parts[:, 3])]
            obj.path = []
        mimics.append(obj)
        for p in (path if parts is None else subject.to_scanner(parts[:, :3])):
            taken.append(np.array([*p, radius]))

    vein_dark = VEIN_DARKNESS[modality]
    wm = tpl.points((WM,))
    surface = tpl.points((GM,))
    surface = surface[tpl.depth_at(surface) < 2.5]
    for _ in range(int(rng.integers(4, 10))):  # medullary veins: deep white matter towards the cortex
        start = wm[rng.integers(len(wm))]
        outward = start - np.array([0.0, -5.0, 15.0])
        add("vein", "medullary", _polyline(rng, start, outward, rng.uniform(15, 35)),
            rng.uniform(0.35, 0.8), rng.uniform(*vein_dark))
    for _ in range(int(rng.integers(3, 8))):  # cortical veins along the surface
        start = surface[rng.integers(len(surface))]
        normal = start - np.asarray(CEREBRUM.centre)
        tangent = np.cross(normal, rng.normal(size=3))
        path = _polyline(rng, start, tangent, rng.uniform(25, 60), steps=8, wiggle=0.15)
        path = np.asarray(CEREBRUM.centre) + (path - np.asarray(CEREBRUM.centre)) / CEREBRUM.rho(path)[:, None] * 0.985
        add("vein", "cortical", path, rng.uniform(0.7, 1.4), rng.uniform(*vein_dark))
    for side in (-1, 1):  # internal cerebral veins
        path = np.array([(side * 2.5, 5.0 - 8 * t, 19.0 - 2.5 * t) for t in range(6)])
        add("vein", "deep", path + rng.normal(0, 0.5, path.shape), rng.uniform(0.8, 1.3), rng.uniform(*vein_dark))
    for points, radius in ARTERIES:
        if rng.random() < 0.8:
            add("flow_void", "basal artery", np.asarray(points, float) + rng.normal(0, 1.0, 3),
                radius * rng.uniform(0.85, 1.15), rng.uniform(0.03, 0.12))
    for place, centre, chance in [("pineal", PINEAL, 0.5), ("choroid plexus", CHOROID[0], 0.35),
                                  ("choroid plexus", CHOROID[1], 0.35)]:
        if rng.random() < chance:
            n = int(rng.integers(2, 5))
            parts = np.column_stack([np.asarray(centre) + rng.normal(0, 1.3, (n, 3)), rng.uniform(0.8, 2.0, n)])
            add("calcification", place, parts[:, :3], float(parts[:, 3].max()) + 1.0,
                rng.uniform(0.1, 0.3), parts=parts)
    return mimics


def _template_image(modality: str, rng: np.random.Generator) -> Tuple[sitk.Image, sitk.Image, List[str]]:
    """Subject-specific template intensities (with iron and air-bone artefacts) and its mimic labels."""
    tpl = template()
    lut = np.zeros(16, dtype=np.float32)
    for code, value in CONTRAST[modality].items():
        lut[code] = value * rng.uniform(0.93, 1.07) if value > 0.05 else value
    image = lut[tpl.codes]
    mimic = np.zeros(TEMPLATE_SIZE, dtype=np.uint8)
    names: List[str] = []
    axes = _template_axes()
    iron = rng.uniform(*IRON_DARKNESS[modality])
    for place, structures, code in (("pallidum", PALLIDA, PALLIDUM), ("dentate", DENTATES, DENTATE)):
        for side, ellipsoid in zip(("left", "right"), structures):
            sl, p = _template_window(axes, ellipsoid.centre, max(ellipsoid.radii) + 2)
            inside = tpl.codes[sl] == code
            rho = ellipsoid.rho(p)
            factor = 1 - (1 - iron * rng.uniform(0.95, 1.05)) * np.clip(1.6 - rho, 0, 1)
            image[sl] *= np.where(inside, factor, 1.0).astype(np.float32)
            names.append(f"iron:{place} {side}")
            mimic[sl][inside & (factor < 0.95)] = len(names)
    brain = np.isin(tpl.codes, BRAIN_CODES)
    for place in ("frontal", "mastoid_left", "mastoid_right"):
        strength = rng.uniform(0.3, 1.0)
        sinus = SINUSES[place]
        sl, p = _template_window(axes, sinus.centre, max(sinus.radii) + 25)
        distance = np.maximum(sinus.rho(p) - 1, 0) * min(sinus.radii)
        factor = 1 - strength * np.exp(-(distance / 8.0) ** 2)
        image[sl] *= factor.astype(np.float32)
        artefact = brain[sl] & (factor < 0.6)
        if artefact.any():
            names.append(f"air_bone:{place.replace('_', ' ')}")
            mimic[sl][artefact] = len(names)
    geometry = tpl.geometry()
    return (geometry.with_image(image.transpose(2, 1, 0).copy()),
            geometry.with_image(mimic.transpose(2, 1, 0).copy()), names)


def _template_window(axes: List[np.ndarray], centre: Sequence[float], reach: float
                     ) -> Tuple[Tuple[slice, ...], np.ndarray]:
    sl = tuple(slice(max(int((c - reach - TEMPLATE_LOW[a]) // TEMPLATE_SPACING), 0),
                     min(int((c + reach - TEMPLATE_LOW[a]) // TEMPLATE_SPACING) + 1, TEMPLATE_SIZE[a]))
               for a, c in enumerate(centre))
    p = np.stack(np.meshgrid(*[axes[a][sl[a]] for a in range(3)], indexing="ij"), axis=-1)
    return sl, p


def _subject_transform(subject: Subject, grid: Geometry) -> sitk.Transform:
    """Scanner LPS -> template LPS, for resampling the template onto the acquisition grid."""
    affine = sitk.AffineTransform(3)
    linear = LPS_RAS @ subject.matrix @ LPS_RAS
    affine.SetMatrix(linear.ravel().tolist())
    affine.SetTranslation((-(LPS_RAS @ subject.matrix @ subject.position)).tolist())
    # the warp as a displacement field on a coarse grid over the acquisition's field of view
    step = 6.0
    corners = np.array([[i, j, k] for i in (0, grid.size[0] - 1) for j in (0, grid.size[1] - 1)
                        for k in (0, grid.size[2] - 1)], dtype=float)
    lps = grid.index_to_lps(corners)
    lo, hi = lps.min(axis=0) - 2 * step, lps.max(axis=0) + 2 * step
    size = np.ceil((hi - lo) / step).astype(int) + 1
    axes = [lo[a] + np.arange(size[a]) * step for a in range(3)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    disp_lps = (LPS_RAS @ subject.warp(pts @ LPS_RAS).T).T
    field = disp_lps.reshape(*size, 3).transpose(2, 1, 0, 3)
    field_image = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    field_image.SetOrigin(tuple(lo))
    field_image.SetSpacing((step,) * 3)
    warp = sitk.DisplacementFieldTransform(field_image)
    return sitk.CompositeTransform([affine, warp])  # the warp acts first, then the affine


def _smoothing_sigma(subject: Subject, acq: Acquisition) -> List[float]:
    """Gaussian sigma (mm, template axes) that turns the 1 mm template into the voxel's partial volume."""
    axes_head = subject.matrix @ acq.direction * np.asarray(acq.spacing)  # voxel axes in head mm
    variance = (axes_head ** 2).sum(axis=1) / 12.0 - TEMPLATE_SPACING ** 2 / 12.0
    return [float(np.sqrt(max(v, 0.0))) for v in variance]


@dataclass
class Phantom:
    image: sitk.Image
    cmb_labels: sitk.Image
    mimic_labels: sitk.Image
    objects: List[PhantomObject]
    info: Dict[str, object]


def make_phantom(seed: int, modality: Optional[str] = None, spacing: Optional[Sequence[float]] = None,
                 n_cmb: Optional[int] = None) -> Phantom:
    """One phantom scan with its ground truth, entirely determined by ``seed`` (and the overrides)."""
    rng = np.random.default_rng(seed)
    subject = random_subject(rng)
    acq = random_acquisition(rng, modality, spacing)
    grid = acquisition_grid(subject, acq)
    tpl_image, tpl_mimics, template_mimic_names = _template_image(acq.modality, rng)

    transform = _subject_transform(subject, grid)
    sigma = _smoothing_sigma(subject, acq)
    if max(sigma) > 0.05:
        tpl_image = sitk.SmoothingRecursiveGaussian(tpl_image, [max(s, 0.01) for s in sigma])
    reference = grid.with_image(np.zeros(grid.array_shape, dtype=np.uint8))
    signal = sitk.GetArrayFromImage(sitk.Resample(tpl_image, reference, transform, sitk.sitkLinear, 0.0,
                                                  sitk.sitkFloat32))
    mimic_labels = sitk.GetArrayFromImage(sitk.Resample(tpl_mimics, reference, transform,
                                                        sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16))
    del tpl_image, tpl_mimics

    taken: List[np.ndarray] = []
    mimics = place_mimics(rng, subject, acq.modality, taken)
    count = cmb_count(rng) if n_cmb is None else int(n_cmb)
    cmbs = place_cmbs(rng, subject, count, taken, acq.modality)
    objects: List[PhantomObject] = []
    for index, name in enumerate(template_mimic_names, start=1):
        where = np.argwhere(mimic_labels == index)
        if len(where) == 0:
            continue
        centre = grid.index_to_ras(where.mean(axis=0)[::-1])
        cls, place = name.split(":")
        objects.append(PhantomObject(label=index, kind="mimic", cls=cls, area=place,
                                     centre=tuple(float(v) for v in centre), diameter_mm=0.0))
    next_label = len(template_mimic_names) + 1
    for mimic in mimics:
        mimic.label = next_label
        next_label += 1
        render_mimic(grid, signal, mimic_labels, mimic)
        objects.append(mimic)

    cmb_labels = np.zeros(grid.array_shape, dtype=np.uint16)
    bloom = 0.9 * acq.echo_time_ms / 20.0 * (1.3 if acq.modality == "swi" else 1.0)
    for cmb in cmbs:
        render_cmb(grid, signal, cmb_labels, cmb, bloom * rng.uniform(0.7, 1.3))
    mimic_labels[cmb_labels > 0] = 0
    objects = cmbs + objects

    signal *= _bias_field(grid, rng, acq.bias)
    sigma_noise = 1.0 / acq.snr
    noisy = np.hypot(signal + rng.normal(0, sigma_noise, signal.shape).astype(np.float32),
                     rng.normal(0, sigma_noise, signal.shape).astype(np.float32))
    del signal
    scale = 1800.0 / max(float(np.percentile(noisy[::4, ::4, ::4], 99.5)), 1e-6)
    image = np.clip(noisy * scale, 0, 32767).astype(np.int16)
    info = {"seed": seed, "modality": acq.modality, "echo_time_ms": round(acq.echo_time_ms, 1),
            "spacing_mm": list(acq.spacing), "size": list(grid.size), "orientation": grid.orientation(),
            "obliquity_deg": round(grid.obliquity_degrees(), 1), "snr": round(acq.snr, 1),
            "n_cmb": len(cmbs), "n_mimics": sum(1 for o in objects if o.kind == "mimic")}
    return Phantom(image=grid.with_image(image), cmb_labels=grid.with_image(cmb_labels),
                   mimic_labels=grid.with_image(mimic_labels), objects=objects, info=info)


def _bias_field(grid: Geometry, rng: np.random.Generator, strength: float) -> np.ndarray:
    """A smooth multiplicative field (low-order polynomial in RAS, on a coarse grid, then resampled)."""
    coarse_shape = tuple(max(2, int(np.ceil(n * s / 16.0))) for n, s in zip(grid.array_shape, grid.spacing[::-1]))
    z, y, x = [np.linspace(-1, 1, n) for n in coarse_shape]
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    c = rng.normal(0, 1, 9)
    field = (c[0] * xx + c[1] * yy + c[2] * zz + c[3] * xx * yy + c[4] * yy * zz + c[5] * xx * zz
             + c[6] * xx ** 2 + c[7] * yy ** 2 + c[8] * zz ** 2)
    field = np.exp(strength * field / max(np.abs(field).max(), 1e-6)).astype(np.float32)
    return ndimage.zoom(field, [n / m for n, m in zip(grid.array_shape, coarse_shape)], order=1)[
        :grid.array_shape[0], :grid.array_shape[1], :grid.array_shape[2]]


# --- files --------------------------------------------------------------------------------

OBJECT_COLUMNS = ("label", "kind", "class", "area", "r", "a", "s", "diameter_mm", "side")
INDEX_COLUMNS = ("scan_id", "seed", "modality", "echo_time_ms", "spacing_mm", "size", "orientation",
                 "obliquity_deg", "snr", "n_cmb", "n_mimics")


def truth_paths(folder: Path, scan_id: str) -> Dict[str, Path]:
    truth = Path(folder) / "truth"
    return {"image": Path(folder) / f"{scan_id}.nii.gz", "cmb": truth / f"{scan_id}_cmb.nii.gz",
            "mimics": truth / f"{scan_id}_mimics.nii.gz", "objects": truth / f"{scan_id}_objects.tsv"}


def write_phantom(phantom: Phantom, folder: Path, scan_id: str) -> Dict[str, Path]:
    """Write the scan, its truth maps and object table (each file atomically)."""
    paths = truth_paths(folder, scan_id)
    paths["objects"].parent.mkdir(parents=True, exist_ok=True)
    for key, image in (("image", phantom.image), ("cmb", phantom.cmb_labels), ("mimics", phantom.mimic_labels)):
        with atomic_path(paths[key]) as tmp:
            sitk.WriteImage(image, str(tmp), True)
    rows = ["\t".join(OBJECT_COLUMNS)]
    for obj in phantom.objects:
        rows.append("\t".join([str(obj.label), obj.kind, obj.cls, obj.area, *(f"{v:.2f}" for v in obj.centre),
                               f"{obj.diameter_mm:.2f}", obj.side]))
    atomic_write_text(paths["objects"], "\n".join(rows) + "\n")
    return paths


def read_objects(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def generate(out: Path, n: int, seed: int, modality: Optional[str] = None,
             spacing: Optional[Sequence[float]] = None, prefix: str = "phantom",
             progress: Optional[Callable[[int, int, str], None]] = None,
             family: str = "procedural", n_cmb: Optional[int] = None) -> List[Dict[str, object]]:
    """Write ``n`` phantoms with seeds ``seed .. seed+n-1`` into ``out`` plus an index ``phantoms.tsv``.

    ``family``: ``procedural`` (this module's heads) or a family of ``headphantom`` (``atlas``, ``ood``);
    ``n_cmb``: CMBs per scan (default: drawn from the seed). Scan ids are ``<prefix>-<seed>``; existing
    complete phantoms are kept (a rerun resumes).
    """
    if family == "procedural":
        def maker(scan_seed: int, modality: Optional[str], spacing: Optional[Sequence[float]]) -> Phantom:
            return make_phantom(scan_seed, modality, spacing, n_cmb)
    else:
        from .headphantom import make_head_phantom

        def maker(scan_seed: int, modality: Optional[str], spacing: Optional[Sequence[float]]) -> Phantom:
            return make_head_phantom(scan_seed, family, modality, spacing, n_cmb)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index: List[Dict[str, object]] = []
    for number in range(n):
        scan_seed = seed + number
        scan_id = f"{prefix}-{scan_seed:06d}"
        info_path = out / "truth" / f"{scan_id}_info.json"
        if info_path.exists() and all(p.exists() for p in truth_paths(out, scan_id).values()):
            info = json.loads(info_path.read_text(encoding="utf-8"))
        else:
            phantom = maker(scan_seed, modality, spacing)
            write_phantom(phantom, out, scan_id)
            info = {"scan_id": scan_id, **phantom.info}
            atomic_write_text(info_path, json.dumps(info) + "\n")
        index.append(info)
        if progress:
            progress(number + 1, n, scan_id)
    lines = ["\t".join(INDEX_COLUMNS)]
    for info in index:
        lines.append("\t".join("x".join(f"{v:g}" for v in info[c]) if isinstance(info[c], list) else str(info[c])
                               for c in INDEX_COLUMNS))
    atomic_write_text(out / "phantoms.tsv", "\n".join(lines) + "\n")
    return index
