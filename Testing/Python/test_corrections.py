"""Manual corrections (SHIVACMBLib.slicerside.corrections): label maps exported from Slicer to corrected findings,
review edits from the table, and the saved folder (cmb.seg.nrrd, findings.tsv, corrections.json)."""

import datetime as dt
import json
import math
from dataclasses import replace

import numpy as np
import pytest

import phantoms
from helpers import files_under
from SHIVACMBLib.slicerside import corrections
from SHIVACMBLib import pipeline
from SHIVACMBLib.slicerside.corrections import DELETED, EDITED, RunState, SegmentRecord, apply_review_edits, correct
from SHIVACMBLib.findings import Finding, read_tsv, write_tsv
from SHIVACMBLib.segfile import ID_TAG, STATUS_TAG, read_seg_nrrd
from SHIVACMBLib.slicerside.slicerbridge import TABLE_COLUMNS, finding_row

# An oblique, anisotropic grid: measurements must hold in physical space, not voxel space.
GRID = phantoms.grid_around((4.0, -7.0, 12.0), (40, 44, 30), (0.8, 0.9, 2.5), phantoms.rotation((1, 2, 0), 20))


def mean_ras(mask):
    """Mean of the voxel centres of a [k, j, i] mask in RAS (computed independently of the module)."""
    kji = np.argwhere(mask).astype(float)
    return GRID.index_to_ras(kji[:, ::-1]).mean(axis=0)


def run_scene(tmp_path):
    """A run with three CMBs written as the pipeline writes them; its state as the module keeps it."""
    labels = np.zeros(GRID.array_shape, np.uint8)
    labels[3:5, 10:13, 8:11] = 1
    labels[6, 20, 30:33] = 2
    labels[9:11, 30:32, 20:22] = 3
    found = []
    places = {1: ("frontal", "lobar", "left"), 2: ("thalamus", "deep", "right"),
              3: ("cerebellum", "infratentorial", "right")}
    for cmb_id in (1, 2, 3):
        mask = labels == cmb_id
        centre = mean_ras(mask) + 0.1  # the run's centroids are probability-weighted: not the plain mean
        ijk = np.rint(GRID.ras_to_index(centre)).astype(int)
        region, area, side = places[cmb_id]
        found.append(Finding(cmb_id, *centre, *ijk, mask.sum() * GRID.voxel_volume, int(mask.sum()),
                             0.9 - cmb_id / 10, 0.7, 1.0, region=region, mars_area=area, side=side))
    folder = tmp_path / "run"
    folder.mkdir()
    write_tsv(found, folder / "findings.tsv")
    (folder / "run.json").write_text(json.dumps({"model": {"name": "blob", "version": "1"},
                                                 "started": "2024-01-01T00:00:00+00:00"}, indent=2) + "\n")
    segments = [SegmentRecord(f"CMB_{i}", i, i, f"CMB {i}") for i in (1, 2, 3)]
    state = RunState.from_files(folder / "findings.tsv", folder / "run.json",
                                corrections.fingerprints_by_cmb(corrections.voxel_fingerprints(labels), segments))
    return labels, segments, state


# --- pieces -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [("3", 3), (" 12 ", 12), ("0", None), ("-1", None), ("x", None),
                                            ("", None), (None, None)])
def test_tag_cmb_id(text, expected):
    assert corrections.tag_cmb_id(text) == expected


def test_measure_labels_in_physical_space():
    labels = np.zeros(GRID.array_shape, np.int16)
    labels[2:4, 5:9, 1:4] = 7
    labels[10, 11, 12] = 2
    measured = corrections.measure_labels(labels, GRID)
    assert sorted(measured) == [2, 7]
    seven = measured[7]
    assert seven.voxels == 24 and seven.volume_mm3 == pytest.approx(24 * 0.8 * 0.9 * 2.5)
    assert np.allclose(seven.ras, mean_ras(labels == 7))
    assert seven.ijk == (2, 6, 2)  # mean index (2, 6.5, 2.5) rounded half to even, as postprocess does
    assert measured[2].ijk == (12, 11, 10) and np.allclose(measured[2].ras, GRID.index_to_ras(np.array([12, 11, 10])))
    assert corrections.measure_labels(np.zeros(GRID.array_shape, np.int16), GRID) == {}
    with pytest.raises(ValueError, match="does not match"):
        corrections.measure_labels(labels[1:], GRID)


