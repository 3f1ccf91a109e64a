"""Reading scans in every format with their full geometry, and refusing bad input clearly."""

import gzip
import shutil

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

import phantoms
from SHIVACMBLib.errors import InputError
from SHIVACMBLib.geometry import Geometry
from SHIVACMBLib.scan import read_label_image, read_scan, scan_id_from_path

OBLIQUE = phantoms.rotation((1.0, 0.4, 0.2), 18)


@pytest.fixture(scope="module")
def image():
    grid = phantoms.grid_around((4.0, -6.0, 8.0), (40, 46, 30), (0.8, 0.9, 2.0), OBLIQUE)
    scene = phantoms.Scene(spheres=[phantoms.Sphere((4.0, -6.0, 8.0), 3.0)], brain_radii=(15, 18, 12))
    return phantoms.render(scene, grid, seed=3)


def assert_same_geometry(a: Geometry, b: Geometry):
    assert a.size == b.size
    assert np.allclose(a.ijk_to_lps(), b.ijk_to_lps(), atol=1e-4)


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii", "scan.nrrd", "scan.nhdr", "scan.mha", "scan.mhd"])
def test_every_format_keeps_geometry_and_voxels(tmp_path, image, name):
    path = phantoms.write(image, tmp_path / name)
    scan = read_scan(path)
    assert_same_geometry(scan.geometry, Geometry.of(image))
    assert np.allclose(sitk.GetArrayViewFromImage(scan.image), sitk.GetArrayViewFromImage(image), rtol=1e-5)
    assert scan.scan_id == "scan"
    assert len(scan.sha256) == 64


def test_detached_header_checksum_covers_the_data_file(tmp_path, image):
    path = phantoms.write(image, tmp_path / "scan.mhd")
    before = read_scan(path)
    assert len(before.files) == 2
    data = before.files[1]
    content = bytearray(data.read_bytes())
    content[-1] ^= 0xFF
    data.write_bytes(bytes(content))
    assert read_scan(path).sha256 != before.sha256


def test_nrrd_stored_in_ras_space_reads_to_the_same_physical_grid(tmp_path, image):
    path = phantoms.write_ras_nrrd(image, tmp_path / "ras.nrrd")
    assert nrrd.read_header(str(path))["space"] == "right-anterior-superior"
    assert_same_geometry(read_scan(path).geometry, Geometry.of(image))


def test_dicom_series_keeps_geometry(tmp_path, image):
    folder = phantoms.write_dicom_series(image, tmp_path / "dicom")
    scan = read_scan(folder)
    assert scan.format == "dicom"
    assert len(scan.files) == image.GetSize()[2]
    assert_same_geometry(scan.geometry, Geometry.of(image))
    assert scan.output_extension == ".nii.gz"
    assert scan.scan_id == "dicom"


def test_four_d_file_with_a_single_volume_is_accepted(tmp_path, image):
    four = sitk.JoinSeries([image])
    path = tmp_path / "one_volume.nrrd"
    sitk.WriteImage(four, str(path))
    assert sitk.ReadImage(str(path)).GetDimension() == 4
    assert read_scan(path).geometry.size == image.GetSize()


def test_partly_non_finite_image_is_accepted_with_a_warning(tmp_path, image):
    values = sitk.GetArrayFromImage(image)
    values[0, 0, :5] = np.nan
    path = phantoms.write(Geometry.of(image).with_image(values), tmp_path / "nan.nrrd")  # ITK's NIfTI reader zeroes NaN
    assert any("5 non-finite" in w for w in read_scan(path).warnings)


def test_scan_id_strips_image_extensions():
    assert scan_id_from_path("/data/sub-01_ses-1_swi.nii.gz") == "sub-01_ses-1_swi"
    assert scan_id_from_path("x/scan.v2.nrrd") == "scan.v2"
    assert scan_id_from_path("x/dicom_folder") == "dicom_folder"


# --- refusals: one clear line naming the file and the problem -------------------------------


def refused(path, fragment):
    with pytest.raises(InputError) as err:
        read_scan(path)
    message = str(err.value)
    assert str(path) in message and fragment in message, message
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    refused(tmp_path / "nope.nii.gz", "no such file")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(b"this is not an image")
    refused(path, "not an image file")


