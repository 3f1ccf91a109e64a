"""One scan end to end: CMBs planted at known RAS positions come back there, in every geometry."""

import json
import shutil
import socket

import numpy as np
import pytest
import SimpleITK as sitk

import phantoms
from helpers import SMALL_FOV, cpu_provider, files_under, match
from SHIVACMBLib import pipeline
from SHIVACMBLib.errors import InputError, RuntimeFailure
from SHIVACMBLib.files import checksum, staged_directory
from SHIVACMBLib.findings import read_tsv
from SHIVACMBLib.geometry import Geometry
from SHIVACMBLib.pipeline import SegmentOptions, segment
from SHIVACMBLib.runrecord import RunRecord, RunRecordError, read_if_valid
from SHIVACMBLib.segfile import read_seg_nrrd

OBLIQUE = phantoms.rotation((1.0, 0.5, 0.3), 20)
PERMUTED = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)  # i -> posterior, j -> inferior, k -> left

GEOMETRIES = {
    "iso-lps-nifti": ((1, 1, 1), np.eye(3), ".nii.gz"),
    "iso-ras-nifti": ((1, 1, 1), np.diag([-1.0, -1.0, 1.0]), ".nii.gz"),
    "ras-space-nrrd": ((1, 1, 1), np.eye(3), "ras.nrrd"),
    "aniso-0.5x0.5x2-nrrd": ((0.5, 0.5, 2.0), np.eye(3), ".nrrd"),
    "aniso-1x1x3-mha": ((1, 1, 3), np.eye(3), ".mha"),
    "oblique-nifti": ((1, 1, 1), OBLIQUE, ".nii.gz"),
    "oblique-aniso-nifti": ((0.5, 0.5, 2.0), OBLIQUE, ".nii.gz"),
    "permuted-nrrd": ((1, 1, 1), PERMUTED, ".nrrd"),
    "flipped-aniso-mha": ((0.8, 0.9, 1.2), np.diag([1.0, -1.0, -1.0]), ".mha"),
    "oblique-dicom": ((0.9, 0.9, 2.0), phantoms.rotation((0, 1, 0), 15), "dicom"),
}


def write_case(folder, scene, spacing, direction, kind, seed=1):
    grid = phantoms.grid_around((1.3, -2.1, 0.7), SMALL_FOV, spacing, direction)
    image = phantoms.render(scene, grid, seed=seed)
    if kind == "dicom":
        return phantoms.write_dicom_series(image, folder / "scan_dicom")
    if kind == "ras.nrrd":
        return phantoms.write_ras_nrrd(image, folder / "scan.nrrd")
    return phantoms.write(image, folder / f"scan{kind}")


@pytest.mark.parametrize("case", GEOMETRIES)
def test_planted_cmbs_come_back_at_their_physical_position(tmp_path, scene, model_dir, case):
    spacing, direction, kind = GEOMETRIES[case]
    scan = write_case(tmp_path, scene, spacing, direction, kind)
    result = segment(scan, tmp_path / "out", SegmentOptions(model=str(model_dir), report=False))
    tolerance = 1.0 if len(set(spacing)) == 1 else max(spacing) / 2
    found = np.array([f.ras for f in result.findings])
    assert len(found) == len(scene.spheres), (case, found)
    assert np.all(match(found, scene.centres) <= tolerance), (case, match(found, scene.centres))
    # the label map is in the input's own grid, with one label per finding
    labels_file = result.output_dir / result.run.results["files"][0]
    labels = sitk.ReadImage(str(labels_file))
    native = Geometry.of(labels)
    assert list(native.size) == result.run.input["geometry"]["size"]
    assert np.allclose(native.ijk_to_ras(), result.run.input["geometry"]["ijk_to_ras"], atol=1e-4)
    values = sitk.GetArrayViewFromImage(labels)
    assert np.unique(values[values > 0]).tolist() == list(range(1, len(found) + 1))