def test_fingerprints_change_with_any_voxel_and_only_then():
    labels = np.zeros((5, 6, 7), np.int16)
    labels[1, 2, 3:5] = 1
    labels[3, 3, 3] = 4
    before = corrections.voxel_fingerprints(labels)
    assert sorted(before) == [1, 4]
    moved = labels.copy()
    moved[1, 2, 3], moved[1, 2, 5] = 0, 1  # same count, same row, other voxel
    after = corrections.voxel_fingerprints(moved)
    assert after[1] != before[1] and after[4] == before[4]
    relabelled = np.where(labels == 4, 9, labels)
    assert corrections.voxel_fingerprints(relabelled)[9] == before[4]


def test_one_segments_bounding_box_gives_what_the_whole_label_map_gives():
    """A segment added or deleted is measured from its own bounding box (the Slicer module's edits): same
    measurement and fingerprint as from a label map of the whole grid, voxels outside the grid left out."""
    labels = np.zeros(GRID.array_shape, np.int16)
    labels[2:4, 5:9, 1:4] = 7
    labels[10, 11, 12] = 7
    labels[0, 0, 0] = 3
    whole = corrections.label_voxels(labels, GRID)
    box = labels[2:11, 5:12, 1:13] == 7
    assert corrections.box_voxels(box, (2, 5, 1), GRID) == whole[7]
    padded = np.pad(box, 2)  # a box reaching beyond the grid's first voxel on every axis
    assert corrections.box_voxels(padded, (0, 3, -1), GRID) == whole[7]
    assert corrections.box_voxels(np.zeros((2, 2, 2), bool), (1, 1, 1), GRID) is None
    assert corrections.box_voxels(np.ones((1, 1, 1), bool), (-1, 0, 0), GRID) is None  # outside the grid only


def test_cmb_label_map():
    labels = np.array([[[0, 1, 2, 3]]], np.int16)
    assert corrections.cmb_label_map(labels, {1: 5, 3: 2}).tolist() == [[[0, 5, 0, 2]]]
    assert corrections.cmb_label_map(labels, {1: 5}).dtype == np.uint8
    assert corrections.cmb_label_map(labels, {1: 300}).dtype == np.uint16


def test_run_state_survives_json_without_tabs_or_newlines(tmp_path):
    _, _, state = run_scene(tmp_path)
    text = state.to_json()
    assert "\t" not in text and "\n" not in text  # MRML attributes keep neither
    back = RunState.from_json(text)
    assert back == state
    assert back.record["model"]["name"] == "blob"
    assert back.findings_sha256 == corrections.checksum([tmp_path / "run" / "findings.tsv"])
    with pytest.raises(ValueError, match="run state"):
        RunState.from_json("{}")
    with pytest.raises(ValueError, match="run state"):
        RunState.from_json("not json")


def test_findings_json_round_trip():
    findings = [Finding(1, 1.5, 2.0, 3.0, 1, 2, 3, 4.0, 5, 0.9, float("nan"), None, note="a\tb")]
    text = corrections.findings_to_json(findings)
    assert "\t" not in text and "NaN" not in text
    back = corrections.findings_from_json(text)
    assert back[0].mean_prob is None and back[0].note == "a\tb" and back[0].max_prob == 0.9
    with pytest.raises(ValueError):
        corrections.findings_from_json('[{"cmb_id": 1}]')


# --- correcting -------------------------------------------------------------------------------


def test_no_edit_keeps_every_finding_of_the_run(tmp_path):
    labels, segments, state = run_scene(tmp_path)
    result = correct(state, state.findings, segments, labels, GRID)
    assert result.findings == list(state.findings)
    assert result.new_tags == {} and result.label_to_cmb == {1: 1, 2: 2, 3: 3}
    assert corrections.list_changes(state.findings, result.findings) == []


