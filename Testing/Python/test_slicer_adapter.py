"""SHIVACMB.py and SHIVACMBSlicer's own flow, run here against the Slicer stand-ins (slicer_standins.py):
table state, review edits, corrections, saving, background commands, rating sessions, comparisons, and
the defects found by reading the module against Slicer 5.10's source."""

import json
import math
import os
import sys
import types

import numpy as np
import pytest

import phantoms
import pydicom
import slicer_standins as standins
from dicom_objects import dciodvfy_errors, seg_cmb_labels, sr_groups
from helpers import REPO, files_under
from slicer_standins import Array, Segment, SegmentationNode, TableNode, VolumeNode
from SHIVACMBLib import pipeline
from SHIVACMBLib.dicomseries import read_series, series_files
from SHIVACMBLib.errors import InputError
from SHIVACMBLib.findings import Finding, read_tsv, write_tsv
from SHIVACMBLib.rating import review
from SHIVACMBLib.segfile import ID_TAG, STATUS_TAG, read_seg_nrrd
from SHIVACMBLib.settings import ScanSettings
from SHIVACMBLib.slicerside import corrections, ratingview, slicerbridge


@pytest.fixture()
def module(monkeypatch):
    """SHIVACMB.py imported against the stand-ins."""
    return standins.load_module(monkeypatch)


# --- a result as the module holds it -------------------------------------------------------------


RESULT_GRID = phantoms.grid_around((1.0, -2.0, 3.0), (40, 44, 30), (1.0, 1.0, 1.5))


def loaded_result(tmp_path, module, grid=RESULT_GRID):
    """A real run's files, loaded as loadResults does (segments with tags, table with its state)."""
    labels = np.zeros(grid.array_shape, np.uint8)
    labels[3:5, 10:13, 8:11] = 1
    labels[8, 20, 30:33] = 2
    labels[12:14, 30:32, 20:22] = 3
    found = []
    for cmb_id, m in sorted(corrections.measure_labels(labels, grid).items()):
        found.append(Finding(cmb_id, *(round(v, 2) for v in m.ras), *m.ijk, round(m.volume_mm3, 2), m.voxels,
                             0.9, 0.8, 1.0))
    folder = tmp_path / "run"
    folder.mkdir()
    write_tsv(found, folder / "findings.tsv")
    (folder / "run.json").write_text(json.dumps({"model": {"name": "blob", "version": "2.0"}}) + "\n")

    volume = VolumeNode(grid)
    segmentation = SegmentationNode()
    for cmb_id in (1, 2, 3):
        segmentation.segmentation.segments[f"CMB_{cmb_id}"] = Segment(
            f"CMB {cmb_id}", labels == cmb_id, {ID_TAG: str(cmb_id), STATUS_TAG: "unreviewed"})
    logic = module.SHIVACMBLogic()
    exported, _, segments = logic.exportLabelMap(segmentation, volume)
    state = corrections.RunState.from_files(folder / "findings.tsv", folder / "run.json",
                                            corrections.fingerprints_by_cmb(corrections.voxel_fingerprints(exported),
                                                                            segments))
    table = TableNode()
    table.SetAttribute(logic.RUN_STATE_ATTRIBUTE, state.to_json())
    logic.showFindings(table, state.findings)
    table.SetNodeReferenceID(logic.SEGMENTATION_ROLE, segmentation)
    table.SetNodeReferenceID(logic.VOLUME_ROLE, volume)
    return logic, table, segmentation, volume, grid


def cells(table, logic):
    return logic.tableRows(table)


def test_table_holds_the_run_and_is_editable(tmp_path, module):
    logic, table, _, _, _ = loaded_result(tmp_path, module)
    rows = cells(table, logic)
    assert [row["cmb_id"] for row in rows] == [1, 2, 3] and not table.locked
    assert [c.name for c in table.columns] == [c.name for c in slicerbridge.TABLE_COLUMNS]
    assert logic.hasRunState(table) and not logic.hasRunState(TableNode())
    assert logic.shownFindings(table) == list(logic.runState(table).findings)
    with pytest.raises(RuntimeError, match="older"):
        logic.runState(TableNode())


