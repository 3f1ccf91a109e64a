"""The anatomy of the realistic phantoms: the shipped MNI tissue map made into a whole head.

Brain tissue comes from ``models/atlas/tissue_labels_1mm.nii.gz`` (built by
``models/atlas/build_atlas.py`` from the ICBM 2009a grey and white matter maps and the MARS labels:
cortex, white matter, striatum, pallidum, thalamus, brainstem, cerebellar cortex and white matter,
dentate nuclei, ventricles and sulcal CSF). Around it each head gets, at random thicknesses,
subarachnoid CSF, skull (tables and marrow), scalp, neck and face muscle, eyes, the frontal and
sphenoid sinuses and the mastoid air cells; atrophy enlarges the ventricles and opens the sulci.
Arrays are indexed ``[x, y, z]`` on a 1 mm grid in MNI RAS millimetres (``LOW`` is the first voxel).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import cKDTree

from ..geometry import LPS_RAS, RAS_AXES_LPS_DIRECTION, Geometry

TISSUES = ("outside", "csf", "ventricle", "cortex", "white_matter", "striatum", "pallidum", "thalamus",
           "brainstem", "cerebellar_cortex", "cerebellar_white_matter", "dentate")
# classes a head adds around the brain (codes follow those of the tissue file)
HEAD_TISSUES = TISSUES + ("skull", "marrow", "scalp", "muscle", "eye", "air")
CODE = {name: number for number, name in enumerate(HEAD_TISSUES)}
BRAIN_TISSUES = tuple(CODE[n] for n in TISSUES[3:])
TISSUE_LABELS = "tissue_labels_1mm.nii.gz"

PAD_LOW = np.array([10, 10, 40])  # voxels added around the tissue file's grid: scalp, neck and face
PAD_HIGH = np.array([10, 10, 10])

# landmarks, MNI RAS mm
PINEAL = (0.0, -33.0, 3.0)
CHOROID = ((-27.0, -42.0, 14.0), (27.0, -42.0, 14.0))
VENTRICLE_CENTRES = ((-17.0, -12.0, 18.0), (17.0, -12.0, 18.0))
SINUSES = {"frontal": ((0.0, 80.0, -4.0), (13.0, 6.0, 11.0)), "sphenoid": ((0.0, 18.0, -38.0), (12.0, 11.0, 9.0)),
           "mastoid left": ((-50.0, -32.0, -42.0), (9.0, 11.0, 10.0)),
           "mastoid right": ((50.0, -32.0, -42.0), (9.0, 11.0, 10.0))}
EYES = ((-32.0, 50.0, -40.0), (32.0, 50.0, -40.0))
ARTERIES = [([(0, -17, -46), (0, -11, -34), (0, -12, -22)], 1.6),  # basilar, before the pons
            ([(-15, 4, -34), (-15, 3, -24), (-14, 4, -16)], 2.0), ([(15, 4, -34), (15, 3, -24), (14, 4, -16)], 2.0),
            ([(-14, 4, -16), (-26, 5, -14), (-38, 4, -10)], 1.4), ([(14, 4, -16), (26, 5, -14), (38, 4, -10)], 1.4)]
DEEP_VEINS = [[(-2.5, 2, 16), (-2.5, -8, 15), (-2.5, -18, 14), (-2.5, -28, 12)],  # internal cerebral veins
              [(2.5, 2, 16), (2.5, -8, 15), (2.5, -18, 14), (2.5, -28, 12)],
              [(-13, 6, 18), (-12, -2, 17), (-10, -10, 16), (-6, -14, 16)],  # thalamostriate veins
              [(13, 6, 18), (12, -2, 17), (10, -10, 16), (6, -14, 16)]]


@dataclass(frozen=True)
class HeadAtlas:
    """The tissue map on the padded grid with the distance maps every head is cut from (computed once)."""

    codes: np.ndarray  # [x, y, z] uint8, TISSUES codes
    area: np.ndarray  # [x, y, z] uint8: MARS area of brain voxels (1 lobar, 2 deep, 3 infratentorial), 0 elsewhere
    outside_mm: np.ndarray  # distance from the brain (0 inside), float32
    inside_mm: np.ndarray  # depth in the brain (0 outside), float32
    ventricle_mm: np.ndarray  # distance from the ventricles, float32
    sulcus_mm: np.ndarray  # distance of tissue from CSF or the brain's outside, float32
    low: np.ndarray  # RAS of voxel [0, 0, 0]

    @property
    def size(self) -> Tuple[int, int, int]:
        return tuple(int(s) for s in self.codes.shape)

    def geometry(self) -> Geometry:
        return Geometry(self.size, (1.0, 1.0, 1.0), tuple(LPS_RAS @ self.low), RAS_AXES_LPS_DIRECTION)

    def index(self, ras: np.ndarray) -> np.ndarray:
        """Nearest voxel indices of RAS points (clamped to the grid)."""
        idx = np.rint(np.asarray(ras, dtype=float) - self.low).astype(int)
        return np.clip(idx, 0, np.asarray(self.size) - 1)

    def points(self, mask: np.ndarray) -> np.ndarray:
        """RAS of the voxels of ``mask``."""
        return np.argwhere(mask) + self.low

    def axes(self) -> Sequence[np.ndarray]:
        return [self.low[a] + np.arange(self.size[a]) for a in range(3)]


def _read_xyz(path) -> Tuple[np.ndarray, Geometry]:
    image = sitk.ReadImage(str(path))
    geometry = Geometry.of(image)
    if geometry.direction != RAS_AXES_LPS_DIRECTION or geometry.spacing != (1.0, 1.0, 1.0):
        raise ValueError(f"{path}: expected a 1 mm grid with RAS axes")
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0), geometry


@lru_cache(maxsize=1)
def head_atlas() -> HeadAtlas:
    """Load the tissue and MARS maps, pad them and compute the distance maps (a few seconds, once)."""
    from ..location import AREAS, SUBREGIONS, atlas_dir

    folder = atlas_dir()
    tissue, grid = _read_xyz(folder / TISSUE_LABELS)
    mars, _ = _read_xyz(folder / "mars_labels_1mm.nii.gz")
    pad = [(int(a), int(b)) for a, b in zip(PAD_LOW, PAD_HIGH)]
    codes = np.pad(tissue, pad)
    area_of_code = np.array([0] + [AREAS.index(area) + 1 for _name, area in SUBREGIONS], np.uint8)
    area = np.pad(area_of_code[mars], pad)
    area[codes < CODE["cortex"]] = 0
    brain = codes > 0
    low = LPS_RAS @ np.asarray(grid.origin) - PAD_LOW
    return HeadAtlas(codes=codes, area=area,
                     outside_mm=ndimage.distance_transform_edt(~brain).astype(np.float32),
                     inside_mm=ndimage.distance_transform_edt(brain).astype(np.float32),
                     ventricle_mm=ndimage.distance_transform_edt(codes != CODE["ventricle"]).astype(np.float32),
                     sulcus_mm=ndimage.distance_transform_edt(codes > CODE["ventricle"]).astype(np.float32),
                     low=low)


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], cell: float) -> np.ndarray:
    """A smooth random field of about unit amplitude, [x, y, z] of ``shape``: Gaussian noise on a grid of
    ``cell`` voxels, upsampled by linear interpolation."""
    coarse = [int(np.ceil(n / cell)) + 4 for n in shape]
    noise = sitk.GetImageFromArray(rng.normal(0.0, 1.0, coarse[::-1]).astype(np.float32))
    noise.SetSpacing((float(cell),) * 3)
    noise.SetOrigin((-2.0 * cell,) * 3)
    reference = sitk.Image([int(n) for n in shape], sitk.sitkUInt8)
    field = sitk.Resample(noise, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(field).transpose(2, 1, 0)


@dataclass(frozen=True)
class HeadShape:
    """How one head differs from the atlas's: atrophy and the thickness of each layer around the brain (mm)."""

    ventricle_growth_mm: float = 0.0
    sulcal_widening_mm: float = 0.0
    subarachnoid_mm: float = 1.5
    skull_mm: float = 6.0
    scalp_mm: float = 6.0


