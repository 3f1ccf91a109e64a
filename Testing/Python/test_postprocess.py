"""Components, the outside-the-brain rule, size limits, native mapping (count invariant), measurements."""

import numpy as np
import pytest

import phantoms
from SHIVACMBLib.geometry import Geometry, model_grid
from SHIVACMBLib.postprocess import find_components, map_to_native, measure

BOX = model_grid((40, 40, 40), (1, 1, 1), (-20.0, -20.0, -20.0))  # voxel (x, y, z) at RAS (x-20, y-20, z-20)
# the same voxel centres stored the other way round (LPS): i runs to the left, j to the back
NATIVE_1MM = Geometry((40, 40, 40), (1.0, 1.0, 1.0), (-19.0, -19.0, -20.0), tuple(np.eye(3).ravel()))


def blob(array, centre_zyx, radius, value=0.9):
    z, y, x = np.indices(array.shape)
    array[(z - centre_zyx[0]) ** 2 + (y - centre_zyx[1]) ** 2 + (x - centre_zyx[2]) ** 2 <= radius ** 2] = value
    return array


def empty():
    return np.zeros((40, 40, 40), np.float32)


def test_components_are_kept_dropped_and_numbered_top_down():
    mean = empty()
    blob(mean, (10, 20, 20), 2)          # low
    blob(mean, (30, 20, 20), 2)          # high: becomes CMB 1
    blob(mean, (20, 20, 35), 2)          # half outside the mask: dropped
    blob(mean, (20, 10, 27), 2)          # one voxel column outside the mask: kept, loses it
    inside = np.ones_like(mean, bool)
    inside[:, :, 35:] = False
    inside[:, :, 29:] = False
    components = find_components(mean, inside, BOX, NATIVE_1MM, 0.5)
    assert components.count == 3
    assert components.dropped["outside_brain"] == 1
    assert components.labels[30, 20, 20] == 1 and components.labels[20, 10, 27] == 2 \
        and components.labels[10, 20, 20] == 3
    assert components.labels[20, 10, 29] == 0  # outside the mask
    assert components.probability[20, 20, 35] == 0  # dropped component's voxels are cleared
    assert not np.any(components.probability[~inside])


def test_26_connectivity_joins_diagonal_voxels():
    mean = empty()
    mean[10, 10, 10] = mean[11, 11, 11] = 0.9
    components = find_components(mean, np.ones_like(mean, bool), BOX, NATIVE_1MM, 0.5)
    assert components.count == 1


def test_threshold_is_strict_and_size_limits_apply():
    mean = empty()
    blob(mean, (10, 10, 10), 1)            # 7 voxels
    blob(mean, (30, 30, 30), 3)            # 123 voxels
    mean[20, 20, 20] = 0.5                 # exactly at threshold: not a CMB
    inside = np.ones_like(mean, bool)
    assert find_components(mean, inside, BOX, NATIVE_1MM, 0.5).count == 2
    small = find_components(mean, inside, BOX, NATIVE_1MM, 0.5, min_volume_mm3=10)
    large = find_components(mean, inside, BOX, NATIVE_1MM, 0.5, max_volume_mm3=100)
    assert (small.count, small.dropped["too_small"]) == (1, 1)
    assert (large.count, large.dropped["too_large"]) == (1, 1)


def test_extent_threshold_keeps_a_cmb_whole_and_the_threshold_decides():
    mean = empty()
    blob(mean, (12, 20, 20), 3, value=0.4)    # shell above the extent threshold...
    blob(mean, (12, 20, 20), 1, value=0.995)  # ...around a core above the threshold: one CMB, all of it
    blob(mean, (28, 20, 20), 3, value=0.9)    # peak under the threshold: no CMB, however large
    inside = np.ones_like(mean, bool)
    strict = find_components(mean, inside, BOX, NATIVE_1MM, 0.99)
    assert strict.count == 1 and np.count_nonzero(strict.labels) == 7 and "below_threshold" not in strict.dropped
    whole = find_components(mean, inside, BOX, NATIVE_1MM, 0.99, extent=0.3)
    assert whole.count == 1 and whole.dropped["below_threshold"] == 1
    assert np.count_nonzero(whole.labels) == np.count_nonzero(blob(empty(), (12, 20, 20), 3))
    assert whole.probability[28, 20, 20] == 0  # the dropped component's voxels are cleared
    assert map_to_native(whole, BOX, NATIVE_1MM, 0.3).voxels[1] == np.count_nonzero(whole.labels)
    same = find_components(mean, inside, BOX, NATIVE_1MM, 0.5, extent=0.5)  # no hysteresis: as before
    assert same.count == 2 and "below_threshold" not in same.dropped


def test_components_outside_the_scan_field_of_view_are_dropped():
    mean = empty()
    blob(mean, (20, 20, 5), 2)
    blob(mean, (20, 20, 33), 2)
    native = phantoms.grid_around((0.0, 0.0, 0.0), (20, 40, 40), (1, 1, 1))  # covers R -10..10 only
    components = find_components(mean, np.ones_like(mean, bool), BOX, native, 0.5)
    assert components.count == 0 and components.dropped["outside_scan"] == 2