def test_review_edits_and_corrections_flow_into_the_saved_files(tmp_path, module):
    logic, table, segmentation, volume, grid = loaded_result(tmp_path, module)
    status = table.GetColumnIndex("status")
    table.SetCellText(0, status, "Def")
    table.SetCellText(1, table.GetColumnIndex("volume_mm3"), "999")
    edit = logic.applyTableEdits(table)
    assert edit.restore and len(edit.problems) == 1 and "only the status" in edit.problems[0]
    assert table.GetCellText(0, status) == "definite"
    assert cells(table, logic)[1]["volume_mm3"] == logic.runState(table).findings[1].volume_mm3
    pasted = Array()
    pasted.SetName("pasted")
    table.AddColumn(pasted)
    assert not logic.applyTableEdits(table).restore and "pasted" not in [c.name for c in table.columns]

    segments = segmentation.segmentation.segments
    del segments["CMB_2"]
    missed = np.zeros(grid.array_shape, bool)
    missed[15:17, 5:7, 5:7] = True
    segments["Segment_1"] = Segment("Segment_1", missed)
    segments["Segment_2"] = Segment("Segment_2", np.zeros(grid.array_shape, bool))  # still empty
    update = logic.updateFindings(table)
    assert update.counts == {"found_by_run": 3, "added": 1, "rejected": 1, "edited": 0, "status_changed": 1,
                             "cmb_count": 3}
    assert [(r["cmb_id"], r["status"]) for r in cells(table, logic)] == [(1, "definite"), (2, "rejected"),
                                                                         (3, "unreviewed"), (4, "added")]
    assert (segments["Segment_1"].name, segments["Segment_1"].tags) == ("CMB 4", {ID_TAG: "4", STATUS_TAG: "added"})
    assert segments["CMB_1"].tags[STATUS_TAG] == "definite"
    assert segments["Segment_2"].tags == {}

    saved = logic.saveResults(table, str(tmp_path / "out" / "SWI_scan"), "reader")
    findings = read_tsv(tmp_path / "out" / "SWI_scan" / "findings.tsv")
    assert findings == saved.findings
    assert [(f.cmb_id, f.status, f.rater) for f in findings] == [
        (1, "definite", "reader"), (2, "rejected", "reader"), (3, "unreviewed", "n/a"), (4, "added", "reader")]
    assert cells(table, logic)[0]["rater"] == "reader"
    labels, _, records = read_seg_nrrd(tmp_path / "out" / "SWI_scan" / "cmb.seg.nrrd")
    assert [r["tags"][ID_TAG] for r in records] == ["1", "3", "4"]
    assert np.array_equal(labels == 4, missed)
    assert saved.record["software"]["host"] == "3D Slicer 5.8.1"
    assert saved.record["scan"] == {"name": "SWI scan", "file": None}


def dicom_volume(tmp_path, module, grid=RESULT_GRID):
    """A result loaded for a scan that Slicer loaded from a DICOM series (DICOM.instanceUIDs, database)."""
    series = phantoms.write_dicom_series(phantoms.render(phantoms.default_scene(), grid), tmp_path / "series")
    uids = []
    for path in sorted(series.iterdir()):
        uid = pydicom.dcmread(str(path), stop_before_pixels=True).SOPInstanceUID
        module.slicer.dicomDatabase.files[uid] = str(path)
        uids.append(uid)
    logic, table, segmentation, volume, grid = loaded_result(tmp_path, module)
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    return logic, table, segmentation, volume, series


def test_save_results_writes_the_dicom_results_of_a_scan_from_dicom(tmp_path, module):
    logic, table, segmentation, volume, series = dicom_volume(tmp_path, module)
    table.SetCellText(0, table.GetColumnIndex("status"), "definite")
    del segmentation.segmentation.segments["CMB_2"]
    added = np.zeros(RESULT_GRID.array_shape, bool)
    added[15:17, 5:7, 5:7] = True
    segmentation.segmentation.segments["Segment_1"] = Segment("Segment_1", added)
    saved = logic.saveResults(table, str(tmp_path / "out"), "reader")
    out = tmp_path / "out"
    assert saved.files == ["cmb.seg.nrrd", "findings.tsv", "corrections.json", "cmb.seg.dcm", "cmb.sr.dcm"]
    assert saved.dicom_problem == "" and json.loads((out / "corrections.json").read_text())["files"] == saved.files
    for name in ("cmb.seg.dcm", "cmb.sr.dcm"):
        assert dciodvfy_errors(out / name) == []
    labels, _, _ = read_seg_nrrd(out / "cmb.seg.nrrd")  # CMB 2 deleted, CMB 4 added by the reader
    dicom_series = read_series(series_files(series), series, RESULT_GRID)
    assert np.array_equal(seg_cmb_labels(out / "cmb.seg.dcm", dicom_series), dicom_series.frames(labels))
    seg = pydicom.dcmread(str(out / "cmb.seg.dcm"))
    assert [(s.SegmentLabel, s.SegmentAlgorithmType) for s in seg.SegmentSequence] == [
        ("CMB 1", "AUTOMATIC"), ("CMB 3", "AUTOMATIC"), ("CMB 4", "MANUAL")]
    assert str(seg.ContentCreatorName) == "reader^"
    groups = sr_groups(out / "cmb.sr.dcm")
    review = {label: g["codes"].get("Review status") for label, g in groups.items() if label != "Scan summary"}
    assert review == {"CMB 1": "DEFINITE", "CMB 2": "REJECTED", "CMB 3": None, "CMB 4": "ADDED"}
    assert groups["CMB 2"]["template"] == "1501" and "segment" not in groups["CMB 2"]  # no segment left
    assert groups["CMB 4"]["segment"][1] == 3 and groups["Scan summary"]["numbers"][0][2] == 3  # not rejected
    sr = pydicom.dcmread(str(out / "cmb.sr.dcm"))
    assert "Person Observer Name" in str(sr.ContentSequence) and "reader" in str(sr.ContentSequence)