@pytest.fixture(scope="module")
def rich_run(tmp_path_factory, scene, model_dir):
    """An oblique, anisotropic scan segmented with every output."""
    folder = tmp_path_factory.mktemp("rich")
    scan = write_case(folder, scene, (0.5, 0.5, 2.0), OBLIQUE, ".nii.gz", seed=4)
    options = SegmentOptions(model=str(model_dir), save_probability=True)
    return scan, segment(scan, folder / "results", options)


def test_outputs_are_complete_and_consistent(rich_run):
    scan, result = rich_run
    out = result.output_dir
    expected = {"cmb_labels.nii.gz", "cmb.seg.nrrd", "findings.tsv", "cmb_probability.nii.gz", "report.html",
                "run.json"}
    assert set(files_under(out)) == expected == set(result.files)
    scan_grid = Geometry.of(sitk.ReadImage(str(scan)))
    labels_image = sitk.ReadImage(str(out / "cmb_labels.nii.gz"))
    assert Geometry.of(labels_image).size == scan_grid.size
    assert np.allclose(Geometry.of(labels_image).ijk_to_lps(), scan_grid.ijk_to_lps(), atol=1e-4)
    labels = sitk.GetArrayFromImage(labels_image)

    seg_labels, seg_grid, segments = read_seg_nrrd(out / "cmb.seg.nrrd")
    assert np.array_equal(seg_labels, labels)
    assert np.allclose(seg_grid.ijk_to_lps(), scan_grid.ijk_to_lps(), atol=1e-4)
    assert [s["name"] for s in segments] == [f"CMB {f.cmb_id}" for f in result.findings]

    table = read_tsv(out / "findings.tsv")
    assert [f.cmb_id for f in table] == list(range(1, len(result.findings) + 1))
    counts = np.bincount(labels.ravel(), minlength=len(table) + 1)
    for f in table:
        assert f.voxels == counts[f.cmb_id] >= 1
        assert f.volume_mm3 == pytest.approx(counts[f.cmb_id] * scan_grid.voxel_volume, abs=0.01)
        # i, j, k is the native voxel holding the centroid
        centre = scan_grid.index_to_ras(np.array([f.i, f.j, f.k], float))
        assert np.all(np.abs(scan_grid.ras_to_index(np.array(f.ras)) - [f.i, f.j, f.k]) <= 0.5 + 1e-6), centre
        assert 0.5 < f.max_prob <= 1 and f.fold_agreement == 1.0 and f.status == "unreviewed"

    probability = sitk.ReadImage(str(out / "cmb_probability.nii.gz"))
    assert Geometry.of(probability).size == scan_grid.size
    assert sitk.GetArrayViewFromImage(probability).max() <= max(f.max_prob for f in table) + 1e-6

    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count('class="cmb"') == len(table) and html.count("data:image/png;base64,") == 3 * len(table)


def test_run_json_records_provenance(rich_run):
    scan, result = rich_run
    run = json.loads((result.output_dir / "run.json").read_text(encoding="utf-8"))
    assert run["input"]["sha256"] == checksum([scan])
    assert run["input"]["path"] == str(scan.resolve())
    tilt = np.degrees(np.arccos(np.abs(OBLIQUE).max(axis=0))).max()  # rotated axes vs anatomical axes
    assert run["input"]["geometry"]["obliquity_deg"] == pytest.approx(tilt, abs=1e-3) and tilt > 15
    assert run["model"]["name"] == "test-dark-blob" and len(run["model"]["folds"][0]["sha256"]) == 64
    assert run["inference"]["provider"] == cpu_provider() and run["inference"]["onnxruntime"]
    assert run["results"]["cmb_count"] == len(result.findings)
    assert set(run["timings_s"]) == {"read", "mask", "preprocess", "inference", "postprocess", "location", "write", "total"}
    assert run["settings"]["threshold"] == 0.5 and run["mask"]["source"] == "computed"
    assert run["software"]["version"] and run["started"] and run["finished"]
    assert run["model_box"]["shape"] == [80, 96, 80]


