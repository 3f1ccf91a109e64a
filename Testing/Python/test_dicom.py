"""DICOM results: a DICOM phantom series through `segment` gives cmb.seg.dcm and cmb.sr.dcm that dciodvfy accepts,
whose SEG is exactly cmb_labels on the native grid and whose SR holds the values of findings.tsv; --dicom-source for a
converted scan; refusals; the comparison's report."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

import pair_phantoms
import phantoms
from dicom_objects import dciodvfy_errors, seg_cmb_labels, sr_comment, sr_groups
from helpers import SMALL_BOX, SMALL_FOV, files_under, run_cli
from SHIVACMBLib import dicomcodes
from SHIVACMBLib.dicomout import NOT_FOR_READS, SERIES_NUMBERS
from SHIVACMBLib.dicomseries import read_series, series_files
from SHIVACMBLib.errors import InputError
from SHIVACMBLib.findings import read_tsv, to_text_rows
from SHIVACMBLib.geometry import Geometry
from SHIVACMBLib.location import count_locations
from SHIVACMBLib.longitudinal import CompareOptions, compare
from SHIVACMBLib.mars import AREAS, SIDES, SUBREGIONS
from SHIVACMBLib.modelstore import blobmodel
from SHIVACMBLib.pipeline import SegmentOptions, segment

OBLIQUE = phantoms.rotation((0, 1, 0), 15)


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """A two-fold detector that declares itself a demonstration model."""
    return blobmodel.write_model(tmp_path_factory.mktemp("model") / "demo-blob", name="demo-blob", shape=SMALL_BOX,
                                 folds=2, description=f"A dark-blob detector for the tests: {NOT_FOR_READS}.")


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory, scene, demo_model):
    """The default scene as an oblique 0.9x0.9x2 mm DICOM series, segmented."""
    folder = tmp_path_factory.mktemp("dicom")
    grid = phantoms.grid_around((1.3, -2.1, 0.7), SMALL_FOV, (0.9, 0.9, 2.0), OBLIQUE)
    series = phantoms.write_dicom_series(phantoms.render(scene, grid, seed=1), folder / "swi")
    result = segment(series, folder / "out", SegmentOptions(model=str(demo_model), report=False))
    return series, result


def source(series_folder, labels_file):
    return read_series(series_files(series_folder), series_folder, Geometry.of(sitk.ReadImage(str(labels_file))))


def test_a_dicom_scan_gets_a_seg_and_an_sr_that_dciodvfy_accepts(dicom_run):
    series, result = dicom_run
    out = result.output_dir
    assert result.files == ["cmb_labels.nii.gz", "cmb.seg.nrrd", "findings.tsv", "cmb.seg.dcm", "cmb.sr.dcm",
                            "run.json"]
    for name in ("cmb.seg.dcm", "cmb.sr.dcm"):
        assert dciodvfy_errors(out / name) == [], name
    record = result.run.results["dicom"]
    assert record["source"]["series_instance_uid"] == "1.2.826.0.1.3680043.2.1125.1"
    assert set(record["objects"]) == {"cmb.seg.dcm", "cmb.sr.dcm"}


def test_the_seg_read_back_is_cmb_labels_on_the_native_grid(dicom_run):
    import pydicom

    series_folder, result = dicom_run
    out = result.output_dir
    series = source(series_folder, out / "cmb_labels.nii.gz")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "cmb_labels.nii.gz")))
    assert labels.max() == len(result.findings) == 6
    assert np.array_equal(seg_cmb_labels(out / "cmb.seg.dcm", series), series.frames(labels))

    seg, first = pydicom.dcmread(str(out / "cmb.seg.dcm")), series.first
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "FrameOfReferenceUID", "AccessionNumber"):
        assert seg.get(keyword) == first.get(keyword), keyword
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID and seg.SeriesNumber == SERIES_NUMBERS["seg"]
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence} == \
        {ds.SOPInstanceUID for ds in series.datasets}
    category, kind = dicomcodes.cmb_category_and_type()
    for n, segment_item in enumerate(seg.SegmentSequence, start=1):
        assert (segment_item.SegmentNumber, segment_item.SegmentLabel) == (n, f"CMB {n}")
        assert segment_item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == category.value == "49755003"
        assert segment_item.SegmentedPropertyTypeCodeSequence[0].CodeValue == kind.value == "50960005"
        assert segment_item.SegmentAlgorithmType == "AUTOMATIC"
        assert segment_item.SegmentDescription == "cerebral microbleed"
        algorithm = segment_item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("demo-blob", "1.0")
    assert "demonstration model" in seg.SeriesDescription and NOT_FOR_READS in seg.ImageComments


def test_the_sr_holds_the_values_of_findings_tsv(dicom_run):
    import pydicom

    series_folder, result = dicom_run
    out = result.output_dir
    findings = read_tsv(out / "findings.tsv")
    rows = to_text_rows(findings)
    groups = sr_groups(out / "cmb.sr.dcm")
    seg = pydicom.dcmread(str(out / "cmb.seg.dcm"))
    sr = pydicom.dcmread(str(out / "cmb.sr.dcm"))
    assert set(groups) == {f"CMB {f.cmb_id}" for f in findings} | {"Scan summary"}
    for finding, row in zip(findings, rows):
        group = groups[f"CMB {finding.cmb_id}"]
        assert group["template"] == "1411" and group["segment"] == (seg.SOPInstanceUID, finding.cmb_id)
        numbers = {(n, d): v for n, d, v, _ in group["numbers"]}
        assert numbers == {("Volume", None): float(row["volume_mm3"]),
                           ("Probability", "Maximum"): float(row["max_prob"]),
                           ("Probability", "Mean"): float(row["mean_prob"]),
                           ("Fraction of model folds detecting the CMB", None): float(row["fold_agreement"])}
        r, a, s = (-group["point"][0], -group["point"][1], group["point"][2])  # LPS -> RAS
        assert [round(v, 2) for v in (r, a, s)] == [float(row[c]) for c in "ras"]
        assert group["frame_of_reference"] == seg.FrameOfReferenceUID
        assert group["codes"]["Finding"] == "50960005" and "Review status" not in group["codes"]
        region = dicomcodes.region(finding.region)
        assert group["sites"] == ([] if region is None else [(region.value, group["sites"][0][1])])
    summary = groups["Scan summary"]
    counts = count_locations(findings)
    by_site = {site[0]: v for n, _, v, site in summary["numbers"]}
    assert by_site[("12738006", None)] == len(findings)
    for area in AREAS:
        for side in SIDES:
            where = (dicomcodes.AREA_CODES[area][0], dicomcodes.standard("median" if side == "midline" else side).value)
            assert by_site[where] == counts["by_area_side"][area][side]
    assert summary["codes"]["Boston criteria CMB distribution"] == dicomcodes.BOSTON_CODES[counts["boston"]][0]
    assert NOT_FOR_READS in sr_comment(out / "cmb.sr.dcm") and "demonstration model" in sr.SeriesDescription
    assert sr.VerificationFlag == "UNVERIFIED" and sr.PatientID == seg.PatientID == "PHANTOM"
    evidence = {i.ReferencedSOPInstanceUID  # highdicom 0.22 (Python 3.9) lists the images as other evidence
                for key in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence")
                for s in sr.get(key, []) for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence and len(evidence) == len(series_files(series_folder)) + 1
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == dicomcodes.PRIVATE


def test_standard_codes_are_those_of_the_dicom_standard():
    from pydicom.sr._concepts_dict import concepts  # pydicom's copy of PS3.16: scheme -> keyword -> value -> meaning

    named = {"brain": "Brain", "frontal": "FrontalLobe", "parietal": "ParietalLobe", "temporal": "TemporalLobe",
             "occipital": "OccipitalLobe", "insula": "Insula", "thalamus": "Thalamus",
             "internal_capsule": "InternalCapsule", "external_capsule": "ExternalCapsule",
             "corpus_callosum": "CorpusCallosum", "brainstem": "BrainStem", "cerebellum": "Cerebellum",
             "left": "Left", "right": "Right", "median": "Median", "volume": "Volume", "probability": "Probability",
             "maximum": "Maximum", "mean": "Mean", "number_of_lesions": "NumberOfLesions",
             "cubic_millimeter": "CubicMillimeter", "no_units": "NoUnits", "brain_mri": "BrainMRI",
             "comment": "Comment", "center_of_mass": "CenterOfMass",
             "artificial_intelligence": "ArtificialIntelligence", "device": "Device", "person": "Person"}
    assert set(named) == set(dicomcodes.STANDARD)
    for key, keyword in named.items():
        value, scheme, meaning = dicomcodes.STANDARD[key]
        assert concepts[scheme][keyword][value][0].lower() == meaning.lower(), key  # editions differ in case
    assert all(dicomcodes.region(name) is not None for name, _ in SUBREGIONS)
    assert dicomcodes.region("unknown") is None and dicomcodes.region("n/a") is None


@pytest.mark.parametrize("case", ["permuted", "flipped-rows", "reversed-slices"])
def test_the_series_frames_follow_a_scan_stored_in_another_axis_order(tmp_path, case):
    """dcm2niix and others store the series' voxels in another order: the frames come out the same."""
    grid = phantoms.grid_around((0, 0, 0), (20, 24, 12), (1.0, 1.2, 2.0), OBLIQUE)
    labels = grid.with_image(np.random.default_rng(3).integers(0, 5, grid.array_shape).astype(np.uint8))
    folder = phantoms.write_dicom_series(labels, tmp_path / "series")
    stored = {"permuted": lambda im: sitk.PermuteAxes(im, [2, 0, 1]),
              "flipped-rows": lambda im: sitk.Flip(im, [False, True, False]),
              "reversed-slices": lambda im: sitk.Flip(im, [False, False, True])}[case](labels)
    series = read_series(series_files(folder), folder, Geometry.of(stored))
    assert np.array_equal(series.frames(sitk.GetArrayFromImage(stored)), sitk.GetArrayFromImage(labels))