def test_save_results_of_a_scan_not_on_its_dicom_grid_saves_the_rest_and_says_why(tmp_path, module):
    logic, table, _, volume, _ = dicom_volume(tmp_path, module)
    cropped = phantoms.grid_around((1.0, -2.0, 3.0), (40, 44, 30), (1.0, 1.0, 1.5), phantoms.rotation((0, 0, 1), 5))
    volume.grid = cropped  # the volume was resampled after loading
    saved = logic.saveResults(table, str(tmp_path / "out"), "reader")
    assert saved.files == ["cmb.seg.nrrd", "findings.tsv", "corrections.json"]
    assert "does not lie on the scan's grid" in saved.dicom_problem
    assert files_under(tmp_path / "out") == ["cmb.seg.nrrd", "corrections.json", "findings.tsv"]
    module.slicer.dicomDatabase.files.clear()  # the series left the DICOM database: nothing to write against
    assert logic.dicomFiles(volume) is None


def test_jump_and_segment_lookup(tmp_path, module):
    logic, table, segmentation, _, _ = loaded_result(tmp_path, module)
    node, segment_id = logic.jumpToFinding(table, 1)
    row = cells(table, logic)[1]
    assert node is segmentation and segment_id == "CMB_2"
    assert module.jumps == [(row["r"], row["a"], row["s"], True)]
    del segmentation.segmentation.segments["CMB_2"]
    assert logic.jumpToFinding(table, 1) == (segmentation, None)


def test_show_3d(module):
    segmentation = SegmentationNode()
    module.SHIVACMBLogic.setShow3D(segmentation, False)
    assert segmentation.display.visible3D is False and not segmentation.surfaces
    module.SHIVACMBLogic.setShow3D(segmentation, True)
    assert segmentation.display.visible3D is True and segmentation.surfaces
    module.SHIVACMBLogic.setShow3D(None, True)


# --- background commands -------------------------------------------------------------------


def test_command_reports_failure_and_removes_its_folder(tmp_path, module):
    folder = tmp_path / "work"
    folder.mkdir()
    process = slicerbridge.ChildProcess([sys.executable, "-c", "print('shivacmb: error: no luck'); raise SystemExit(4)"])
    finished = []
    command = module.SHIVACMBCommand(process, str(folder), finished.append)
    command.startPolling()
    while not finished:
        module.timers.run()
    assert (command.status, command.errorMessage) == ("failed", "no luck")
    assert not folder.exists() and list(command.lines) == ["shivacmb: error: no luck"]


def test_run_loads_the_results_of_the_real_command(tmp_path, module, iso_scan, model_dir):
    class Logic:
        loaded = []

        @staticmethod
        def moduleDirectory():
            return str(REPO / "SHIVACMB")

        def loadResults(self, volume, folder, show3D):
            self.loaded.append((volume, folder, show3D, sorted(p.name for p in (tmp_path / "work" / "out" / "iso")
                                                               .iterdir())))
            return "segmentation", "table"

    work = tmp_path / "work"
    work.mkdir()
    settings = ScanSettings(model=str(model_dir), device="cpu", report=False)
    args = slicerbridge.segment_command(sys.executable, str(iso_scan), str(work / "out"), settings, "iso")
    process = slicerbridge.ChildProcess(args, cwd=str(REPO / "SHIVACMB"),
                                        env=slicerbridge.child_environment(os.environ))
    progress = []
    run = module.SHIVACMBRun(Logic(), "volume", str(work), process, {}, lambda f, m: progress.append(f), None,
                             show3D=False)
    run.wait()
    assert run.status == "done", run.errorMessage
    assert (run.segmentationNode, run.tableNode) == ("segmentation", "table")
    volume, folder, show3D, files = Logic.loaded[0]
    assert (volume, show3D) == ("volume", False) and folder.endswith("iso")
    assert {pipeline.FINDINGS_NAME, pipeline.SEGMENTATION_NAME, pipeline.RUN_NAME} <= set(files)
    assert not work.exists() and progress == sorted(progress) and math.isclose(progress[-1], 1.0)
    assert run.summary.cmb_count == 6


# --- rating sessions -----------------------------------------------------------------------------


def rating_session(tmp_path, mode):
    ai = tmp_path / "ai.tsv"
    write_tsv([Finding(1, 10.0, 20.0, 30.0, 1, 1, 1, 4 / 3 * math.pi * 27, 113, 0.9, 0.8, 1.0),
               Finding(2, -10.0, 0.0, 5.0, 1, 1, 1, 1.0, 1, 0.9, 0.8, 1.0)], ai)
    scans = [("s1", tmp_path / "s1.nii.gz"), ("s2", tmp_path / "s2.nii.gz")]
    return review.create_session(tmp_path / mode, scans, mode, {"s1": ai}).folder


def spheres(rating):
    """name -> (centre, radius, colour) of the segments drawn."""
    segments = rating.segmentationNode.GetSegmentation().segments
    return {name: (*segment.mask, segment.tags["colour"]) for name, segment in segments.items()}