def make_head(rng: np.random.Generator, shape: HeadShape) -> np.ndarray:
    """The head's tissue codes (``HEAD_TISSUES``) on the atlas's padded grid."""
    atlas = head_atlas()
    codes = atlas.codes.copy()
    if shape.ventricle_growth_mm > 0:
        grow = (atlas.ventricle_mm <= shape.ventricle_growth_mm) & np.isin(
            codes, (CODE["white_matter"], CODE["striatum"], CODE["thalamus"], CODE["csf"]))
        codes[grow] = CODE["ventricle"]
    if shape.sulcal_widening_mm > 0:
        near = (atlas.sulcus_mm <= shape.sulcal_widening_mm) & (codes == CODE["cortex"])
        where = np.nonzero(near)
        field = smooth_noise(rng, atlas.size, 12.0)
        opened = field[where] > 0.3
        codes[tuple(w[opened] for w in where)] = CODE["csf"]
    outside = atlas.outside_mm
    layers = np.cumsum([shape.subarachnoid_mm, shape.skull_mm, shape.scalp_mm])
    shell = (outside > 0) & (outside <= layers[2])
    codes[shell & (outside <= layers[0])] = CODE["csf"]
    skull = shell & (outside > layers[0]) & (outside <= layers[1])
    codes[skull] = CODE["skull"]
    middle = np.abs(outside - (layers[0] + layers[1]) / 2) < shape.skull_mm / 6
    codes[skull & middle] = CODE["marrow"]
    codes[shell & (outside > layers[1])] = CODE["scalp"]
    x, y, z = np.meshgrid(*atlas.axes(), indexing="ij", sparse=True)
    neck = ((x / 62.0) ** 2 + ((y + 5.0) / 80.0) ** 2 + ((z + 75.0) / 55.0) ** 2 < 1) & (z < -40) & (codes == 0)
    codes[neck] = CODE["muscle"]
    for centre, radii in SINUSES.values():
        air = _ellipsoid(x, y, z, centre, radii) & (atlas.codes == 0)
        codes[air] = CODE["air"]
    for centre in EYES:
        codes[_ellipsoid(x, y, z, centre, (12.0, 12.0, 12.0)) & (atlas.codes == 0)] = CODE["eye"]
    return codes