def test_dicom_source_gives_a_converted_scan_its_dicom_results(tmp_path, scene, demo_model):
    """A NIfTI stored as dcm2niix stores it (rows reversed) with --dicom-source: same SEG on the series' frames."""
    grid = phantoms.grid_around((1.3, -2.1, 0.7), SMALL_FOV, (0.9, 0.9, 2.0), OBLIQUE)
    image = phantoms.render(scene, grid, seed=2)
    folder = phantoms.write_dicom_series(image, tmp_path / "series")
    nifti = phantoms.write(sitk.Flip(image, [False, True, False]), tmp_path / "converted.nii.gz")
    done = run_cli(["segment", nifti, "--out", tmp_path / "out", "--model", demo_model, "--dicom-source", folder,
                    "--no-report", "--no-location", "--progress", "none"])
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out" / "converted"
    assert {"cmb.seg.dcm", "cmb.sr.dcm"} <= set(files_under(out))
    assert all(dciodvfy_errors(out / name) == [] for name in ("cmb.seg.dcm", "cmb.sr.dcm"))
    series = source(folder, out / "cmb_labels.nii.gz")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "cmb_labels.nii.gz")))
    assert labels.max() == 6 and np.array_equal(seg_cmb_labels(out / "cmb.seg.dcm", series), series.frames(labels))
    run = json.loads((out / "run.json").read_text())
    assert run["results"]["dicom"]["source"]["folder"] == str(folder.resolve())


