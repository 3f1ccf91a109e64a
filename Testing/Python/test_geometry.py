"""Grid maths: index <-> RAS/LPS, orientation codes, validity, the model grid, resampling."""

import numpy as np
import pytest
import SimpleITK as sitk

import phantoms
from SHIVACMBLib.geometry import Geometry, model_grid, resample


def test_index_ras_round_trip_on_an_oblique_anisotropic_grid():
    grid = phantoms.grid_around((10, -20, 5), (50, 60, 40), (0.5, 0.7, 2.5), phantoms.rotation((1, 2, 3), 33))
    ijk = np.array([[0, 0, 0], [3.5, 7.25, 1.0], [99, 85, 15]])
    assert np.allclose(grid.ras_to_index(grid.index_to_ras(ijk)), ijk)
    assert np.allclose(grid.lps_to_index(grid.index_to_lps(ijk)), ijk)
    # RAS is LPS with the first two signs flipped
    assert np.allclose(grid.index_to_ras(ijk)[:, :2], -grid.index_to_lps(ijk)[:, :2])
    assert np.allclose(grid.index_to_ras(ijk)[:, 2], grid.index_to_lps(ijk)[:, 2])


def test_geometry_matches_simpleitk_physical_points():
    grid = phantoms.grid_around((0, 0, 0), (20, 30, 10), (0.9, 1.1, 3.0), phantoms.rotation((0, 1, 1), 17))
    image = grid.with_image(np.zeros(grid.array_shape, np.float32))
    for ijk in ([0, 0, 0], [5, 9, 2], [21, 26, 3]):
        lps = image.TransformIndexToPhysicalPoint(ijk)
        assert np.allclose(grid.index_to_lps(np.array(ijk, float)), lps)
    assert Geometry.of(image) == grid


def test_from_matrix_recovers_the_grid():
    grid = phantoms.grid_around((3, 4, 5), (20, 20, 20), (0.5, 1.0, 2.0), phantoms.rotation((1, 0, 0), 25))
    again = Geometry.from_matrix(grid.size, grid.ijk_to_lps())
    assert np.allclose(again.ijk_to_lps(), grid.ijk_to_lps())


@pytest.mark.parametrize("direction, code", [
    (np.eye(3), "LPS"),
    (np.diag([-1.0, -1.0, 1.0]), "RAS"),
    (np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float), "PIL"),
    (np.diag([1.0, -1.0, -1.0]), "LAI"),
])
def test_orientation_codes(direction, code):
    grid = Geometry((2, 2, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(direction.ravel()))
    assert grid.orientation() == code
    assert grid.obliquity_degrees() == pytest.approx(0.0)


def test_obliquity_is_the_rotation_angle():
    grid = Geometry((2, 2, 2), (1.0,) * 3, (0.0,) * 3, tuple(phantoms.rotation((0, 0, 1), 20).ravel()))
    assert grid.obliquity_degrees() == pytest.approx(20.0)


@pytest.mark.parametrize("spacing, origin, direction, problem", [
    ((1.0, float("nan"), 1.0), (0.0, 0.0, 0.0), np.eye(3), "non-finite"),
    ((1.0, 1.0, 1.0), (0.0, float("inf"), 0.0), np.eye(3), "non-finite"),
    ((1.0, 0.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "non-positive"),
    ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.array([[1, 1, 0], [0, 0, 0], [0, 0, 1.0]]), "non-invertible"),
])
def test_problems_name_what_is_wrong(spacing, origin, direction, problem):
    grid = Geometry((4, 4, 4), spacing, origin, tuple(np.asarray(direction, float).ravel()))
    assert any(problem in p for p in grid.problems())


def test_valid_grid_has_no_problems():
    assert phantoms.grid_around((0, 0, 0), (10, 10, 10), (1, 1, 1)).problems() == []


def test_model_grid_axes_run_right_anterior_superior():
    grid = model_grid((10, 12, 14), (1, 1, 1), (-5.0, -6.0, -7.0))
    assert grid.orientation() == "RAS"
    assert np.allclose(grid.index_to_ras(np.zeros(3)), [-5, -6, -7])
    assert np.allclose(grid.index_to_ras(np.array([1.0, 2.0, 3.0])), [-4, -4, -4])


def test_resample_is_exact_onto_the_same_grid():
    grid = phantoms.grid_around((0, 0, 0), (12, 10, 8), (1, 1, 2), phantoms.rotation((1, 1, 0), 10))
    values = np.random.default_rng(0).random(grid.array_shape).astype(np.float32)
    image = grid.with_image(values)
    same = sitk.GetArrayFromImage(resample(image, grid))
    assert np.allclose(same, values, atol=1e-5)


def test_contains_ras():
    grid = phantoms.grid_around((0, 0, 0), (10, 10, 10), (1, 1, 1))
    inside = grid.contains_ras(np.array([[0, 0, 0], [4.4, -4.4, 4.4], [6, 0, 0], [0, 0, -5.6]]))
    assert inside.tolist() == [True, True, False, False]