def test_blind_rating_in_slicer_survives_closing_mid_scan(tmp_path, module):
    folder = rating_session(tmp_path, "blind")
    logic = module.SHIVACMBLogic()
    rating = module.SHIVACMBRating(logic, review.RatingSession(folder, "ann"))
    rating.show(0)
    assert rating.volumeNode.name == str(tmp_path / "s1.nii.gz") and spheres(rating) == {}  # the AI stays hidden
    assert rating.segmentationNode.reference is rating.volumeNode
    assert rating.add((1.0, 2.0, 3.0)) == 1
    rating.setStatus(0, "definite")
    assert spheres(rating) == {"CMB 1": ((1.0, 2.0, 3.0), ratingview.MARK_RADIUS_MM,
                                         ratingview.STATUS_COLOURS["definite"])}
    rating.close()  # Slicer closed mid-scan: nothing to save, it is saved
    assert module.scene.nodes == []

    again = module.SHIVACMBRating(logic, review.RatingSession(folder, "ann"))
    again.show(again.session.current_index())
    assert (again.index, [(n, f.status) for n, f in again.shown]) == (0, [("CMB 1", "definite")])
    again.submit()
    assert (again.scanId, spheres(again)) == ("s2", {})  # on to the next scan
    again.show(0)
    assert not again.changeable and sorted(spheres(again)) == ["AI 1", "AI 2", "CMB 1"]  # revealed after submit
    assert spheres(again)["AI 1"] == ((10.0, 20.0, 30.0), pytest.approx(3.0, abs=1e-3), ratingview.STATUS_COLOURS["AI"])
    again.setStatus(1, "definite")  # an AI finding of a blind scan is not the rater's to rate
    assert again.session.rating("s1").marks[1].status == "definite" and len(module.scene.nodes) == 2
    again.jumpTo(0)
    assert module.jumps[-1] == (1.0, 2.0, 3.0, True)
    again.close()


def test_assisted_rating_in_slicer(tmp_path, module):
    rating = module.SHIVACMBRating(module.SHIVACMBLogic(), review.RatingSession(rating_session(tmp_path, "assisted"),
                                                                                  "bob"))
    rating.show(0)
    drawn = spheres(rating)
    assert drawn["CMB 1"][1] == pytest.approx(3.0, abs=1e-3) and drawn["CMB 2"][1] == ratingview.MIN_RADIUS_MM
    assert drawn["CMB 1"][2] == ratingview.STATUS_COLOURS["unreviewed"]
    rating.setStatus(1, "rejected")
    rating.setStatus(0, "possible")
    with pytest.raises(InputError):
        rating.notRatable("bored")
    rating.submit()
    assert rating.scanId == "s2" and rating.session.rating("s1").counts()["possible"] == 1
    rating.notRatable("motion")
    assert rating.scanId == "s2" and not rating.changeable and rating.session.done() == 2
    rating.close()


# --- compare with baseline ------------------------------------------------------------------------


class SliceWidget:
    def __init__(self, jumps, view):
        self.jumps, self.view = jumps, view

    def mrmlSliceNode(self):
        return types.SimpleNamespace(JumpSliceByCentering=lambda r, a, s: self.jumps.append((self.view, (r, a, s))))


def comparison_table(tmp_path, module):
    """A comparison table as loadComparison leaves it: rows of a real comparison.tsv, both scans referenced."""
    from SHIVACMBLib import longitudinal

    grid = phantoms.grid_around((0, 0, 0), (60, 60, 60), (1.0, 1.0, 1.0))
    registration = longitudinal.Registration(phantoms_transform(), "rigid", -0.5, 0.97, 0.4)
    baseline = [Finding(1, 5.0, 5.0, 5.0, 0, 0, 0, 20.0, 20), Finding(2, -10.0, 0.0, 3.0, 0, 0, 0, 14.0, 14)]
    followup = [Finding(1, 7.0, 5.0, 5.0, 0, 0, 0, 22.0, 22), Finding(2, 12.0, -10.0, -6.0, 0, 0, 0, 9.0, 9)]
    rows = longitudinal.match_findings(baseline, followup, registration, grid, grid, 4.0)
    (tmp_path / "comparison.tsv").write_text(longitudinal.to_tsv(rows))
    logic = module.SHIVACMBLogic()
    table = TableNode()
    table.SetAttribute(logic.COMPARISON_ROWS_ATTRIBUTE, json.dumps(longitudinal.read_tsv(tmp_path / "comparison.tsv")))
    baseline_volume, followup_volume = VolumeNode(grid), VolumeNode(grid)
    table.SetNodeReferenceID(logic.BASELINE_ROLE, baseline_volume)
    table.SetNodeReferenceID(logic.VOLUME_ROLE, followup_volume)
    return logic, table, registration


def phantoms_transform():
    import SimpleITK as sitk

    transform = sitk.Euler3DTransform()
    transform.SetTranslation((-2.0, 0.0, 0.0))  # baseline LPS -> follow-up LPS: 2 mm to the Right
    return transform