@pytest.mark.parametrize("case", ["shifted", "other-spacing", "no-series", "with-no-dicom", "dicom-scan"])
def test_a_dicom_source_that_cannot_serve_is_refused_in_one_line(tmp_path, scene, demo_model, case):
    grid = phantoms.grid_around((1.3, -2.1, 0.7), SMALL_FOV, (0.9, 0.9, 2.0), OBLIQUE)
    image = phantoms.render(scene, grid, seed=2)
    folder = phantoms.write_dicom_series(image, tmp_path / "series")
    scan, extra, problem = phantoms.write(image, tmp_path / "scan.nii.gz"), [], "does not lie on the scan's grid"
    if case == "shifted":
        image.SetOrigin(tuple(np.add(image.GetOrigin(), (0.3, 0.0, 0.0))))
        phantoms.write(image, scan)
    elif case == "other-spacing":
        phantoms.write(sitk.Resample(image, [s * 2 for s in image.GetSize()], sitk.Transform(), sitk.sitkLinear,
                                     image.GetOrigin(), [s / 2 for s in image.GetSpacing()], image.GetDirection()),
                       scan)
    elif case == "no-series":
        folder = tmp_path / "empty"
        folder.mkdir()
        (folder / "notes.txt").write_text("not DICOM")
        problem = "holds no DICOM images"
    elif case == "with-no-dicom":
        extra, problem = ["--no-dicom"], "give one of them"
    else:
        scan, problem = folder, "the scan is a DICOM series itself"
    done = run_cli(["segment", scan, "--out", tmp_path / "out", "--model", demo_model, "--dicom-source", folder,
                    "--progress", "none", *extra])
    assert done.returncode == InputError.exit_code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(folder) in lines[0] and problem in lines[0], lines
    assert files_under(tmp_path / "out") == []


