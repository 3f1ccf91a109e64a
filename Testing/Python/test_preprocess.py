"""Brain mask (computed or given), model-box placement and normalisation."""

import numpy as np
import pytest
import SimpleITK as sitk

import phantoms
from helpers import SMALL_FOV
from SHIVACMBLib.errors import InputError
from SHIVACMBLib.geometry import Geometry
from SHIVACMBLib.modelstore.models import Normalization
from SHIVACMBLib.preprocess import (BrainMask, compute_brain_mask, load_brain_mask, normalise, place_model_box,
                                    prepare_input)
from SHIVACMBLib.scan import read_scan


def ellipsoid_volume_ml(radii):
    return 4.0 / 3.0 * np.pi * np.prod(radii) / 1000.0


@pytest.mark.parametrize("spacing, direction", [
    ((1, 1, 1), np.eye(3)),
    ((0.5, 0.5, 2.0), phantoms.rotation((1, 1, 0), 20)),
    ((1, 1, 3), np.diag([-1.0, -1.0, 1.0])),
])
def test_computed_mask_matches_the_brain(tmp_path, scene, spacing, direction):
    grid = phantoms.grid_around((1.3, -2.1, 0.7), SMALL_FOV, spacing, direction)
    scan = read_scan(phantoms.write(phantoms.render(scene, grid), tmp_path / "scan.nrrd"))
    mask = compute_brain_mask(scan)
    assert mask.volume_ml() == pytest.approx(ellipsoid_volume_ml(scene.brain_radii), rel=0.1)
    centre = mask.points_ras().mean(axis=0)
    assert np.allclose(centre, scene.brain_centre, atol=1.5)


def test_computed_mask_ignores_scalp_and_keeps_dark_lesions(tmp_path):
    scene = phantoms.head_scene()
    grid = phantoms.grid_around((0, 0, 0), (200, 240, 170), (2, 2, 2))
    scan = read_scan(phantoms.write(phantoms.render(scene, grid), tmp_path / "head.nii.gz"))
    mask = compute_brain_mask(scan)
    # brain + CSF shell, not the scalp (1.25x) nor the skull
    assert mask.volume_ml() == pytest.approx(ellipsoid_volume_ml(np.array(scene.brain_radii) * 1.05), rel=0.12)
    inside = mask.geometry.ras_to_index(scene.centres).round().astype(int)
    values = sitk.GetArrayViewFromImage(mask.image)
    assert all(values[k, j, i] for i, j, k in inside)  # the dark spheres are inside the mask


def test_computed_mask_keeps_the_scalp_out_when_the_skull_blurs_into_it(tmp_path):
    """Thin skull tables around bright marrow: at the mask's 2 mm the skull rises above the Otsu threshold."""
    scene = phantoms.head_scene()
    scene.shells = [(1.20, 0.75), (1.14, 0.06), (1.13, 0.55), (1.07, 0.06), (1.05, 1.25)]
    grid = phantoms.grid_around((0, 0, 0), (200, 240, 170), (2, 2, 2))
    scan = read_scan(phantoms.write(phantoms.render(scene, grid), tmp_path / "head.nii.gz"))
    mask = compute_brain_mask(scan)
    # brain + CSF shell and a few mm more (2.37 L with the scalp before the second threshold existed)
    assert mask.volume_ml() == pytest.approx(ellipsoid_volume_ml(np.array(scene.brain_radii) * 1.05), rel=0.15)
    scalp = np.array([[0.0, 0.0, 1.17 * scene.brain_radii[2]], [1.17 * scene.brain_radii[0], 0.0, 0.0]])
    i, j, k = mask.geometry.ras_to_index(scalp).round().astype(int).T
    assert not sitk.GetArrayViewFromImage(mask.image)[k, j, i].any()


def test_computed_mask_refuses_pure_noise(tmp_path):
    grid = phantoms.grid_around((0, 0, 0), (20, 20, 20), (1, 1, 1))
    noise = np.random.default_rng(0).random(grid.array_shape).astype(np.float32)
    scan = read_scan(phantoms.write(grid.with_image(noise), tmp_path / "noise.nii.gz"))
    with pytest.raises(InputError, match="mask"):
        compute_brain_mask(scan)