def test_run_json_is_read_through_its_record(rich_run, tmp_path):
    """run.json is written from RunRecord and read back whole; a renamed or a missing key fails where it is read."""
    _, result = rich_run
    path = result.output_dir / "run.json"
    record = RunRecord.read(path)
    assert record == result.run and record.to_json() == path.read_text(encoding="utf-8")
    assert list(json.loads(path.read_text(encoding="utf-8"))) == [
        "scan_id", "software", "input", "mask", "model", "settings", "inference", "model_box", "results", "fp_filter",
        "location", "warnings", "started", "timings_s", "finished"]
    assert record.provider == cpu_provider() and record.files[-1] == "run.json" and record.fingerprint is None
    data = json.loads(path.read_text(encoding="utf-8"))
    renamed = dict(data, provider=data["inference"])
    del renamed["inference"]
    with pytest.raises(RunRecordError, match="lacks inference; has unknown provider"):
        RunRecord.from_dict(renamed)
    broken = tmp_path / "run.json"
    broken.write_text(json.dumps({k: v for k, v in data.items() if k != "finished"}), encoding="utf-8")
    with pytest.raises(RunRecordError, match="lacks finished"):
        RunRecord.read(broken)
    assert read_if_valid(broken) is None and read_if_valid(tmp_path / "missing.json") is None


def test_count_is_the_same_in_model_and_native_space_on_thick_slices(tmp_path, model_dir):
    """Many small CMBs on 1x1x4 mm voxels: every CMB found in the model grid keeps a native voxel."""
    rng = np.random.default_rng(11)
    centres = rng.uniform([-22, -26, -18], [22, 26, 18], size=(25, 3))
    scene = phantoms.Scene(spheres=[phantoms.Sphere(tuple(c), 2.2) for c in centres])
    grid = phantoms.grid_around((0, 0, 0), SMALL_FOV, (1, 1, 4))
    path = phantoms.write(phantoms.render(scene, grid, seed=2), tmp_path / "thick.nii.gz")
    result = segment(path, tmp_path / "out", SegmentOptions(model=str(model_dir), report=False))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(result.output_dir / "cmb_labels.nii.gz")))
    assert result.run.results["cmb_count"] == len(result.findings) > 0
    assert np.unique(labels[labels > 0]).tolist() == list(range(1, len(result.findings) + 1))
    assert all(f.voxels >= 1 for f in result.findings)


def test_given_mask_limits_the_search(tmp_path, scene, iso_scan, model_dir):
    grid = Geometry.of(sitk.ReadImage(str(iso_scan)))
    ras = grid.index_to_ras(np.stack(np.indices(grid.size), -1).reshape(-1, 3))
    left_half = ((((ras - scene.brain_centre) / scene.brain_radii) ** 2).sum(1) <= 1) & (ras[:, 0] < 0)
    mask = phantoms.write(grid.with_image(left_half.reshape(grid.size).transpose(2, 1, 0).astype(np.uint8)),
                          tmp_path / "left_mask.nrrd")
    result = segment(iso_scan, tmp_path / "out", SegmentOptions(model=str(model_dir), mask=mask, report=False))
    planted_left = scene.centres[scene.centres[:, 0] < -3]
    found = np.array([f.ras for f in result.findings])
    assert len(found) == len(planted_left) and np.all(match(found, planted_left) < 1.0)
    assert result.run.mask["source"] == str(mask)


def test_threshold_override_is_used_and_recorded(tmp_path, iso_scan, model_dir):
    result = segment(iso_scan, tmp_path / "out", SegmentOptions(model=str(model_dir), threshold=0.95, report=False))
    assert result.run.settings["threshold"] == 0.95
    assert all(f.max_prob > 0.95 for f in result.findings)