def test_a_single_cmb_is_one_segment_its_report_references(tmp_path, demo_model):
    grid = phantoms.grid_around((0, 0, 0), SMALL_FOV, (1.0, 1.0, 2.0))
    scene = phantoms.Scene(spheres=[phantoms.Sphere((5.0, 8.0, 4.0), 3.0)])
    folder = phantoms.write_dicom_series(phantoms.render(scene, grid, seed=6), tmp_path / "one")
    result = segment(folder, tmp_path / "out", SegmentOptions(model=str(demo_model), report=False, location=False))
    out = result.output_dir
    assert len(result.findings) == 1 and all(dciodvfy_errors(out / n) == [] for n in ("cmb.seg.dcm", "cmb.sr.dcm"))
    series = source(folder, out / "cmb_labels.nii.gz")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "cmb_labels.nii.gz")))
    assert np.array_equal(seg_cmb_labels(out / "cmb.seg.dcm", series), series.frames(labels))
    assert sr_groups(out / "cmb.sr.dcm")["CMB 1"]["segment"][1] == 1


def test_dicom_source_reaches_segment_batch_and_compare(tmp_path, model_dir, monkeypatch):
    from SHIVACMBLib import cli, longitudinal, pipeline
    from SHIVACMBLib.cohort import batch

    seen = {}
    monkeypatch.setattr(pipeline, "segment", lambda scan, out, options, progress=None: seen.setdefault("s", options))
    monkeypatch.setattr(longitudinal, "compare", lambda b, f, o, options, progress=None: seen.setdefault("c", options))
    cli.main(["segment", "scan.nii.gz", "--dicom-source", "dcm", "--no-dicom", "--progress", "none"])
    assert (seen["s"].dicom_source, seen["s"].dicom) == ("dcm", False)
    cli.main(["compare", "a.nii.gz", "b.nii.gz", "--out", "o", "--followup-dicom-source", "f", "--progress", "none"])
    assert (seen["c"].baseline_dicom_source, seen["c"].followup_dicom_source, seen["c"].detection.dicom) == (
        None, "f", True)
    image = tmp_path / "scan.nii.gz"
    image.write_bytes(b"checksummed only")
    (tmp_path / "dcm").mkdir()
    (tmp_path / "dcm" / "1.dcm").write_bytes(b"one")
    model = batch.load_model(str(model_dir))
    with_source = batch.fingerprint(batch.Job("s", image, dicom_source=tmp_path / "dcm"), model, batch.BatchSettings())
    without = batch.fingerprint(batch.Job("s", image), model, batch.BatchSettings())
    assert with_source["inputs"]["dicom_source"] and without["inputs"]["dicom_source"] is None
    (tmp_path / "dcm" / "1.dcm").write_bytes(b"changed")  # another series: the result is made again
    assert batch.fingerprint(batch.Job("s", image, dicom_source=tmp_path / "dcm"), model,
                             batch.BatchSettings())["inputs"] != with_source["inputs"]
    assert batch.fingerprint(batch.Job("s", image), model, batch.BatchSettings(dicom=False)) != without