def test_given_mask_on_another_grid(tmp_path, scene, iso_scan):
    scan = read_scan(iso_scan)
    grid = phantoms.grid_around((0, 0, 0), (110, 130, 100), (2, 2, 2), phantoms.rotation((0, 0, 1), 30))
    ras = grid.index_to_ras(np.stack(np.indices(grid.size), -1).reshape(-1, 3))
    inside = (((ras - scene.brain_centre) / scene.brain_radii) ** 2).sum(1) <= 1
    labels = inside.reshape(grid.size).transpose(2, 1, 0).astype(np.int16) * 3  # any label value > 0
    path = phantoms.write(grid.with_image(labels), tmp_path / "mask.nii.gz")
    mask = load_brain_mask(path, scan)
    assert mask.source == str(path)
    assert mask.volume_ml() == pytest.approx(ellipsoid_volume_ml(scene.brain_radii), rel=0.05)


def test_given_mask_must_overlap_the_scan(tmp_path, iso_scan):
    scan = read_scan(iso_scan)
    far = phantoms.grid_around((300, 0, 0), (20, 20, 20), (1, 1, 1))
    path = phantoms.write(far.with_image(np.ones(far.array_shape, np.uint8)), tmp_path / "far.nii.gz")
    with pytest.raises(InputError, match="does not overlap the scan") as err:
        load_brain_mask(path, scan)
    assert str(path) in str(err.value)


def test_given_mask_must_not_be_empty(tmp_path, iso_scan):
    grid = read_scan(iso_scan).geometry
    path = phantoms.write(grid.with_image(np.zeros(grid.array_shape, np.uint8)), tmp_path / "empty.nii.gz")
    with pytest.raises(InputError, match="brain mask is empty"):
        load_brain_mask(path, read_scan(iso_scan))


def box_mask(grid: Geometry, lo_ras, hi_ras) -> BrainMask:
    ras = grid.index_to_ras(np.stack(np.indices(grid.size), -1).reshape(-1, 3))
    inside = np.all((ras >= lo_ras) & (ras <= hi_ras), axis=1).reshape(grid.size).transpose(2, 1, 0)
    return BrainMask(grid.with_image(inside.astype(np.uint8)), "test")


def test_model_box_is_centred_on_the_mask():
    grid = phantoms.grid_around((0, 0, 0), (100, 100, 100), (1, 1, 1))
    mask = box_mask(grid, (-20.2, -10.2, -5.2), (30.2, 20.2, 15.2))
    box, warnings = place_model_box(mask, (80, 60, 50), (1, 1, 1))
    assert warnings == []
    assert box.orientation() == "RAS"
    centre_voxel = box.index_to_ras(np.array([40.0, 30.0, 25.0]))
    assert np.allclose(centre_voxel, np.ceil(mask.points_ras().mean(axis=0)))


def test_model_box_is_raised_to_hold_the_top_of_the_brain():
    grid = phantoms.grid_around((0, 0, 0), (60, 60, 200), (1, 1, 1))
    mask = box_mask(grid, (-10, -10, -90), (10, 10, 40))  # brain plus a long neck: centre of mass is low
    box, warnings = place_model_box(mask, (40, 40, 60), (1, 1, 1))
    top = box.index_to_ras(np.array([0.0, 0.0, 59.0]))[2]
    assert top >= 40 + 5 - 1  # top of the mask plus the margin
    assert any("beyond the model box along S" in w for w in warnings)  # the neck is cut, and said so


def test_normalise_follows_the_descriptor():
    volume = np.array([[[-5.0, 0.0, 50.0, 100.0, 300.0, np.nan]]], np.float32)
    inside = np.array([[[True, True, True, True, False, False]]])
    reference = normalise(volume, inside, Normalization("percentile", 100, 1.3))
    assert reference == pytest.approx(100.0)
    expected = np.array([0.0, 0.0, 0.5, 1.0, 1.3, 0.0]) / 1.3
    assert np.allclose(volume.ravel(), expected)


def test_normalise_refuses_a_brain_without_signal():
    with pytest.raises(ValueError, match="no signal"):
        normalise(np.zeros((2, 2, 2), np.float32), np.ones((2, 2, 2), bool), Normalization())


def test_prepare_input_gives_the_model_box(model_dir, iso_scan):
    from SHIVACMBLib.modelstore.models import load_model

    scan = read_scan(iso_scan)
    model = load_model(str(model_dir))
    prepared = prepare_input(scan, compute_brain_mask(scan), model)
    assert prepared.volume.shape == tuple(reversed(model.shape)) == prepared.mask.shape
    assert prepared.volume.dtype == np.float32
    assert 0.0 <= prepared.volume.min() and prepared.volume.max() <= 1.0
    assert np.percentile(prepared.volume[prepared.mask], 99) == pytest.approx(1 / 1.3, rel=0.01)
