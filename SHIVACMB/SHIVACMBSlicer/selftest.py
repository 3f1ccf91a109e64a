"""The self-test Slicer runs (SHIVACMBTest in SHIVACMB.py, under --testing): the module's whole path on a phantom."""

import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, List

import numpy as np
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLTableNode

from SHIVACMBLib.settings import ScanSettings
from SHIVACMBLib.slicerside import slicerbridge

from .correcting import CorrectionsLogic
from .nodes import ResultNodes


class SelfTest:
    """SHIVACMBTest's body: segments a phantom from the module panel, corrects the result as a reader would, and
    saves it.

    The phantom is a bright ellipsoid "brain" with three dark spheres; the model a tiny
    fixed-weight dark-blob detector (SHIVACMBLib.modelstore.blobmodel, which needs the onnx package).
    """

    SPACING = (1.0, 1.0, 1.2)  # mm, i j k
    SHAPE_IJK = (100, 120, 75)
    BRAIN_RADII = (32.0, 38.0, 28.0)  # mm, around RAS (0, 0, 0)
    CMB_CENTRES = ((12.0, 15.0, 9.6), (-15.0, -10.0, 6.0), (5.0, -20.0, -8.4))  # RAS mm, in CMB id order
    CMB_RADIUS = 3.0
    MISSED_CENTRE = (20.0, -25.0, 15.0)  # RAS mm: where the test adds a segment for a "missed" CMB
    MODEL_BOX = (80, 96, 80)
    RATER = "SHIVACMB self-test"
    TIMEOUT_S = 300.0

    def test_SegmentCorrectAndSave(self) -> None:
        widget = slicer.util.getModuleWidget("SHIVACMB")
        logic = widget.logic
        missing = logic.missingPackages()
        if missing:
            self.delayDisplay("Installing " + ", ".join(missing))
            logic.installPackages(missing)

        temporaries = self._temporaries()
        volume = self._phantomVolume()
        voxels = slicer.util.arrayFromVolume(volume).copy()
        work = tempfile.mkdtemp(prefix="SHIVACMB-test-", dir=slicer.app.temporaryPath)
        try:
            model = self._phantomModel(work)
            widget.initializeParameterNode()
            table = self._segmentFromThePanel(widget, volume, model)
            self._selectRows(widget, table)
            self._correct(widget, table)
            self._save(widget, table, os.path.join(work, "saved"))
            self._show3D(widget)
            self._segmentAgain(logic, volume, model, table)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volume), voxels), "the scan was changed")
        self.assertEqual(self._temporaries(), temporaries, "temporary files were left")
        self.delayDisplay("Test passed")

    def _segmentFromThePanel(self, widget: Any, volume: vtkMRMLScalarVolumeNode,
                             model: str) -> vtkMRMLTableNode:
        self.delayDisplay("Segmenting the phantom from the module panel")
        pn = widget._parameterNode
        pn.inputVolume = volume
        pn.brainMask = None
        pn.model = model
        pn.device = "cpu"
        pn.threshold = 0.5
        pn.show3D = True
        pn.rater = self.RATER
        widget.onSegmentButton()
        run = widget._run
        self.assertIsNotNone(run, widget.ui.statusLabel.text)
        self._waitFor(lambda: widget._run is None, "the run to finish")
        self.assertEqual(run.status, "done", run.errorMessage)
        self.assertFalse(os.path.exists(run.tempDir))
        self.assertTrue(widget.ui.statusLabel.text.startswith(
            "3 microbleeds found (network run on CPUExecutionProvider)."), widget.ui.statusLabel.text)

        segmentationNode = pn.outputSegmentation
        table = pn.findingsTable
        self.assertIsNone(segmentationNode.GetStorageNode(), "the result still points to the temporary folder")
        self.assertEqual((segmentationNode.GetID(), table.GetID()), (run.segmentationNode.GetID(), run.tableNode.GetID()))
        self.assertEqual(widget.ui.findingsTableView.mrmlTableNode().GetID(), table.GetID())
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(self.CMB_CENTRES))
        expected = np.array(self.CMB_CENTRES)
        for index in range(segmentation.GetNumberOfSegments()):
            centre = np.array(segmentationNode.GetSegmentCenterRAS(segmentation.GetNthSegmentID(index)))
            self.assertLess(np.linalg.norm(expected - centre, axis=1).min(), 1.5)
        rows = self._rows(table)
        self.assertEqual([row["cmb_id"] for row in rows], [1, 2, 3])
        for row in rows:
            centre = np.array([row["r"], row["a"], row["s"]])
            self.assertLess(np.linalg.norm(centre - expected[row["cmb_id"] - 1]), 1.5)
            self.assertEqual(row["status"], "unreviewed")
            self.assertGreater(row["max_prob"], 0.5)
        return table

    def _selectRows(self, widget: Any, table: vtkMRMLTableNode) -> None:
        self.delayDisplay("Selecting a row centres the slice views on its CMB and selects its segment")
        view = widget.ui.findingsTableView
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        layoutManager = slicer.app.layoutManager()
        red = layoutManager.sliceWidget("Red") if layoutManager is not None else None  # axial by default
        for viewRow in range(table.GetNumberOfRows()):
            view.selectRow(viewRow)
            slicer.app.processEvents()
            row = view.sortFilterProxyModel().mapToSource(view.selectionModel().currentIndex()).row()
            cells = self._rows(table)[row]
            self.assertEqual(editor.currentSegmentID(), f"CMB_{cells['cmb_id']}")
            if red is not None:
                self.assertAlmostEqual(red.sliceLogic().GetSliceOffset(), cells["s"], delta=0.01)

    def _correct(self, widget: Any, table: vtkMRMLTableNode) -> None:
        from SHIVACMBLib.segfile import ID_TAG, STATUS_TAG

        segmentationNode = widget._parameterNode.outputSegmentation
        segmentation = segmentationNode.GetSegmentation()

        self.delayDisplay("Deleting the segment of CMB 2 rejects it (the table follows by itself)")
        segmentation.RemoveSegment("CMB_2")
        self._waitFor(lambda: self._row(table, 2)["status"] == "rejected", "CMB 2 to be rejected")
        self.assertEqual(self._row(table, 2)["note"], "segment deleted")

        self.delayDisplay("Adding a segment for a missed CMB adds a row (the table follows by itself)")
        sphere = vtk.vtkSphereSource()
        sphere.SetCenter(*self.MISSED_CENTRE)
        sphere.SetRadius(self.CMB_RADIUS)
        sphere.SetPhiResolution(24)
        sphere.SetThetaResolution(24)
        sphere.Update()
        segmentId = segmentationNode.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "missed",
                                                                               [1.0, 1.0, 0.0])
        self._waitFor(lambda: table.GetNumberOfRows() == 4, "the added CMB to be listed")
        added = self._row(table, 4)
        self.assertEqual(added["status"], "added")
        centre = np.array([added["r"], added["a"], added["s"]])
        self.assertLess(np.linalg.norm(centre - np.array(self.MISSED_CENTRE)), 1.0)
        self.assertAlmostEqual(added["volume_mm3"], 4.0 / 3.0 * np.pi * self.CMB_RADIUS ** 3, delta=30.0)
        self.assertTrue(np.isnan(added["max_prob"]))
        segment = segmentation.GetSegment(segmentId)
        self.assertEqual(ResultNodes.segmentTag(segment, ID_TAG), "4")
        self.assertEqual(ResultNodes.segmentTag(segment, STATUS_TAG), "added")
        self.assertEqual(segment.GetName(), "CMB 4")

        self.delayDisplay("A status typed in the table is kept; a measured cell is put back")
        row = next(index for index, cells in enumerate(self._rows(table)) if cells["cmb_id"] == 1)
        statusColumn = table.GetColumnIndex("status")
        table.SetCellText(row, statusColumn, "def")
        self._waitFor(lambda: table.GetCellText(row, statusColumn) == "definite", "the status to read 'definite'")
        volumeColumn = table.GetColumnIndex("volume_mm3")
        volumeText = table.GetCellText(row, volumeColumn)
        table.SetCellText(row, volumeColumn, "999")
        self._waitFor(lambda: table.GetCellText(row, volumeColumn) == volumeText, "the volume to be put back")
        self.assertIn("only the status, rater and note", widget.ui.statusLabel.text)

        self.delayDisplay("Update table")
        widget.onUpdateTable()
        self.assertEqual(widget.ui.statusLabel.text, "3 microbleeds (3 found by the run, 1 added, 1 rejected).")
        self.assertEqual([r["status"] for r in self._rows(table)], ["definite", "rejected", "unreviewed", "added"])

    def _save(self, widget: Any, table: vtkMRMLTableNode, parent: str) -> None:
        import json

        from SHIVACMBLib.slicerside.corrections import SAVED_FILES
        from SHIVACMBLib.findings import read_tsv
        from SHIVACMBLib.segfile import ID_TAG, STATUS_TAG, read_seg_nrrd

        self.delayDisplay("Saving the corrected results")
        self.assertIsNotNone(widget.saveResultsTo(parent))
        folder = os.path.join(parent, slicerbridge.scan_id_for("SHIVACMB phantom"))
        self.assertEqual(sorted(os.listdir(folder)), sorted(SAVED_FILES))
        findings = read_tsv(os.path.join(folder, "findings.tsv"))
        self.assertEqual([(f.cmb_id, f.status, f.rater) for f in findings],
                         [(1, "definite", self.RATER), (2, "rejected", self.RATER), (3, "unreviewed", "n/a"),
                          (4, "added", self.RATER)])
        labels, _, segments = read_seg_nrrd(os.path.join(folder, "cmb.seg.nrrd"))
        self.assertEqual([s["tags"][ID_TAG] for s in segments], ["1", "3", "4"])
        self.assertEqual([s["tags"][STATUS_TAG] for s in segments], ["definite", "unreviewed", "added"])
        for finding in findings:
            self.assertEqual(int((labels == finding.cmb_id).sum()), 0 if finding.cmb_id == 2 else finding.voxels)
        with open(os.path.join(folder, "corrections.json"), encoding="utf-8") as stream:
            record = json.load(stream)
        self.assertEqual(record["who"], self.RATER)
        self.assertEqual([(c["change"], c["cmb_id"]) for c in record["changes"]],
                         [("status", 1), ("rejected", 2), ("added", 4)])
        self.assertEqual(record["scan"]["name"], "SHIVACMB phantom")
        self.assertEqual(record["source_run"]["model"]["name"], "phantom-blob-detector")
        self.assertEqual(self._row(table, 1)["rater"], self.RATER)

    def _show3D(self, widget: Any) -> None:
        self.delayDisplay("Show 3D")
        displayNode = widget._parameterNode.outputSegmentation.GetDisplayNode()
        widget.ui.show3DCheckBox.checked = False
        self.assertFalse(displayNode.GetVisibility3D())
        widget.ui.show3DCheckBox.checked = True
        self.assertTrue(displayNode.GetVisibility3D())

    def _segmentAgain(self, logic: Any, volume: vtkMRMLScalarVolumeNode, model: str,
                      table: vtkMRMLTableNode) -> None:
        self.delayDisplay("Segmenting again replaces the results, and only them")
        previous = [table, logic.findingsSegmentation(table)]
        again = logic.segment(volume, settings=ScanSettings(model=model, device="cpu", threshold=0.5, report=False))
        self.assertEqual({node.GetID() for node in logic.resultNodes(volume)},
                         {again.segmentationNode.GetID(), again.tableNode.GetID()})
        self.assertFalse(any(slicer.mrmlScene.IsNodePresent(node) for node in previous))
        self.assertTrue(slicer.mrmlScene.IsNodePresent(volume))

    # --- helpers ---------------------------------------------------------------------------

    def _waitFor(self, condition: Callable[[], bool], what: str) -> None:
        """Let the event loop run (timers, background reads) until ``condition()`` holds."""
        deadline = time.monotonic() + self.TIMEOUT_S
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            slicer.app.processEvents()
            time.sleep(0.02)

    @staticmethod
    def _rows(table: vtkMRMLTableNode) -> List[Dict[str, Any]]:
        return CorrectionsLogic.tableRows(table)

    def _row(self, table: vtkMRMLTableNode, cmbId: int) -> Dict[str, Any]:
        return next(row for row in self._rows(table) if row["cmb_id"] == cmbId)

    @staticmethod
    def _temporaries() -> List[str]:
        return sorted(name for name in os.listdir(slicer.app.temporaryPath) if name.startswith("SHIVACMB-"))

    def _phantomVolume(self) -> vtkMRMLScalarVolumeNode:
        """The phantom scan; i, j, k run to R, A, S and the grid is centred on RAS (0, 0, 0)."""
        spacing = np.array(self.SPACING)
        origin = -(np.array(self.SHAPE_IJK) - 1) / 2 * spacing
        k, j, i = np.indices(self.SHAPE_IJK[::-1], dtype=float)
        r, a, s = (origin[axis] + index * spacing[axis] for axis, index in enumerate((i, j, k)))
        tissue = 600.0
        voxels = np.full(r.shape, 15.0)
        voxels[(r / self.BRAIN_RADII[0]) ** 2 + (a / self.BRAIN_RADII[1]) ** 2
               + (s / self.BRAIN_RADII[2]) ** 2 <= 1] = tissue
        for cr, ca, cs in self.CMB_CENTRES:
            voxels[(r - cr) ** 2 + (a - ca) ** 2 + (s - cs) ** 2 <= self.CMB_RADIUS ** 2] = 0.15 * tissue
        voxels += np.random.default_rng(0).normal(0.0, 0.03 * tissue, voxels.shape)
        ijkToRAS = np.diag([*spacing, 1.0])
        ijkToRAS[:3, 3] = origin
        return slicer.util.addVolumeFromArray(voxels.astype(np.float32), ijkToRAS, "SHIVACMB phantom")

    def _phantomModel(self, parent: str) -> str:
        """A fixed-weight dark-blob detector model folder (needs the onnx package)."""
        from SHIVACMBLib.modelstore.blobmodel import write_model

        return str(write_model(os.path.join(parent, "phantom-blob-detector"), name="phantom-blob-detector",
                               shape=self.MODEL_BOX))