def test_comparison_table_shows_new_cmbs_or_all_and_rows_jump_both_views(tmp_path, module):
    logic, table, registration = comparison_table(tmp_path, module)
    jumps = []
    module.slicer.app.layoutManager = lambda: types.SimpleNamespace(sliceWidget=lambda view: SliceWidget(jumps, view))
    logic.showComparison(table, newOnly=True)
    statuses = table.columns[0]
    assert statuses.values == ["new"] and table.locked
    assert [c.name for c in table.columns][:3] == ["status", "followup_id", "baseline_id"]
    logic.jumpToComparisonRow(table, 0)
    # baseline view: where the new CMB would be in the baseline; follow-up view: the CMB itself
    assert jumps == [("Red", pytest.approx((10.0, -10.0, -6.0))), ("Yellow", pytest.approx((12.0, -10.0, -6.0)))]
    logic.showComparison(table, newOnly=False)
    assert statuses is not table.columns[0]
    assert table.columns[0].values == ["new", "persistent", "not seen at follow-up"]
    distance = table.columns[[c.name for c in table.columns].index("distance_mm")].values
    assert distance[1] == pytest.approx(0.0, abs=0.01) and math.isnan(distance[0]) and math.isnan(distance[2])
    jumps.clear()
    logic.jumpToComparisonRow(table, 2)  # not seen at follow-up: baseline CMB 2, where the follow-up would show it
    assert jumps == [("Red", pytest.approx((-10.0, 0.0, 3.0))), ("Yellow", pytest.approx((-8.0, 0.0, 3.0)))]


# --- the Rating session section of the panel ------------------------------------------------------


class ListWidget:
    """QListWidget: its lines, the current row; items are rows."""

    def __init__(self):
        self.lines, self.currentRow = [], -1

    def clear(self):
        self.lines, self.currentRow = [], -1

    def addItems(self, lines):
        self.lines += lines

    def setCurrentRow(self, row):
        self.currentRow = row

    def row(self, item):
        return item

    def blockSignals(self, block):
        return False


class Shortcut:
    enabled = True

    def setEnabled(self, on):
        self.enabled = on


class MarkupsLogic:
    """slicer.modules.markups.logic(): the list points go to, and place mode."""

    def __init__(self, jumps):
        self.jumps, self.active, self.persistent = jumps, None, None

    def JumpSlicesToLocation(self, r, a, s, centred):
        self.jumps.append((r, a, s, centred))

    def SetActiveList(self, node):
        self.active = node

    def StartPlaceMode(self, persistent):
        self.persistent = persistent


def rating_panel(module, monkeypatch):
    """The widget with the Rating session section's widgets, as if the module were shown."""
    markups, errors = MarkupsLogic(module.jumps), []
    monkeypatch.setattr(module.slicer, "modules", types.SimpleNamespace(markups=types.SimpleNamespace(
        logic=lambda: markups)), raising=False)
    monkeypatch.setattr(module.slicer, "vtkMRMLMarkupsNode", types.SimpleNamespace(PointPositionDefinedEvent=7),
                        raising=False)
    monkeypatch.setattr(module.slicer.util, "errorDisplay", lambda text, **kw: errors.append(text), raising=False)
    widget = module.SHIVACMBWidget()
    widget.parent = types.SimpleNamespace(isEntered=True)
    widget.logic = module.SHIVACMBLogic()
    widget.observed = []  # VTKObservationMixin: removing what is not observed does nothing
    widget.addObserver = lambda *observation: widget.observed.append(observation)
    widget.removeObserver = lambda *observation: widget.observed.remove(observation) if observation in widget.observed \
        else None
    buttons = ("definiteButton", "possibleButton", "rejectButton", "addCmbButton", "submitScanButton",
               "notRatableButton", "previousScanButton", "nextScanButton")
    widget.ui = types.SimpleNamespace(ratingScanList=ListWidget(), ratingFindingsList=ListWidget(),
                                      ratingProgressLabel=types.SimpleNamespace(text=""),
                                      notRatableComboBox=types.SimpleNamespace(currentText="motion"),
                                      **{name: types.SimpleNamespace(enabled=None) for name in buttons})
    widget._ratingShortcuts = [Shortcut() for _ in ratingview.SHORTCUTS]
    widget._parameterNode = types.SimpleNamespace(rater="ann", disconnectGui=lambda tag: None)
    return widget, markups, errors