def test_extent_threshold_gives_strict_detections_their_whole_extent(tmp_path, iso_scan, model_dir):
    strict = segment(iso_scan, tmp_path / "strict", SegmentOptions(model=str(model_dir), threshold=0.95, report=False))
    model = tmp_path / "hysteresis"
    shutil.copytree(model_dir, model)
    descriptor = json.loads((model / "model.json").read_text(encoding="utf-8"))
    descriptor.update(threshold=0.95, extent_threshold=0.3)
    (model / "model.json").write_text(json.dumps(descriptor), encoding="utf-8")
    whole = segment(iso_scan, tmp_path / "whole", SegmentOptions(model=str(model), report=False))
    assert whole.run.settings["extent_threshold"] == 0.3 and strict.run.settings["extent_threshold"] == 0.95
    assert len(whole.findings) == len(strict.findings) > 0  # the threshold alone decides what is a CMB
    assert np.all(match(np.array([f.ras for f in whole.findings]), np.array([f.ras for f in strict.findings])) < 1.0)
    assert all(w.voxels > s.voxels for w, s in zip(whole.findings, strict.findings))
    lower = segment(iso_scan, tmp_path / "lower", SegmentOptions(model=str(model), threshold=0.2, report=False))
    assert lower.run.settings["extent_threshold"] == 0.2  # a lower --threshold lowers the extent with it


def test_failure_while_writing_leaves_nothing(tmp_path, iso_scan, model_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pipeline, "write_report", broken)
    out = tmp_path / "new" / "results"
    with pytest.raises(RuntimeFailure, match="cannot write results: disk full"):
        segment(iso_scan, out, SegmentOptions(model=str(model_dir)))
    assert not (tmp_path / "new").exists()


def test_rerun_replaces_the_previous_result_whole(tmp_path, iso_scan, model_dir):
    out = tmp_path / "out"
    first = segment(iso_scan, out, SegmentOptions(model=str(model_dir), save_probability=True, report=False))
    assert (first.output_dir / "cmb_probability.nii.gz").exists()
    second = segment(iso_scan, out, SegmentOptions(model=str(model_dir), report=False))
    assert second.output_dir == first.output_dir
    assert set(files_under(out)) == {"iso", "iso/cmb_labels.nii.gz", "iso/cmb.seg.nrrd", "iso/findings.tsv",
                                     "iso/run.json"}


def test_bad_input_writes_nothing(tmp_path, model_dir):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"nope")
    with pytest.raises(InputError):
        segment(bad, tmp_path / "out", SegmentOptions(model=str(model_dir)))
    assert not (tmp_path / "out").exists()


def test_scan_id_option_names_the_folder(tmp_path, iso_scan, model_dir):
    result = segment(iso_scan, tmp_path, SegmentOptions(model=str(model_dir), scan_id="sub-07", report=False))
    assert result.output_dir == tmp_path / "sub-07" and result.run.scan_id == "sub-07"


def test_result_killed_mid_swap_is_restored_by_the_next_run(tmp_path, iso_scan, model_dir):
    """A run killed between moving the old result aside and renaming the new one loses nothing."""
    first = segment(iso_scan, tmp_path, SegmentOptions(model=str(model_dir), report=False))
    dead_pid = 2 ** 22 + 12345  # above the default pid_max: no such process
    host = "".join(c for c in socket.gethostname() if c.isalnum())
    aside = tmp_path / f".iso.old-{host}-{dead_pid}-0000"
    first.output_dir.rename(aside)
    (tmp_path / f".iso.partial-{host}-{dead_pid}-0000").mkdir()
    with pytest.raises(RuntimeError):
        with staged_directory(tmp_path / "iso"):
            raise RuntimeError("fails before the swap")
    assert (tmp_path / "iso" / "findings.tsv").is_file()
    assert files_under(tmp_path) == ["iso", "iso/cmb.seg.nrrd", "iso/cmb_labels.nii.gz", "iso/findings.tsv",
                                     "iso/run.json"]