def test_no_dicom_leaves_them_out_and_a_scan_without_cmbs_gets_a_report_only(tmp_path, demo_model):
    grid = phantoms.grid_around((0, 0, 0), SMALL_FOV, (1.0, 1.0, 2.0))
    folder = phantoms.write_dicom_series(phantoms.render(phantoms.Scene(), grid, seed=5), tmp_path / "clean")
    result = segment(folder, tmp_path / "out", SegmentOptions(model=str(demo_model), report=False, location=False))
    assert result.findings == [] and "cmb.seg.dcm" not in result.files and "cmb.sr.dcm" in result.files
    assert dciodvfy_errors(result.output_dir / "cmb.sr.dcm") == []
    groups = sr_groups(result.output_dir / "cmb.sr.dcm")
    assert list(groups) == ["Scan summary"] and all(v == 0 for _, _, v, _ in groups["Scan summary"]["numbers"])
    assert groups["Scan summary"]["codes"]["Boston criteria CMB distribution"] == "NONE"
    off = segment(folder, tmp_path / "off", SegmentOptions(model=str(demo_model), report=False, dicom=False))
    assert not [name for name in off.files if name.endswith(".dcm")] and off.run.results["dicom"] is None


def test_the_comparison_report_gives_each_cmb_its_status_and_the_grade(tmp_path, model_dir):
    pair = pair_phantoms.make_pair(21, n_baseline=4, n_removed=1, n_new=2, followup_spacing=(1.0, 1.0, 2.0),
                                   followup_orientation="LPS", oblique_deg=0.0, cmb_radius=(2.2, 3.0))
    baseline = phantoms.write_dicom_series(pair.baseline, tmp_path / "baseline", "1.2.826.0.1.3680043.2.1125.7")
    followup = phantoms.write_dicom_series(pair.followup, tmp_path / "followup", "1.2.826.0.1.3680043.2.1125.8")
    detection = SegmentOptions(model=str(model_dir), location=False, report=False)
    result = compare(baseline, followup, tmp_path / "cmp", CompareOptions(detection=detection, report=False))
    out = tmp_path / "cmp"
    assert {"comparison.sr.dcm", "followup/cmb.seg.dcm", "baseline/cmb.sr.dcm"} <= set(files_under(out))
    assert "comparison.sr.dcm" in result.files and dciodvfy_errors(out / "comparison.sr.dcm") == []
    import pydicom

    report, seg = pydicom.dcmread(str(out / "comparison.sr.dcm")), pydicom.dcmread(str(out / "followup/cmb.seg.dcm"))
    assert report.StudyInstanceUID == "1.2.826.0.1.3680043.2.1125.8.0" and report.SeriesNumber == 9903
    groups = sr_groups(out / "comparison.sr.dcm")
    status_codes = {code: status for status, (code, _) in dicomcodes.FOLLOWUP_CODES.items()}
    found = sorted(status_codes[g["codes"]["Status at follow-up"]] for label, g in groups.items() if label.startswith(
        ("CMB", "baseline CMB")))
    assert found == sorted(m.status for m in result.rows)
    for m in result.rows:
        if m.followup is not None:
            assert groups[f"CMB {m.followup.cmb_id}"]["segment"] == (seg.SOPInstanceUID, m.followup.cmb_id)
        else:
            point = groups[f"baseline CMB {m.baseline.cmb_id}"]["point"]
            assert np.allclose([-point[0], -point[1], point[2]], m.followup_ras, atol=0.01)
    summary = groups["Scan summary"]
    assert summary["numbers"][0][2] == result.summary["aria_h"]["new_microhemorrhages"] == 2
    assert summary["codes"]["ARIA-H microhemorrhage severity"] == "ARIA-H-MILD"