def test_rating_panel_adds_a_clicked_point_and_hides_the_ai_until_submit(tmp_path, module, monkeypatch):
    folder = rating_session(tmp_path, "blind")
    widget, markups, errors = rating_panel(module, monkeypatch)
    widget._showRating()
    assert widget.ui.ratingProgressLabel.text == "No rating session open."
    assert not any(shortcut.enabled for shortcut in widget._ratingShortcuts)

    widget.openRatingSession(str(folder))
    ui = widget.ui
    assert ui.ratingProgressLabel.text == "scan 1 of 2 (0 done): s1; blind session, rater ann"
    assert (ui.ratingScanList.lines, ui.ratingScanList.currentRow) == (["… s1", "  s2"], 0)
    assert ui.ratingFindingsList.lines == [] and spheres(widget._rating) == {}  # blind: no AI finding shown
    assert all(s.enabled for s in widget._ratingShortcuts) and ui.definiteButton.enabled
    assert (ui.previousScanButton.enabled, ui.nextScanButton.enabled) == (False, True)

    widget.onAddCmb()  # "Add CMB" (key A): the next click in a slice view places one point
    points = markups.active
    assert markups.persistent is False and (points, 7, widget.onCmbPlaced) in widget.observed
    points.points.append((4.0, -5.0, 6.0))
    widget.onCmbPlaced(points, 7)
    assert spheres(widget._rating) == {"CMB 1": ((4.0, -5.0, 6.0), ratingview.MARK_RADIUS_MM,
                                                 ratingview.STATUS_COLOURS["added"])}
    module.timers.run()
    assert points.points == [] and ui.ratingFindingsList.lines == ["CMB 1: added"]
    ui.ratingFindingsList.setCurrentRow(0)
    widget.onRateFinding("possible")  # key P
    assert ui.ratingFindingsList.lines == ["CMB 1: possible"] and ui.ratingFindingsList.currentRow == 0

    widget.onSubmitScan()
    assert ui.ratingProgressLabel.text.startswith("scan 2 of 2 (1 done): s2;")
    assert ui.ratingScanList.lines == ["✓ s1", "… s2"]
    widget.onScanChosen(0)  # double-click on s1: submitted, the AI findings beside the blind mark
    assert ui.ratingFindingsList.lines == ["CMB 1: possible", "AI 1: AI finding", "AI 2: AI finding"]
    assert sorted(spheres(widget._rating)) == ["AI 1", "AI 2", "CMB 1"] and not ui.definiteButton.enabled

    # Another module is shown, then this one again (Slicer sets isEntered before calling exit() and enter()).
    widget.parent.isEntered = False
    widget.exit()
    assert not any(s.enabled for s in widget._ratingShortcuts)  # D, P, N... are the other module's keys
    monkeypatch.setattr(widget, "initializeParameterNode", lambda: None)
    widget._modelsListed = True
    widget.parent.isEntered = True
    widget.enter()
    assert all(s.enabled for s in widget._ratingShortcuts)

    widget._closeRating()  # Slicer closes: the session is saved and its lock released
    assert module.scene.nodes == [] and widget.observed == [] and errors == []
    with review.RatingSession(folder, "ann") as again:
        assert again.rating("s1").marks[1].status == "possible" and again.current_index() == 1


# --- the defects found by reading the module against Slicer 5.10's source ---------------------------------


def test_a_segment_added_or_deleted_is_measured_alone(tmp_path, module):
    """Defect 3: adding or deleting a segment exported every segment over the whole scan grid on the GUI thread.
    Now only the new segment is exported, in its own bounding box, and the findings are those a full update
    gives."""
    logic, table, segmentation, volume, grid = loaded_result(tmp_path, module)
    module.scene.nodes.append(table)
    widget = module.SHIVACMBWidget()
    widget.logic, widget._observedTable = logic, table
    widget.ui = types.SimpleNamespace(statusLabel=types.SimpleNamespace(text=""))
    segments = segmentation.segmentation.segments
    del segments["CMB_2"]
    missed = np.zeros((2, 3, 2), bool)
    missed[0, 1:, :] = True
    segments["Segment_1"] = Segment("Segment_1", standins.BoxMask((15, 5, 5), missed))
    segments["Segment_2"] = Segment("Segment_2", standins.BoxMask((1, 1, 1), np.zeros((1, 1, 1), bool)))  # empty

    standins.EXPORT_MODES.clear()
    widget.onSegmentsAddedOrRemoved()  # no measurement yet: every segment once, over the whole grid
    module.timers.run()
    assert standins.EXPORT_MODES == ["EXTENT_REFERENCE_GEOMETRY"]
    first = cells(table, logic)
    assert [(r["cmb_id"], r["status"]) for r in first] == [(1, "unreviewed"), (2, "rejected"), (3, "unreviewed"),
                                                           (4, "added")]
    assert widget.ui.statusLabel.text == "3 microbleeds (3 found by the run, 1 added, 1 rejected)."

    standins.EXPORT_MODES.clear()
    del segments["Segment_1"]
    again = np.ones((1, 2, 2), bool)
    segments["Segment_3"] = Segment("Segment_3", standins.BoxMask((12, 30, 10), again))
    segments["Segment_2"].mask = standins.BoxMask((18, 2, 2), np.ones((1, 1, 1), bool))  # painted since
    widget.onSegmentsAddedOrRemoved()
    module.timers.run()
    # the new segment and the one empty when last measured, each alone in its bounding box
    assert standins.EXPORT_MODES == ["EXTENT_UNION_OF_EFFECTIVE_SEGMENTS"] * 2
    incremental = cells(table, logic)
    tags = {name: dict(segment.tags) for name, segment in segments.items()}
    full = logic.updateFindings(table)
    assert json.dumps(cells(table, logic)) == json.dumps(incremental)
    assert {n: dict(s.tags) for n, s in segments.items()} == tags
    # CMB 4 (added, then deleted) is gone; ids are never reused
    assert [(r["cmb_id"], r["status"], r["voxels"]) for r in incremental] == [
        (1, "unreviewed", 18), (2, "rejected", 3), (3, "unreviewed", 8), (5, "added", 1), (6, "added", 4)]
    assert full.counts == {"found_by_run": 3, "added": 2, "rejected": 1, "edited": 0, "status_changed": 0,
                           "cmb_count": 4}