@pytest.mark.parametrize("name", ["cut.nii", "cut.nii.gz", "cut.nrrd", "cut.mha"])
def test_truncated_files(tmp_path, image, name):
    path = phantoms.write(image, tmp_path / ("full" + name[3:]))
    data = path.read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) * 2 // 3])
    message = refused(cut, "")
    assert "truncated" in message or "corrupt" in message


def test_truncated_file_check_accepts_multi_member_gzip(tmp_path, image):
    path = phantoms.write(image, tmp_path / "plain.nii")
    data = path.read_bytes()
    joined = tmp_path / "joined.nii.gz"
    joined.write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    assert read_scan(joined).geometry.size == image.GetSize()


def test_four_d_with_several_volumes(tmp_path, image):
    path = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([image, image, image]), str(path))
    refused(path, "4D image with 3 volumes")


def test_two_d_image(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(20, 30).astype(np.float32)), str(path))
    refused(path, "2D image")


def test_single_slice_volume(tmp_path):
    path = tmp_path / "thin.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(1, 20, 30).astype(np.float32)), str(path))
    refused(path, "2D image")


def test_vector_image(tmp_path):
    path = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(5, 6, 7, 3).astype(np.float32), isVector=True), str(path))
    refused(path, "3-component")


def test_empty_image(tmp_path):
    path = tmp_path / "zeros.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6, 7), np.int16)), str(path))
    refused(path, "empty image")


def test_all_nan_image(tmp_path):
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((5, 6, 7), np.nan, np.float32)), str(path))
    refused(path, "every voxel is NaN")


def test_all_nan_nifti_is_called_so(tmp_path):
    path = tmp_path / "nan.nii.gz"  # ITK's NIfTI reader turns NaN into 0: the stored bytes are counted
    sitk.WriteImage(sitk.GetImageFromArray(np.full((5, 6, 7), np.nan, np.float32)), str(path))
    refused(path, "every voxel is NaN or infinite")


def test_non_finite_geometry(tmp_path):  # refused by the NRRD parser itself; Geometry.problems is unit-tested
    path = tmp_path / "nan_origin.nrrd"
    header = {"space": "left-posterior-superior", "space directions": np.eye(3),
              "space origin": np.array([0.0, np.nan, 0.0]), "kinds": ["domain"] * 3}
    nrrd.write(str(path), np.random.rand(5, 6, 7).astype(np.float32), header)
    refused(path, "cannot read image")


def test_non_invertible_geometry(tmp_path):
    path = tmp_path / "flat.nrrd"
    header = {"space": "left-posterior-superior", "space directions": np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1]]),
              "space origin": np.zeros(3), "kinds": ["domain"] * 3}
    nrrd.write(str(path), np.random.rand(5, 6, 7).astype(np.float32), header)
    refused(path, "non-invertible direction")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    refused(tmp_path, "no DICOM series")


def test_folder_with_two_dicom_series(tmp_path, image):
    phantoms.write_dicom_series(image, tmp_path / "a", series_uid="1.2.3.4.1")
    phantoms.write_dicom_series(image, tmp_path / "b", series_uid="1.2.3.4.2")
    both = tmp_path / "both"
    both.mkdir()
    for sub in ("a", "b"):
        for f in (tmp_path / sub).iterdir():
            shutil.copy(f, both / f"{sub}_{f.name}")
    refused(both, "2 DICOM series")


def test_dicom_series_with_a_missing_slice(tmp_path, image):
    folder = phantoms.write_dicom_series(image, tmp_path / "gap")
    sorted(folder.iterdir())[7].unlink()
    refused(folder, "missing slices")


def test_mask_reader_applies_the_same_checks(tmp_path):
    path = tmp_path / "mask2d.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 5), np.uint8)), str(path))
    with pytest.raises(InputError, match="2D image"):
        read_label_image(path)


def test_dicom_series_of_a_single_file(tmp_path, image):
    folder = phantoms.write_dicom_series(image, tmp_path / "one")
    for extra in sorted(folder.iterdir())[1:]:
        extra.unlink()
    refused(folder, "single file")