def test_deleted_edited_and_added_segments(tmp_path):
    labels, segments, state = run_scene(tmp_path)
    exported = labels.astype(np.int16)
    exported[exported == 2] = 0  # segment 2 deleted, two added (one still empty): as Slicer exports them,
    exported[exported == 3] = 2  # label n is the n-th segment
    segments = [segments[0], replace(segments[2], label=2), SegmentRecord("Segment_1", 3, None, "Segment_1"),
                SegmentRecord("Segment_2", 4, None, "Segment_2")]
    exported[9:11, 30:32, 22] = 2  # CMB 3 painted larger
    exported[7:9, 40:42, 40:42] = 3  # a missed CMB
    result = correct(state, state.findings, segments, exported, GRID)

    one, two, three, four = result.findings
    assert one == state.findings[0]
    assert (two.cmb_id, two.status, two.note) == (2, "rejected", DELETED)
    assert (two.volume_mm3, two.max_prob) == (state.findings[1].volume_mm3, state.findings[1].max_prob)
    assert three.note == EDITED and three.status == "unreviewed"
    assert three.voxels == 12 and three.volume_mm3 == pytest.approx(12 * GRID.voxel_volume)
    assert np.allclose(three.ras, mean_ras(exported == 2), atol=0.005)
    assert three.max_prob == state.findings[2].max_prob and three.fold_agreement == 1.0  # kept from the run
    assert (four.cmb_id, four.status, four.max_prob, four.mean_prob, four.fold_agreement) == (4, "added", None, None,
                                                                                              None)
    assert four.voxels == 8 and np.allclose(four.ras, mean_ras(exported == 3), atol=0.005)
    assert result.new_tags == {"Segment_1": 4}  # the empty segment gets no id until it is painted
    assert result.label_to_cmb == {1: 1, 2: 3, 3: 4}
    assert result.segment_cmb_ids == {"CMB_1": 1, "CMB_3": 3, "Segment_1": 4}

    changes = corrections.list_changes(state.findings, result.findings)
    assert [(c["change"], c["cmb_id"]) for c in changes] == [("rejected", 2), ("edited", 3), ("added", 4)]
    assert changes[0]["reason"] == "segment deleted" and changes[0]["volume_mm3"]["after"] == 0.0
    assert changes[1]["voxels"] == {"before": 8, "after": 12}
    assert corrections.summarize(state.findings, result.findings) == {
        "found_by_run": 3, "added": 1, "rejected": 1, "edited": 1, "status_changed": 0, "cmb_count": 3}
    assert corrections.summary_text(corrections.summarize(state.findings, result.findings)) == (
        "3 microbleeds (3 found by the run, 1 edited, 1 added, 1 rejected).")

    # The next update sees the added segment by its tag: same id, and the reader's status is kept.
    tagged = [s if s.segment_id != "Segment_1" else replace(s, cmb_id=4) for s in segments]
    shown = [replace(f, status="definite") if f.cmb_id == 4 else f for f in result.findings]
    again = correct(state, shown, tagged, exported, GRID)
    assert again.new_tags == {} and again.findings[3].status == "definite" and again.findings[3].cmb_id == 4


def test_undo_restores_the_run_values(tmp_path):
    labels, segments, state = run_scene(tmp_path)
    painted = labels.copy()
    painted[3, 10, 7] = 1
    edited = correct(state, [replace(f, status="possible") if f.cmb_id == 1 else f for f in state.findings],
                     segments, painted, GRID)
    assert edited.findings[0].note == EDITED and edited.findings[0].status == "possible"
    undone = correct(state, edited.findings, segments, labels, GRID)
    assert undone.findings[0] == replace(state.findings[0], status="possible")

    deleted = correct(state, state.findings, segments[1:], labels, GRID)
    assert deleted.findings[0].status == "rejected"
    restored = correct(state, deleted.findings, segments, labels, GRID)
    assert restored.findings == list(state.findings)


