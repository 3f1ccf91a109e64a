"""From the ensemble probability in the model box to CMBs in the scan's own grid.

1. Threshold the fold mean and find 26-connected components. With an extent threshold below the
   threshold (hysteresis), components are found above the extent threshold and only those whose
   peak exceeds the threshold are CMBs: the threshold decides whether there is a CMB, the extent
   threshold how far it reaches (a strict threshold no longer shrinks a CMB to its core).
2. Drop components with more than 25 % of their voxels outside the brain mask, components
   whose peak lies outside the scan's field of view, and (optionally) components outside the
   size limits. Kept components then lose their voxels outside the mask (probability x mask).
3. Number the CMBs from the top of the head down (superior -> inferior, then right -> left,
   then anterior -> posterior) so that ids are stable and follow reading order.
4. Map to the native grid: the probability is interpolated (linearly) at every native voxel
   near a CMB, and each native voxel above the extent threshold goes to the nearest CMB. A CMB that
   covers no native voxel (small CMB, thick slices) gets the native voxel nearest to its
   peak, so the CMB count is the same in model and native space.
5. Measure each CMB (centroid, volume, probabilities, fold agreement).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .findings import Finding
from .geometry import Geometry

OUTSIDE_RATIO = 0.25
CONNECT_26 = np.ones((3, 3, 3), dtype=bool)
_CROP_MARGIN = 2  # model voxels around a CMB searched for native voxels


@dataclass
class Components:
    """Kept CMB candidates in the model box (arrays indexed [z, y, x]).

    ``index``/``ids`` list the kept voxels sparsely (flat index into the box, CMB id) so that
    per-CMB statistics never scan the whole box.
    """

    labels: np.ndarray  # int32, 1..count, 0 elsewhere
    probability: np.ndarray  # float32: fold mean x mask, 0 at above-threshold voxels of dropped components
    count: int
    index: np.ndarray  # flat indices of the kept voxels
    ids: np.ndarray  # their CMB ids
    dropped: Dict[str, int] = field(default_factory=dict)

    def zyx(self) -> np.ndarray:
        """[z, y, x] indices of the kept voxels, shape (N, 3)."""
        return np.stack(np.unravel_index(self.index, self.labels.shape), axis=1)

    def peaks(self) -> np.ndarray:
        """[z, y, x] of each CMB's highest-probability voxel, row 0 unused."""
        return self.zyx()[_argmax_per_label(self.ids, self.probability.ravel()[self.index], self.count)]

    def centres(self) -> np.ndarray:
        """Probability-weighted [z, y, x] centre of each CMB, row 0 unused."""
        return _weighted_centres(self.ids, self.zyx(), self.probability.ravel()[self.index], self.count)


def find_components(
    mean: np.ndarray,
    inside: np.ndarray,
    model: Geometry,
    native: Geometry,
    threshold: float,
    outside_ratio: float = OUTSIDE_RATIO,
    min_volume_mm3: float = 0.0,
    max_volume_mm3: Optional[float] = None,
    candidate_filter: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    extent: Optional[float] = None,
) -> Components:
    """Steps 1-3 of the module docstring. ``candidate_filter``: the [z, y, x] peaks of the components that
    pass the other rules -> which of them to keep (``fpfilter``); the others count as ``fp_filter``.
    ``extent``: the extent threshold (``None`` or at least ``threshold``: components above ``threshold``)."""
    low = threshold if extent is None else min(extent, threshold)
    binary = mean > low
    labels, n = ndimage.label(binary, structure=CONNECT_26)
    probability = mean * inside
    dropped = {"below_threshold": 0} if low < threshold else {}
    dropped.update({"outside_brain": 0, "outside_scan": 0, "too_small": 0, "too_large": 0})
    if candidate_filter is not None:
        dropped["fp_filter"] = 0
    if n == 0:
        nothing = np.zeros(0, dtype=np.int64)
        return Components(labels, probability.astype(np.float32, copy=False), 0, nothing, nothing, dropped)
    flat_labels, flat_probability = labels.ravel(), probability.ravel()
    where = np.flatnonzero(binary)
    ids = flat_labels[where]
    in_brain = inside.ravel()[where]
    sizes = np.bincount(ids, minlength=n + 1)
    outside = np.bincount(ids, weights=~in_brain, minlength=n + 1)
    volume = sizes * model.voxel_volume
    zyx = np.stack(np.unravel_index(where, labels.shape), axis=1)
    peaks = zyx[_argmax_per_label(ids, flat_probability[where], n)]
    reasons = {"below_threshold": _max_per_label(ids, mean.ravel()[where], n) <= threshold} if low < threshold else {}
    reasons.update({
        "outside_brain": outside > outside_ratio * sizes,
        "outside_scan": ~native.contains_ras(model.index_to_ras(peaks[:, ::-1].astype(float))),
        "too_small": volume < min_volume_mm3,
        "too_large": volume > (np.inf if max_volume_mm3 is None else max_volume_mm3),
    })
    keep = np.ones(n + 1, dtype=bool)
    keep[0] = False
    for reason, hit in reasons.items():
        hit[0] = False
        dropped[reason] = int(np.count_nonzero(hit & keep))
        keep &= ~hit
    if candidate_filter is not None and keep.any():
        candidates = np.flatnonzero(keep)
        vetoed = candidates[~np.asarray(candidate_filter(peaks[candidates]), dtype=bool)]
        dropped["fp_filter"] = len(vetoed)
        keep[vetoed] = False

    kept = keep[ids] & in_brain  # kept components lose their voxels outside the mask
    flat_probability[where[~kept]] = 0.0
    centres = _weighted_centres(ids[kept], zyx[kept], flat_probability[where[kept]], n)
    remap = np.zeros(n + 1, dtype=np.int32)
    order = np.flatnonzero(keep)
    remap[order] = _reading_order(centres[order])
    new_ids = remap[ids]
    new_ids[~kept] = 0
    flat_labels[where] = new_ids
    return Components(labels, probability.astype(np.float32, copy=False), len(order), where[kept], new_ids[kept],
                      dropped)