def test_the_result_segmentation_keeps_no_temporary_file(tmp_path, module):
    """Defect 1: the segmentation was read through the IO manager (Recent files) and kept a storage node in the
    temporary run folder, where a scene save wrote it back. Defect 5: the CMB terminology is loaded when a
    result is loaded, not only on startupCompleted()."""
    from SHIVACMBLib.segfile import write_seg_nrrd

    grid = phantoms.grid_around((0.0, 0.0, 0.0), (20, 20, 10), (1.0, 1.0, 2.0))
    labels = np.zeros(grid.array_shape, np.uint8)
    labels[4:6, 8:11, 8:10] = 1
    path = tmp_path / "SHIVACMB-run-x" / "cmb.seg.nrrd"
    path.parent.mkdir()
    write_seg_nrrd(path, labels, grid, [Finding(1, 0.0, 0.0, 0.0, 9, 9, 5, 12.0, 12)])
    logic, volume = module.SHIVACMBLogic(), VolumeNode(grid)
    node = logic.loadSegmentation(str(path), volume, show3D=False)
    assert node.GetStorageNode() is None and not any(isinstance(n, standins.StorageNode) for n in module.scene.nodes)
    assert list(node.GetSegmentation().segments) == ["CMB_1"] and node.reference is volume
    assert node.GetAttribute(logic.RESULT_ATTRIBUTE) == logic.SEGMENTATION_RESULT
    terminologies = module.slicer.modules.terminologies.logic()
    from SHIVACMBLib.resources import cmb_terminology

    assert list(terminologies.loaded) == [cmb_terminology()[0]["contextName"]]
    logic.loadSegmentation(str(path), volume, show3D=False)
    assert len(terminologies.loaded) == 1


def test_the_terminology_is_loaded_when_the_module_is_added_after_startup(module):
    """Defect 5: startupCompleted() is emitted once; a module added later loads the terminology in setup()."""
    import ast
    import inspect

    terminologies = module.slicer.modules.terminologies.logic()
    module.package["nodes"].ensureTerminology(module.SHIVACMBLogic.moduleDirectory())
    module.package["nodes"].ensureTerminology(module.SHIVACMBLogic.moduleDirectory())
    assert len(terminologies.loaded) == 1 and os.path.isfile(next(iter(terminologies.loaded.values())))
    setup = ast.parse(inspect.getsource(module.SHIVACMBWidget.setup).strip().replace("\n    ", "\n"))
    assert "ensureTerminology" in {n.func.id for n in ast.walk(setup) if isinstance(n, ast.Call)
                                   and isinstance(n.func, ast.Name)}


class ViewWidget:
    """qMRMLSliceWidget: its slice node's orientation, its background and link, and its fitting."""

    def __init__(self, orientation):
        self.orientation, self.background, self.linked, self.fitted = orientation, None, None, False

    def mrmlSliceNode(self):
        return types.SimpleNamespace(SetOrientation=lambda name: setattr(self, "orientation", name))

    def mrmlSliceCompositeNode(self):
        return types.SimpleNamespace(SetBackgroundVolumeID=lambda node_id: setattr(self, "background", node_id),
                                     SetLinkedControl=lambda linked: setattr(self, "linked", linked))

    def sliceLogic(self):
        return types.SimpleNamespace(FitSliceToAll=lambda: setattr(self, "fitted", True))


def test_side_by_side_views_are_both_axial(tmp_path, module, monkeypatch):
    """Defect 2: vtkMRMLLayoutLogic applies a layout's view properties only to views it creates, so an existing
    Yellow view stayed sagittal beside the axial Red one."""
    logic, table, _ = comparison_table(tmp_path, module)
    views = {"Red": ViewWidget("Axial"), "Yellow": ViewWidget("Sagittal")}
    layouts = []
    monkeypatch.setattr(module.slicer, "vtkMRMLLayoutNode", types.SimpleNamespace(SlicerLayoutSideBySideView=29),
                        raising=False)
    module.slicer.app.layoutManager = lambda: types.SimpleNamespace(setLayout=layouts.append,
                                                                    sliceWidget=views.__getitem__)
    logic.showSideBySide(table)
    assert layouts == [29] and {name: view.orientation for name, view in views.items()} == {"Red": "Axial",
                                                                                           "Yellow": "Axial"}
    assert all(view.fitted and view.linked is False for view in views.values())