def test_emptied_segment_is_rejected_and_duplicate_tags_become_new_cmbs(tmp_path):
    labels, segments, state = run_scene(tmp_path)
    exported = labels.copy()
    exported[exported == 1] = 0  # CMB 1 erased: its segment is still there, empty
    exported[0, 0, 0:2] = 4  # a copy of segment 3 with its tag, painted elsewhere
    copy = SegmentRecord("CMB_3_copy", 4, 3, "CMB 3 copy")
    result = correct(state, state.findings, segments + [copy], exported, GRID)
    assert result.findings[0].status == "rejected" and result.findings[0].note == DELETED
    assert result.findings[2] == state.findings[2]
    assert result.new_tags == {"CMB_3_copy": 4} and result.findings[3].voxels == 2
    assert corrections.segment_for_cmb(segments + [copy], 3) == "CMB_3"
    assert corrections.segment_for_cmb(segments, 9) is None


def test_unknown_tag_is_a_new_cmb(tmp_path):
    """A segment copied from another result keeps a tag this run does not know: it is added, not matched."""
    labels, segments, state = run_scene(tmp_path)
    exported = labels.copy()
    exported[0, 0, 0] = 4
    result = correct(state, state.findings, segments + [SegmentRecord("other", 4, 17)], exported, GRID)
    assert result.new_tags == {"other": 4} and result.findings[-1].cmb_id == 4


# --- review edits in the table ----------------------------------------------------------------


def table_rows(findings):
    names = [column.name for column in TABLE_COLUMNS]
    return [dict(zip(names, finding_row(f))) for f in findings]


@pytest.mark.parametrize("text, expected", [("definite", "definite"), ("D", "definite"), (" Poss ", "possible"),
                                            ("r", "rejected"), ("", None), ("maybe", None), ("a", "added")])
def test_parse_status(text, expected):
    assert corrections.parse_status(text) == expected
    assert corrections.parse_status("u", corrections.ADDED_STATUSES) is None


def test_review_edits_take_status_rater_and_note(tmp_path):
    _, _, state = run_scene(tmp_path)
    findings = list(state.findings) + [Finding(4, 0, 0, 0, 1, 1, 1, 1.0, 1, status="added")]
    rows = table_rows(findings)
    rows[0]["status"] = "definite"
    rows[1].update(rater="  Dr  Who ", note="near a vessel")
    rows[3]["status"] = "possible"
    edit = apply_review_edits(findings, rows, state.ids)
    assert [f.status for f in edit.findings] == ["definite", "unreviewed", "unreviewed", "possible"]
    assert (edit.findings[1].rater, edit.findings[1].note) == ("Dr Who", "near a vessel")
    assert edit.problems == [] and edit.restore  # the rater cell is shown tidied

    rows = table_rows(edit.findings)
    rows[0]["status"] = "p"
    short = apply_review_edits(edit.findings, rows, state.ids)
    assert short.findings[0].status == "possible" and short.restore and short.problems == []
    assert not apply_review_edits(short.findings, table_rows(short.findings), state.ids).restore


def test_review_edits_refuse_what_is_not_allowed(tmp_path):
    _, _, state = run_scene(tmp_path)
    deleted = replace(state.findings[1], status="rejected", note=DELETED)
    findings = [state.findings[0], deleted, state.findings[2], Finding(4, 0, 0, 0, 1, 1, 1, 1.0, 1, status="added")]
    rows = table_rows(findings)
    rows[0]["volume_mm3"] = 99.0
    rows[1]["status"] = "definite"
    rows[2]["status"] = "added"
    rows[3]["status"] = "unreviewed"
    edit = apply_review_edits(findings, rows, state.ids)
    assert edit.restore and edit.findings == findings
    assert len(edit.problems) == 4
    assert "only the status, rater and note" in edit.problems[0]
    assert "stays rejected" in edit.problems[1]
    assert "'added' is not a status" in edit.problems[2]
    assert "'unreviewed' is not a status" in edit.problems[3]
    fewer = apply_review_edits(findings, rows[:2], state.ids)
    assert fewer.restore and fewer.findings == findings and "Segment Editor" in fewer.problems[0]