def _ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: Sequence[float], radii: Sequence[float]
               ) -> np.ndarray:
    return (((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
            + ((z - centre[2]) / radii[2]) ** 2) < 1


@lru_cache(maxsize=1)
def tissue_ml() -> float:
    """Brain tissue volume of the atlas (mL)."""
    return float(np.isin(head_atlas().codes, BRAIN_TISSUES).sum() / 1000.0)


@lru_cache(maxsize=4)
def cmb_sites(margin_mm: float = 0.0, near_csf: bool = False) -> Dict[int, np.ndarray]:
    """MNI RAS of the tissue voxels where CMBs may go, by MARS area (1 lobar, 2 deep, 3 infratentorial):
    at least 2 mm inside tissue (``near_csf``: 1-3.5 mm from CSF or the brain's outside) and 12 mm from
    the iron nuclei, the pineal and the choroid plexus; with ``margin_mm``, also farther than that from
    every other area (sites whose area no registration doubts)."""
    atlas = head_atlas()
    keep_away = np.array([PINEAL, *CHOROID, (-19, -3, -1), (19, -3, -1), (-14, -57, -34), (14, -57, -34)])
    depth = (atlas.sulcus_mm >= 1.0) & (atlas.sulcus_mm <= 3.5) if near_csf else atlas.sulcus_mm >= 2.0
    inside = depth & (atlas.area > 0) & ~np.isin(atlas.codes, (CODE["pallidum"], CODE["dentate"]))
    sites = {}
    for area in (1, 2, 3):
        where = inside & (atlas.area == area)
        if margin_mm > 0:
            where &= ndimage.distance_transform_edt((atlas.area == 0) | (atlas.area == area)) > margin_mm
        points = atlas.points(where)
        far = cKDTree(keep_away).query(points)[0] > 12.0
        sites[area] = points[far].astype(np.float32)
    return sites


@lru_cache(maxsize=1)
def surface_points() -> np.ndarray:
    """MNI RAS of the subarachnoid space on the brain's surface (0.5-1.5 mm out), where cortical veins run."""
    atlas = head_atlas()
    return atlas.points((atlas.outside_mm > 0.5) & (atlas.outside_mm <= 1.5)).astype(np.float32)


@lru_cache(maxsize=1)
def periventricular_points() -> np.ndarray:
    """MNI RAS of white matter 1-3 mm from the ventricles, where medullary veins begin."""
    atlas = head_atlas()
    return atlas.points((atlas.ventricle_mm >= 1) & (atlas.ventricle_mm <= 3)
                        & (atlas.codes == CODE["white_matter"])).astype(np.float32)


@lru_cache(maxsize=1)
def white_matter_points() -> np.ndarray:
    atlas = head_atlas()
    return atlas.points((atlas.codes == CODE["white_matter"]) & (atlas.sulcus_mm >= 2)).astype(np.float32)