def test_rating_keys_need_a_main_window(module, monkeypatch):
    """Defect 6: under --no-main-window (the generic tests) qt.QShortcut got a None parent."""
    widget, _, _ = rating_panel(module, monkeypatch)
    connected = []
    for name in ("definiteButton", "possibleButton", "rejectButton", "addCmbButton", "submitScanButton",
                 "notRatableButton", "previousScanButton", "nextScanButton", "newSessionButton",
                 "openSessionButton", "ratingScanList", "ratingFindingsList"):
        setattr(widget.ui, name, types.SimpleNamespace(enabled=None, connect=lambda signal, slot: connected.append(
            signal), **({"clear": lambda: None, "addItems": lambda items: None, "setCurrentRow": lambda row: None,
                         "blockSignals": lambda block: False} if name.endswith("List") else {})))
    for name in ("ratingModeComboBox", "notRatableComboBox"):
        setattr(widget.ui, name, types.SimpleNamespace(addItems=lambda items: None, currentText="motion"))
    made = []
    monkeypatch.setattr(module.qt, "QShortcut", lambda parent: made.append(parent), raising=False)
    widget._ratingShortcuts = []
    widget._setupRating()  # slicer.util.mainWindow() is None
    assert made == [] and widget._ratingShortcuts == [] and connected.count("clicked(bool)") == 10

    window = object()
    monkeypatch.setattr(module.slicer.util, "mainWindow", lambda: window)
    monkeypatch.setattr(module.qt, "QKeySequence", str, raising=False)

    class Shortcut:
        def __init__(self, parent):
            self.parent, self.key = parent, None

        def setKey(self, key):
            self.key = key

        def connect(self, signal, slot):
            pass

        def setEnabled(self, on):
            pass

    monkeypatch.setattr(module.qt, "QShortcut", Shortcut)
    widget._setupRating()
    assert {s.parent for s in widget._ratingShortcuts} == {window}
    assert sorted(s.key for s in widget._ratingShortcuts) == sorted(ratingview.SHORTCUTS.values())


def test_segment_a_scan_node_through_the_real_command(tmp_path, module, monkeypatch, iso_scan, model_dir):
    """The one launch path (CommandLogic.startCommand): the scan node exported into a temporary folder, the real
    `segment` run with Slicer's Python in the module folder, the results loaded as nodes linked to the scan,
    the temporary folder removed; a segment deleted right after is measured without any export."""
    import SimpleITK as sitk

    from SHIVACMBLib.geometry import Geometry

    image = sitk.ReadImage(str(iso_scan))
    volume = VolumeNode(Geometry.of(image))
    module.scene.nodes.append(volume)
    exported = []

    def export_node(node, path, properties):
        sitk.WriteImage(image, path)
        exported.append((node, os.path.basename(path), properties))
        return True

    monkeypatch.setattr(module.slicer.util, "exportNode", export_node, raising=False)
    monkeypatch.setattr(module.slicer.util, "startupEnvironment", lambda: dict(os.environ), raising=False)
    monkeypatch.setattr(module.slicer.app, "temporaryPath", str(tmp_path), raising=False)
    logic = module.SHIVACMBLogic()
    monkeypatch.setattr(logic, "pythonExecutable", lambda: sys.executable)
    monkeypatch.setattr(logic, "missingPackages", lambda extra=(): [])
    run = logic.segment(volume, settings=ScanSettings(model=str(model_dir), device="cpu", report=False), show3D=False)
    assert run.status == "done" and run.summary.cmb_count == 6, run.errorMessage
    assert exported == [(volume, "input.nrrd", {"useCompression": 0})]
    assert not os.path.exists(run.tempDir) and not [p for p in tmp_path.iterdir() if p.name.startswith("SHIVACMB-")]
    table, segmentation = run.tableNode, run.segmentationNode
    assert table.GetNumberOfRows() == 6 and segmentation.GetSegmentation().GetNumberOfSegments() == 6
    assert segmentation.GetStorageNode() is None and logic.resultNodes(volume) == [segmentation, table]
    assert logic.findingsVolume(table) is volume and logic.findingsSegmentation(table) is segmentation

    standins.EXPORT_MODES.clear()
    del segmentation.GetSegmentation().segments[segmentation.GetSegmentation().GetNthSegmentID(0)]
    update = logic.updateAddedOrRemoved(table)
    assert standins.EXPORT_MODES == [] and update.counts["rejected"] == 1 and update.counts["cmb_count"] == 5


def test_first_use_installs_the_build_the_cpu_extra_chooses_here(module, monkeypatch):
    """The module's install logic on this computer (no NVIDIA GPU) asks pip for the onnxruntime build that the README's
    `.[cpu]` install chose (onnxruntime-openvino on x86-64 Linux), and for no build at all once one is importable:
    never two builds in Slicer's Python."""
    import importlib.util
    import shutil

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from test_runtimes import chosen, cpu_extra

    here = default_environment()
    expected = [r for r in chosen(cpu_extra(), here["sys_platform"], here["platform_machine"], here["python_version"])
                if r.startswith(("onnxruntime", "openvino"))]
    real = importlib.util.find_spec
    hidden = {"onnxruntime"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    logic = module.SHIVACMBLogic()
    asked = [Requirement(r) for r in logic.missingPackages() if r.startswith(("onnxruntime", "openvino"))]
    assert sorted(f"{r.name}{r.specifier}" for r in asked) == expected
    hidden.clear()
    assert not [r for r in logic.missingPackages() if r.startswith(("onnxruntime", "openvino"))]