def test_unknown_numbers_compare_equal():
    finding = Finding(1, 0, 0, 0, 1, 1, 1, 1.0, 1, status="added")
    rows = table_rows([finding])
    assert math.isnan(rows[0]["max_prob"])
    assert not apply_review_edits([finding], rows, []).restore


# --- saving -----------------------------------------------------------------------------------

WHEN = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc)


def corrected_scene(tmp_path):
    labels, segments, state = run_scene(tmp_path)
    exported = labels.astype(np.int16)
    exported[exported == 2] = 0
    exported[7:9, 40:42, 40:42] = 4
    segments = [segments[0], SegmentRecord("CMB_2", 2, 2), segments[2], SegmentRecord("Segment_1", 4)]
    shown = [replace(f, status="definite") if f.cmb_id == 1 else f for f in state.findings]
    return exported, state, correct(state, shown, segments, exported, GRID)


def test_save_writes_the_corrected_folder(tmp_path):
    exported, state, result = corrected_scene(tmp_path)
    out = tmp_path / "out" / "scan"
    saved = corrections.save(out, exported, GRID, state, result, "reader1", scan={"name": "SWI", "file": None},
                             host="3D Slicer 5.8.1", when=WHEN)
    assert sorted(p.name for p in out.iterdir()) == sorted(corrections.SAVED_FILES)

    findings = read_tsv(out / "findings.tsv")
    assert findings == saved.findings
    assert [(f.cmb_id, f.status, f.rater) for f in findings] == [
        (1, "definite", "reader1"), (2, "rejected", "reader1"), (3, "unreviewed", "n/a"), (4, "added", "reader1")]
    assert findings[3].volume_mm3 == pytest.approx(8 * GRID.voxel_volume, abs=0.005)
    assert np.allclose(findings[3].ras, mean_ras(exported == 4), atol=0.005)

    back, grid, segments = read_seg_nrrd(out / "cmb.seg.nrrd")
    assert np.allclose(grid.ijk_to_lps(), GRID.ijk_to_lps(), atol=1e-6)
    assert [s["tags"][ID_TAG] for s in segments] == ["1", "3", "4"]  # the deleted CMB has no segment
    assert [s["tags"][STATUS_TAG] for s in segments] == ["definite", "unreviewed", "added"]
    for cmb_id, label in ((1, 1), (3, 3), (4, 4)):
        assert np.array_equal(back == cmb_id, exported == label)
    assert not (back == 2).any()

    record = json.loads((out / "corrections.json").read_text(encoding="utf-8"))
    assert record == saved.record
    assert (record["format"], record["who"], record["when"]) == ("shivacmb-corrections/1", "reader1",
                                                                 "2024-05-06T07:08:09+00:00")
    assert record["software"]["name"] == "shivacmb" and record["software"]["host"] == "3D Slicer 5.8.1"
    assert record["scan"] == {"name": "SWI", "file": None}
    source = record["source_run"]
    assert source["run_json"] == str(tmp_path / "run" / "run.json")
    assert source["run_json_sha256"] == corrections.checksum([tmp_path / "run" / "run.json"])
    assert source["findings_sha256"] == corrections.checksum([tmp_path / "run" / "findings.tsv"])
    assert source["model"]["name"] == "blob" and source["record"]["started"] == "2024-01-01T00:00:00+00:00"
    assert [(c["change"], c["cmb_id"]) for c in record["changes"]] == [("status", 1), ("rejected", 2), ("added", 4)]
    assert record["changes"][2]["volume_mm3"]["after"] == pytest.approx(8 * GRID.voxel_volume, abs=1e-3)
    assert record["summary"]["cmb_count"] == 3
    location = record["location"]  # CMB 2 is rejected; CMB 4, added by the reader, has no location
    assert location["by_area_side"]["lobar"]["left"] == location["by_area_side"]["infratentorial"]["right"] == 1
    assert location["by_area_side"]["deep"]["right"] == 0 and location["by_area_side"]["unknown"]["count"] == 1
    assert location["by_rating"]["definite"]["lobar"]["left"] == 1
    assert sum(sum(row.values()) for row in location["by_rating"]["possible"].values()) == 0
    assert location["boston"] == "mixed"
    assert record["files"] == list(corrections.SAVED_FILES)
    assert corrections.load_saved(out) == (findings, record)