def _argmax_per_label(ids: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Position (into ``ids``) of the largest value of each label 0..n (0 where a label is absent)."""
    best = np.zeros(n + 1, dtype=np.int64)
    if len(ids):
        order = np.lexsort((values, ids))  # by label, then value: the last of each label is its maximum
        last = np.flatnonzero(np.diff(np.append(ids[order], n + 1)))
        best[ids[order][last]] = order[last]
    return best


def _weighted_centres(ids: np.ndarray, zyx: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """Weighted mean [z, y, x] per label 0..n."""
    total = np.bincount(ids, weights=weights, minlength=n + 1)
    safe = np.where(total > 0, total, 1.0)
    return np.stack([np.bincount(ids, weights=weights * zyx[:, d], minlength=n + 1) / safe for d in range(3)],
                    axis=1)


def _reading_order(centres: np.ndarray) -> np.ndarray:
    """Ids 1..len for CMBs with these [z, y, x] centres: superior first, then right, then anterior."""
    order = np.lexsort((-centres[:, 1], -centres[:, 2], -centres[:, 0]))  # last key sorts first
    new = np.empty(len(centres), dtype=np.int32)
    new[order] = np.arange(1, len(centres) + 1)
    return new


@dataclass
class NativeLabels:
    """CMBs on the scan's own grid: ``labels`` [k, j, i] (label k = CMB k) and voxels per CMB."""

    labels: np.ndarray
    voxels: np.ndarray  # voxels[k] = native voxel count of CMB k (index 0 unused)
    rescued: int  # CMBs that got their single voxel from the one-voxel rule


def map_to_native(components: Components, model: Geometry, native: Geometry, threshold: float) -> NativeLabels:
    """Step 4 of the module docstring (``threshold``: the extent threshold where there is one)."""
    dtype = np.uint8 if components.count < 256 else np.uint16
    out = np.zeros(native.array_shape, dtype=dtype)
    voxels = np.zeros(components.count + 1, dtype=np.int64)
    if components.count == 0:
        return NativeLabels(out, voxels, 0)
    native_to_model = np.linalg.inv(model.ijk_to_lps()) @ native.ijk_to_lps()
    for cmb, box in enumerate(ndimage.find_objects(components.labels), start=1):
        if box is None:
            continue
        crop = tuple(slice(max(s.start - _CROP_MARGIN, 0), min(s.stop + _CROP_MARGIN, dim))
                     for s, dim in zip(box, components.labels.shape))
        territory = _nearest_label(components.labels[crop])
        lo, hi = _native_bounds(crop, model, native)
        if np.any(lo > hi):
            continue
        kk, jj, ii = np.mgrid[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
        ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1).astype(float)
        zyx = (ijk @ native_to_model[:3, :3].T + native_to_model[:3, 3])[:, ::-1].T
        p = ndimage.map_coordinates(components.probability, zyx, order=1, mode="constant", cval=0.0)
        nearest = np.rint(zyx).astype(int) - np.array([s.start for s in crop])[:, None]
        valid = np.all((nearest >= 0) & (nearest < np.array(territory.shape)[:, None]), axis=0)
        owner = np.zeros(len(p), dtype=territory.dtype)
        owner[valid] = territory[tuple(nearest[:, valid])]
        region = out[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
        chosen = ((p > threshold) & (owner == cmb)).reshape(kk.shape) & (region == 0)
        region[chosen] = cmb
        voxels[cmb] += int(np.count_nonzero(chosen))
    missing = np.flatnonzero(voxels[1:] == 0) + 1
    if len(missing):
        peaks = components.peaks().astype(float)
        top = np.asarray(native.size) - 1
        for cmb in missing:
            target = native.lps_to_index(model.index_to_lps(peaks[cmb, ::-1]))
            out[_free_voxel_near(out, np.clip(target, 0, top))] = cmb
            voxels[cmb] = 1
    return NativeLabels(out, voxels, len(missing))


def _nearest_label(labels: np.ndarray) -> np.ndarray:
    """Each voxel's nearest non-zero label (the territory of every CMB in a crop)."""
    background = labels == 0
    if not background.any():
        return labels
    index = ndimage.distance_transform_edt(background, return_distances=False, return_indices=True)
    return labels[tuple(index)]


def _native_bounds(crop: Sequence[slice], model: Geometry, native: Geometry) -> Tuple[np.ndarray, np.ndarray]:
    """Native (i, j, k) index range covering a model-box crop given as [z, y, x] slices."""
    z, y, x = crop
    corners = np.array([[a, b, c] for a in (x.start - 0.5, x.stop - 0.5)
                        for b in (y.start - 0.5, y.stop - 0.5) for c in (z.start - 0.5, z.stop - 0.5)])
    index = native.lps_to_index(model.index_to_lps(corners))
    top = np.asarray(native.size) - 1
    lo = np.clip(np.floor(index.min(axis=0)), 0, top).astype(int)
    hi = np.clip(np.ceil(index.max(axis=0)), 0, top).astype(int)
    outside = (index.max(axis=0) < -0.5) | (index.min(axis=0) > top + 0.5)
    hi[outside] = lo[outside] - 1
    return lo, hi


def _free_voxel_near(labels: np.ndarray, ijk: np.ndarray) -> Tuple[int, int, int]:
    """[k, j, i] of the unlabelled native voxel nearest (in index units) to continuous ``ijk``."""
    centre = np.rint(ijk).astype(int)
    shape_ijk = np.array(labels.shape[::-1])
    for radius in range(0, max(shape_ijk)):
        lo = np.maximum(centre - radius, 0)
        hi = np.minimum(centre + radius, shape_ijk - 1)
        kk, jj, ii = np.mgrid[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
        free = labels[kk, jj, ii] == 0
        if free.any():
            distance = (ii - ijk[0]) ** 2 + (jj - ijk[1]) ** 2 + (kk - ijk[2]) ** 2
            distance[~free] = np.inf
            best = np.unravel_index(int(np.argmin(distance)), distance.shape)
            return int(kk[best]), int(jj[best]), int(ii[best])
    raise RuntimeError("no free native voxel left for a CMB")


def measure(components: Components, folds: Sequence[np.ndarray], native_labels: NativeLabels,
            model: Geometry, native: Geometry, threshold: float) -> List[Finding]:
    """Step 5: one :class:`Finding` per CMB (ids 1..count)."""
    n = components.count
    if n == 0:
        return []
    ids = components.ids
    prob = components.probability.ravel()[components.index]
    ras = model.index_to_ras(components.centres()[1:, ::-1])
    ijk = np.clip(np.rint(native.ras_to_index(ras)), 0, np.asarray(native.size) - 1).astype(int)
    maxima = _max_per_label(ids, prob, n)
    means = np.bincount(ids, weights=prob, minlength=n + 1) / np.maximum(np.bincount(ids, minlength=n + 1), 1)
    if folds:
        detected = [_max_per_label(ids, f.ravel()[components.index], n) > threshold for f in folds]
        agreement = np.mean(detected, axis=0)
    else:
        agreement = np.ones(n + 1)
    voxels = native_labels.voxels
    return [
        Finding(
            cmb_id=c,
            r=float(ras[c - 1, 0]), a=float(ras[c - 1, 1]), s=float(ras[c - 1, 2]),
            i=int(ijk[c - 1, 0]), j=int(ijk[c - 1, 1]), k=int(ijk[c - 1, 2]),
            volume_mm3=float(voxels[c] * native.voxel_volume),
            voxels=int(voxels[c]),
            max_prob=float(maxima[c]),
            mean_prob=float(means[c]),
            fold_agreement=float(agreement[c]),
        )
        for c in range(1, n + 1)
    ]


def _max_per_label(ids: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n + 1, -np.inf)
    np.maximum.at(out, ids, values)
    return out