@pytest.mark.parametrize("spacing, direction", [
    ((1, 1, 3), np.eye(3)),
    ((2.5, 2.5, 4), phantoms.rotation((1, 2, 0), 25)),
    ((0.5, 0.5, 0.5), np.diag([-1.0, 1.0, -1.0])),
])
def test_every_cmb_keeps_at_least_one_native_voxel(spacing, direction):
    rng = np.random.default_rng(7)
    mean = empty()
    cells = rng.choice(np.arange(5, 35), size=(60, 3))
    for z, y, x in cells:  # many single-voxel CMBs, some adjacent
        mean[z, y, x] = rng.uniform(0.55, 1.0)
    components = find_components(mean, np.ones_like(mean, bool), BOX, NATIVE_1MM, 0.5)
    native = phantoms.grid_around((0.3, -0.2, 0.1), (40, 40, 40), spacing, direction)
    mapped = map_to_native(components, BOX, native, 0.5)
    present = np.unique(mapped.labels[mapped.labels > 0])
    assert present.tolist() == list(range(1, components.count + 1))
    assert mapped.voxels[1:].tolist() == np.bincount(mapped.labels.ravel())[1:].tolist()
    if min(spacing) > 1:
        assert mapped.rescued > 0  # thick voxels miss most single-voxel CMBs: the rule keeps them


def test_native_voxels_follow_the_interpolated_probability():
    mean = empty()
    blob(mean, (20, 20, 20), 4)
    components = find_components(mean, np.ones_like(mean, bool), BOX, NATIVE_1MM, 0.5)
    fine = phantoms.grid_around((0.0, 0.0, 0.0), (40, 40, 40), (0.5, 0.5, 0.5))
    mapped = map_to_native(components, BOX, fine, 0.5)
    labels = mapped.labels
    assert mapped.rescued == 0
    volume = np.count_nonzero(labels) * fine.voxel_volume
    assert volume == pytest.approx(np.count_nonzero(components.labels), rel=0.15)
    centre = fine.index_to_ras(np.argwhere(labels)[:, ::-1].mean(axis=0))
    assert np.allclose(centre, [0.0, 0.0, 0.0], atol=0.3)  # blob centre: voxel 20 -> RAS 0


def test_neighbouring_cmbs_keep_their_own_native_voxels():
    mean = empty()
    blob(mean, (20, 20, 15), 2)
    blob(mean, (20, 20, 21), 2)  # one sub-threshold voxel apart
    mean[20, 20, 18] = 0.3
    components = find_components(mean, np.ones_like(mean, bool), BOX, NATIVE_1MM, 0.5)
    assert components.count == 2
    fine = phantoms.grid_around((0.0, 0.0, 0.0), (40, 40, 40), (0.5, 0.5, 0.5))
    labels = map_to_native(components, BOX, fine, 0.5).labels
    for cmb in (1, 2):  # the gap voxel x = 18 sits at R = -2
        ras = fine.index_to_ras(np.argwhere(labels == cmb)[:, ::-1])
        own_side = ras[:, 0] < -2 if components.labels[20, 20, 15] == cmb else ras[:, 0] > -2
        assert np.all(own_side) and len(ras) > 0


def test_measurements():
    mean = empty()
    blob(mean, (25, 22, 18), 2, value=0.8)
    mean[25, 22, 18] = 0.95
    folds = [mean.copy(), mean * 0.5, mean.copy()]  # the middle fold stays below threshold
    components = find_components(mean, np.ones_like(mean, bool), BOX, NATIVE_1MM, 0.5)
    mapped = map_to_native(components, BOX, NATIVE_1MM, 0.5)
    labels = mapped.labels
    [finding] = measure(components, folds, mapped, BOX, NATIVE_1MM, 0.5)
    assert finding.cmb_id == 1 and finding.status == "unreviewed"
    assert np.allclose(finding.ras, [-2.0, 2.0, 5.0], atol=1e-6)  # x 18, y 22, z 25 -> RAS
    assert finding.max_prob == pytest.approx(0.95)
    assert finding.mean_prob == pytest.approx((0.8 * 32 + 0.95) / 33)
    assert finding.fold_agreement == pytest.approx(2 / 3)
    assert finding.voxels == np.count_nonzero(labels == 1) == 33
    assert finding.volume_mm3 == pytest.approx(33.0)
    assert np.allclose(NATIVE_1MM.index_to_ras(np.array([finding.i, finding.j, finding.k], float)), finding.ras,
                       atol=0.5 + 1e-6)


def test_nothing_found():
    components = find_components(empty(), np.ones((40, 40, 40), bool), BOX, NATIVE_1MM, 0.5)
    mapped = map_to_native(components, BOX, NATIVE_1MM, 0.5)
    assert components.count == 0 and mapped.rescued == 0 and not mapped.labels.any()
    assert measure(components, [], mapped, BOX, NATIVE_1MM, 0.5) == []