def test_save_replaces_only_its_own_files(tmp_path):
    exported, state, result = corrected_scene(tmp_path)
    out = tmp_path / "scan"
    out.mkdir()
    (out / "report.html").write_text("keep me")
    (out / "findings.tsv").write_text("old")
    corrections.save(out, exported, GRID, state, result, "r", when=WHEN)
    assert (out / "report.html").read_text() == "keep me"
    assert read_tsv(out / "findings.tsv")[0].status == "definite"
    assert files_under(out) == sorted(["report.html", *corrections.SAVED_FILES])


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    exported, state, result = corrected_scene(tmp_path)
    out = tmp_path / "new" / "scan"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(corrections, "to_tsv", fail)
    with pytest.raises(OSError, match="disk full"):
        corrections.save(out, exported, GRID, state, result, "r", when=WHEN)
    assert not (tmp_path / "new").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "findings.tsv").write_text("previous")
    with pytest.raises(OSError):
        corrections.save(existing, exported, GRID, state, result, "r", when=WHEN)
    assert files_under(existing) == ["findings.tsv"] and (existing / "findings.tsv").read_text() == "previous"


def test_who_default_is_a_name():
    assert corrections.who_default()


def test_file_names_are_the_pipelines():
    assert (corrections.SEGMENTATION_NAME, corrections.FINDINGS_NAME) == (pipeline.SEGMENTATION_NAME,
                                                                          pipeline.FINDINGS_NAME)


# --- with a real run --------------------------------------------------------------------------


def test_correcting_a_real_run(tmp_path, iso_scan, model_dir):
    """The module's path on files the command wrote: cmb.seg.nrrd as Slicer would export it."""
    result = pipeline.segment(iso_scan, tmp_path / "out", pipeline.SegmentOptions(model=str(model_dir),
                                                                                  device="cpu", report=False))
    folder = result.output_dir
    labels, grid, records = read_seg_nrrd(folder / "cmb.seg.nrrd")
    segments = [SegmentRecord(r["id"], int(r["labelValue"]), corrections.tag_cmb_id(r["tags"][ID_TAG]), r["name"])
                for r in records]
    state = RunState.from_files(folder / "findings.tsv", folder / "run.json",
                                corrections.fingerprints_by_cmb(corrections.voxel_fingerprints(labels), segments))
    assert len(state.findings) == 6 and state.record["model"]["name"] == "test-dark-blob"

    unchanged = correct(state, state.findings, segments, labels.astype(np.int16), grid)
    assert unchanged.findings == list(state.findings)

    # Measuring a CMB's own voxels again gives the run's volume, and a centroid near the run's.
    measured = corrections.measure_labels(labels, grid)
    for finding in state.findings:
        assert measured[finding.cmb_id].voxels == finding.voxels
        assert measured[finding.cmb_id].volume_mm3 == pytest.approx(finding.volume_mm3, abs=0.005)
        assert np.linalg.norm(np.subtract(measured[finding.cmb_id].ras, finding.ras)) < 1.0

    exported = labels.astype(np.int16)
    exported[exported == 1] = 0
    box = tuple(slice(2, 4) for _ in range(3))
    exported[box] = 7
    edited = correct(state, state.findings, segments + [SegmentRecord("new", 7)], exported, grid)
    saved = corrections.save(tmp_path / "corrected", exported, grid, state, edited, "tester", when=WHEN)
    assert [c["change"] for c in saved.record["changes"]] == ["rejected", "added"]
    back = read_tsv(tmp_path / "corrected" / "findings.tsv")
    assert [f.cmb_id for f in back] == [1, 2, 3, 4, 5, 6, 7] and back[-1].voxels == 8
