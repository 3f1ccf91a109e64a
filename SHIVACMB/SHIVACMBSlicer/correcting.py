"""Corrections: segments added, deleted or painted in the Segment Editor, review cells typed in the findings
table, and saving the corrected results (SHIVACMBLib.slicerside.corrections does the work)."""

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode

from SHIVACMBLib.findings import Finding
from SHIVACMBLib.slicerside import slicerbridge

from .nodes import TITLE


class SHIVACMBUpdate:
    """The findings of a table brought up to date with its segmentation (CorrectionsLogic.updateFindings)."""

    def __init__(self, correction: Any, labels: Optional[np.ndarray], grid: Any, state: Any) -> None:
        from SHIVACMBLib.slicerside import corrections

        self.correction = correction  # corrections.Correction
        self.labels = labels  # exported label map, [k, j, i] on the scan's grid (None: measured segment by segment)
        self.grid = grid  # geometry.Geometry of the scan
        self.state = state  # corrections.RunState
        self.counts = corrections.summarize(state.findings, correction.findings)


class CorrectionsLogic:
    """Turns edits into corrected findings and saves them (a mixin of SHIVACMBLogic).

    The findings table keeps, as attributes, the run's own findings and voxels
    (RUN_STATE_ATTRIBUTE) and the findings shown (FINDINGS_ATTRIBUTE), so that corrections
    survive saving and reloading the scene. The voxels of each segment as last measured are kept
    per table (``_segmentVoxels``): a segment added or deleted is then measured alone, in its own
    bounding box, instead of exporting every segment over the whole scan grid.
    """

    def hasRunState(self, tableNode: Optional[vtkMRMLTableNode]) -> bool:
        return tableNode is not None and bool(tableNode.GetAttribute(self.RUN_STATE_ATTRIBUTE))

    def runState(self, tableNode: vtkMRMLTableNode) -> Any:
        """The run's own findings and voxels kept with a findings table (corrections.RunState)."""
        from SHIVACMBLib.slicerside import corrections

        text = tableNode.GetAttribute(self.RUN_STATE_ATTRIBUTE)
        if not text:
            raise RuntimeError(f"'{tableNode.GetName()}' holds no SHIVA-CMB run record (it was made by an older "
                               "version of the module): segment the scan again to correct its findings.")
        return corrections.RunState.from_json(text)

    def shownFindings(self, tableNode: vtkMRMLTableNode) -> List[Finding]:
        """The findings the table was last filled with (review edits included once applied)."""
        from SHIVACMBLib.slicerside import corrections

        text = tableNode.GetAttribute(self.FINDINGS_ATTRIBUTE)
        return corrections.findings_from_json(text) if text else list(self.runState(tableNode).findings)

    @staticmethod
    def tableRows(tableNode: vtkMRMLTableNode) -> List[Dict[str, Any]]:
        """The table's cells, row by row, by column name (numbers as numbers)."""
        table = tableNode.GetTable()
        rows: List[Dict[str, Any]] = [{} for _ in range(table.GetNumberOfRows())]
        for column in slicerbridge.TABLE_COLUMNS:
            array = table.GetColumnByName(column.name)
            if array is None:
                continue  # a missing column reads as an edit and is restored
            for index, row in enumerate(rows):
                row[column.name] = array.GetValue(index)
        return rows

    def applyTableEdits(self, tableNode: vtkMRMLTableNode) -> Any:
        """Take the status, rater and note cells edited in the table (corrections.apply_review_edits).

        Edits that are not allowed are put back; the returned ReviewEdit says why.
        """
        from SHIVACMBLib.slicerside import corrections

        shown = self.shownFindings(tableNode)
        edit = corrections.apply_review_edits(shown, self.tableRows(tableNode), self.runState(tableNode).ids)
        # A paste into the table view may also have added columns (qMRMLTableView::pasteSelection).
        if edit.restore or tableNode.GetNumberOfColumns() != len(slicerbridge.TABLE_COLUMNS):
            self.showFindings(tableNode, edit.findings)
        elif edit.findings != shown:
            tableNode.SetAttribute(self.FINDINGS_ATTRIBUTE, corrections.findings_to_json(edit.findings))
        return edit

    def updateFindings(self, tableNode: vtkMRMLTableNode) -> SHIVACMBUpdate:
        """Measure every segment of the table's segmentation again and show the corrected findings
        (corrections.correct); painted voxels count from here on.

        Segments found to be new CMBs get their SHIVACMB.cmb_id tag and the name "CMB <id>";
        every CMB segment's SHIVACMB.status tag follows its status.
        """
        from SHIVACMBLib.slicerside import corrections

        segmentationNode, volumeNode = self._correctedNodes(tableNode)
        labels, grid, segments = self.exportLabelMap(segmentationNode, volumeNode)
        voxels = corrections.label_voxels(labels, grid)
        self.rememberVoxels(tableNode, segments, voxels)
        return self._correct(tableNode, segmentationNode, segments, voxels, labels, grid)

    def updateAddedOrRemoved(self, tableNode: vtkMRMLTableNode) -> SHIVACMBUpdate:
        """:meth:`updateFindings` for segments added or deleted since the last measurement: only segments new
        (or empty when last measured) are measured, each in its own bounding box; the others keep the voxels
        they were last measured with. Without such a measurement, every segment is measured."""
        segmentationNode, volumeNode = self._correctedNodes(tableNode)
        known = self._segmentVoxels.get(tableNode.GetID())
        if known is None:
            return self.updateFindings(tableNode)
        grid = self.scanGrid(volumeNode)
        segments = self.segmentRecords(segmentationNode)
        current = {s.segment_id: known[s.segment_id] if known.get(s.segment_id) is not None
                   else self.exportSegment(segmentationNode, volumeNode, s.segment_id, grid) for s in segments}
        self._segmentVoxels[tableNode.GetID()] = current
        voxels = {s.label: current[s.segment_id] for s in segments if current[s.segment_id] is not None}
        return self._correct(tableNode, segmentationNode, segments, voxels, None, grid)

    def _correctedNodes(self, tableNode: vtkMRMLTableNode) -> Tuple[vtkMRMLSegmentationNode, vtkMRMLScalarVolumeNode]:
        segmentationNode = self.findingsSegmentation(tableNode)
        volumeNode = self.findingsVolume(tableNode)
        if segmentationNode is None or volumeNode is None:
            raise RuntimeError("The scan or the segmentation of these findings is no longer in the scene.")
        self.applyTableEdits(tableNode)
        return segmentationNode, volumeNode

    def _correct(self, tableNode: vtkMRMLTableNode, segmentationNode: vtkMRMLSegmentationNode,
                 segments: Sequence[Any], voxels: Dict[int, Any], labels: Optional[np.ndarray],
                 grid: Any) -> SHIVACMBUpdate:
        from SHIVACMBLib.slicerside import corrections

        state = self.runState(tableNode)
        correction = corrections.correct_voxels(state, self.shownFindings(tableNode), segments, voxels)
        self._tagSegments(segmentationNode, correction)
        self.showFindings(tableNode, correction.findings)
        return SHIVACMBUpdate(correction, labels, grid, state)

    def rememberVoxels(self, tableNode: vtkMRMLTableNode, segments: Sequence[Any], voxels: Dict[int, Any]) -> None:
        """Keep each segment's LabelVoxels (by label) as measured now, for :meth:`updateAddedOrRemoved`."""
        self._segmentVoxels[tableNode.GetID()] = {s.segment_id: voxels.get(s.label) for s in segments}

    def forgetVoxels(self) -> None:
        """The scene was closed: its tables are gone."""
        self._segmentVoxels.clear()

    def _tagSegments(self, segmentationNode: vtkMRMLSegmentationNode, correction: Any) -> None:
        from SHIVACMBLib.segfile import ID_TAG, STATUS_TAG, segment_name

        statuses = {f.cmb_id: f.status for f in correction.findings}
        segmentation = segmentationNode.GetSegmentation()
        for segmentId, cmbId in correction.segment_cmb_ids.items():
            segment = segmentation.GetSegment(segmentId)
            if self.segmentTag(segment, ID_TAG) != str(cmbId):
                segment.SetTag(ID_TAG, str(cmbId))
            if segmentId in correction.new_tags:
                segment.SetName(segment_name(cmbId))
            if self.segmentTag(segment, STATUS_TAG) != statuses[cmbId]:
                segment.SetTag(STATUS_TAG, statuses[cmbId])

    def saveResults(self, tableNode: vtkMRMLTableNode, folder: str, rater: str) -> Any:
        """Update the findings, then write cmb.seg.nrrd, findings.tsv and corrections.json into ``folder``, and
        cmb.seg.dcm and cmb.sr.dcm when the scan was loaded from DICOM.

        Returns corrections.Saved; the table then shows the findings as saved (raters named).
        """
        from SHIVACMBLib.slicerside import corrections

        update = self.updateFindings(tableNode)
        volumeNode = self.findingsVolume(tableNode)
        scan = {"name": volumeNode.GetName(), "file": self.scanFile(volumeNode)}
        saved = corrections.save(folder, update.labels, update.grid, update.state, update.correction, rater,
                                 scan=scan, host=f"3D Slicer {slicer.app.applicationVersion}",
                                 dicom_files=self.dicomFiles(volumeNode))
        self.showFindings(tableNode, saved.findings)
        return saved

    @staticmethod
    def dicomFiles(volumeNode: vtkMRMLScalarVolumeNode) -> Optional[List[str]]:
        """The DICOM files a volume was loaded from (its DICOM.instanceUIDs in Slicer's DICOM database), or None
        when it was not loaded from DICOM or its files are no longer in the database."""
        uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
        database = getattr(slicer, "dicomDatabase", None)
        if not uids or database is None:
            return None
        files = [database.fileForInstance(uid) for uid in uids]
        return files if all(files) else None

    @staticmethod
    def sendResults(folder: str, destination: str) -> str:
        """Send the DICOM results saved in ``folder`` to ``destination`` (a DICOMweb URL or HOST:PORT:AET; what
        it has received before is not sent again); what was sent, in words."""
        from SHIVACMBLib.dicomsend import parse_destination, send_results

        where = parse_destination(destination)
        return send_results(folder, where).summary(where)

    @staticmethod
    def defaultRater() -> str:
        from SHIVACMBLib.slicerside import corrections

        return corrections.who_default()

    def segmentRecords(self, segmentationNode: vtkMRMLSegmentationNode) -> list:
        """Every segment in order (corrections.SegmentRecord); label n is the n-th segment, as exported."""
        from SHIVACMBLib.segfile import ID_TAG
        from SHIVACMBLib.slicerside.corrections import SegmentRecord, tag_cmb_id

        segmentation = segmentationNode.GetSegmentation()
        records = []
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            segment = segmentation.GetSegment(segmentId)
            records.append(SegmentRecord(segmentId, index + 1, tag_cmb_id(self.segmentTag(segment, ID_TAG)),
                                         segment.GetName()))
        return records

    @staticmethod
    def scanGrid(volumeNode: vtkMRMLScalarVolumeNode) -> Any:
        """The scan's grid (geometry.Geometry, in the scan's own coordinates, as findings are)."""
        from SHIVACMBLib.geometry import Geometry

        imageData = volumeNode.GetImageData()
        extent = imageData.GetExtent()
        if extent[0] != 0 or extent[2] != 0 or extent[4] != 0:
            raise RuntimeError(f"'{volumeNode.GetName()}' has an image extent that does not start at 0.")
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        ijkToLPS = np.diag([-1.0, -1.0, 1.0, 1.0]) @ slicer.util.arrayFromVTKMatrix(ijkToRAS)
        return Geometry.from_matrix(imageData.GetDimensions(), ijkToLPS)

    def exportLabelMap(self, segmentationNode: vtkMRMLSegmentationNode,
                       volumeNode: vtkMRMLScalarVolumeNode) -> Tuple[np.ndarray, Any, list]:
        """Every segment as its own label value (n for the n-th segment) on the scan's grid.

        Returns the label map ([k, j, i] numpy array), the scan's grid and the segments (segmentRecords).
        """
        records = self.segmentRecords(segmentationNode)
        grid = self.scanGrid(volumeNode)
        if not records:
            return np.zeros(grid.array_shape, np.int16), grid, records
        labels, extent = self._merged(segmentationNode, volumeNode, [r.segment_id for r in records],
                                      slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        if labels is None or tuple(extent) != tuple(volumeNode.GetImageData().GetExtent()):
            raise RuntimeError(f"The segments of '{segmentationNode.GetName()}' could not be exported on the grid "
                               f"of '{volumeNode.GetName()}'.")
        return labels.copy(), grid, records

    def exportSegment(self, segmentationNode: vtkMRMLSegmentationNode, volumeNode: vtkMRMLScalarVolumeNode,
                      segmentId: str, grid: Any) -> Any:
        """One segment's corrections.LabelVoxels on the scan's grid, exported in its own bounding box (None when
        it has no voxel)."""
        from SHIVACMBLib.slicerside import corrections

        labels, extent = self._merged(segmentationNode, volumeNode, [segmentId],
                                      slicer.vtkSegmentation.EXTENT_UNION_OF_EFFECTIVE_SEGMENTS)
        if labels is None:
            return None
        return corrections.box_voxels(labels > 0, (extent[4], extent[2], extent[0]), grid)

    @staticmethod
    def _merged(segmentationNode: vtkMRMLSegmentationNode, volumeNode: vtkMRMLScalarVolumeNode,
                segmentIds: Sequence[str], extentMode: int) -> Tuple[Optional[np.ndarray], Tuple[int, ...]]:
        """The segments as label values (n for the n-th ID) on the volume's grid, over ``extentMode``'s extent:
        ([k, j, i] view of the exported image, or None when it is empty; its extent in volume IJK)."""
        from vtk.util import numpy_support

        # What vtkSlicerSegmentationsModuleLogic::ExportSegmentsToLabelmapNode does (Slicer v5.8.1,
        # Modules/Loadable/Segmentations/Logic/vtkSlicerSegmentationsModuleLogic.cxx, lines 1049-1116):
        # make sure the binary labelmap exists, then GenerateMergedLabelmapInReferenceGeometry with the
        # reference volume (same file, lines 993-1046; declared public in the .h, lines 444-452). That
        # resamples into the volume's geometry when the segmentation is under another transform; the
        # extent is the volume's (EXTENT_REFERENCE_GEOMETRY) or the segments' own
        # (EXTENT_UNION_OF_EFFECTIVE_SEGMENTS), in the volume's IJK. Label values: the n-th of the
        # segment IDs gets n (Libs/vtkSegmentationCore/vtkSegmentation.cxx, GenerateMergedLabelmap,
        # lines 1637-1703: "labelValue = backgroundColorIndex + 1 + segmentIndex"), voxels are VTK_SHORT,
        # and where segments overlap the later one wins. Calling it directly, rather than
        # ExportSegmentsToLabelmapNode or slicer.util.arrayFromSegmentBinaryLabelmap, adds no labelmap
        # and no colour table node to the scene (ExportSegmentsToLabelmapNode adds a colour table).
        segmentation = segmentationNode.GetSegmentation()
        if not segmentation.CreateRepresentation(
                slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()):
            raise RuntimeError(f"'{segmentationNode.GetName()}' has no binary labelmap representation.")
        ids = vtk.vtkStringArray()
        for segmentId in segmentIds:
            ids.InsertNextValue(segmentId)
        merged = slicer.vtkOrientedImageData()
        slicer.vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
            segmentationNode, volumeNode, ids, extentMode, merged)
        extent = tuple(merged.GetExtent())
        scalars = merged.GetPointData().GetScalars() if merged.GetPointData() is not None else None
        if scalars is None or extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
            return None, extent
        shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
        return numpy_support.vtk_to_numpy(scalars).reshape(shape), extent


class CorrectionsSection:
    """The panel's Update table and Save results, and the edits it follows (a mixin of SHIVACMBWidget)."""

    AUTO_UPDATE_DELAY_MS = 300  # one table update for a burst of segments added or removed

    def _followSelectedResult(self) -> None:
        """Show the selected findings table's segmentation, and observe both for corrections."""
        pn = self._parameterNode
        table = pn.findingsTable if pn else None
        segmentation = self.logic.findingsSegmentation(table)
        if pn and segmentation is not None and pn.outputSegmentation is not segmentation:
            pn.outputSegmentation = segmentation
        if pn or table is not None:
            self._observeResult(table, segmentation)

    def _observeResult(self, table: Optional[vtkMRMLTableNode],
                       segmentation: Optional[vtkMRMLSegmentationNode]) -> None:
        """Observe review edits in ``table`` and segments added, removed or painted in ``segmentation``."""
        if table is not self._observedTable:
            if self._observedTable is not None:
                self.removeObserver(self._observedTable, vtk.vtkCommand.ModifiedEvent, self.onFindingsTableModified)
            self._observedTable = table
            if table is not None:
                self.addObserver(table, vtk.vtkCommand.ModifiedEvent, self.onFindingsTableModified)
        # The segmentation node passes on its vtkSegmentation's events (vtkMRMLSegmentationNode.cxx,
        # SegmentationModifiedCallback), also after its vtkSegmentation object was replaced.
        events = ((slicer.vtkSegmentation.SegmentAdded, self.onSegmentsAddedOrRemoved),
                  (slicer.vtkSegmentation.SegmentRemoved, self.onSegmentsAddedOrRemoved),
                  (slicer.vtkSegmentation.SourceRepresentationModified, self.onSegmentsPainted))
        if segmentation is not self._observedSegmentation:
            if self._observedSegmentation is not None:
                for event, method in events:
                    self.removeObserver(self._observedSegmentation, event, method)
            self._observedSegmentation = segmentation
            if segmentation is not None:
                for event, method in events:
                    self.addObserver(segmentation, event, method)

    def onFindingsTableModified(self, caller: Any = None, event: Any = None) -> None:
        # Read the edit once the table model has finished writing it.
        if not self._tableEditPending:
            self._tableEditPending = True
            qt.QTimer.singleShot(0, self._applyTableEdits)

    def _applyTableEdits(self) -> None:
        self._tableEditPending = False
        table = self._observedTable
        if table is None or not slicer.mrmlScene.IsNodePresent(table) or not self.logic.hasRunState(table):
            return
        try:
            edit = self.logic.applyTableEdits(table)
        except Exception:
            logging.exception("SHIVA-CMB: the table edit could not be read")
            return
        if edit.problems:
            self.ui.statusLabel.text = "\n".join(edit.problems)

    def onSegmentsAddedOrRemoved(self, caller: Any = None, event: Any = None) -> None:
        if not self._autoUpdatePending:
            self._autoUpdatePending = True
            qt.QTimer.singleShot(self.AUTO_UPDATE_DELAY_MS, self._autoUpdate)

    def _autoUpdate(self) -> None:
        from SHIVACMBLib.slicerside import corrections

        self._autoUpdatePending = False
        table = self._observedTable
        if (self._run is not None or table is None or not slicer.mrmlScene.IsNodePresent(table)
                or not self.logic.hasRunState(table)):
            return
        try:
            update = self.logic.updateAddedOrRemoved(table)
        except Exception:
            logging.exception("SHIVA-CMB: the findings could not be updated")
            return
        self.ui.statusLabel.text = corrections.summary_text(update.counts)

    def onSegmentsPainted(self, caller: Any = None, event: Any = None) -> None:
        self.ui.statusLabel.text = "The segments were edited: click 'Update table' to measure them again."

    def onUpdateTable(self) -> None:
        from SHIVACMBLib.slicerside import corrections

        if self._observedTable is None:
            return
        with slicer.util.tryWithErrorDisplay("The findings could not be updated.", waitCursor=True):
            update = self.logic.updateFindings(self._observedTable)
            self.ui.statusLabel.text = corrections.summary_text(update.counts)

    def onSaveResults(self) -> None:
        table = self._observedTable
        volume = self.logic.findingsVolume(table)
        if volume is None:
            return
        start = slicerbridge.default_save_parent(self.logic.scanFile(volume), self._parameterNode.saveFolder
                                                 if self._parameterNode else "")
        parent = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), f"Save the results of '{volume.GetName()}' in a folder inside...", start)
        if not parent:
            return
        if self._parameterNode:
            self._parameterNode.saveFolder = parent
        self.saveResultsTo(parent)

    def saveResultsTo(self, parent: str) -> Any:
        """Save the selected findings' corrected results into ``<parent>/<scan id>``; what was saved, or None."""
        from SHIVACMBLib.dicomout import DICOM_NAMES
        from SHIVACMBLib.slicerside import corrections

        table = self._observedTable
        volume = self.logic.findingsVolume(table)
        folder = slicerbridge.result_folder(parent, volume.GetName())
        existing = slicerbridge.existing_results(folder, corrections.SAVED_FILES + DICOM_NAMES)
        if existing and not slicer.util.confirmOkCancelDisplay(
                f"{folder} already holds {', '.join(existing)}. Replace them?", windowTitle=TITLE):
            return None
        rater = (self._parameterNode.rater.strip() if self._parameterNode else "") or self.logic.defaultRater()
        with slicer.util.tryWithErrorDisplay("The results could not be saved.", waitCursor=True):
            saved = self.logic.saveResults(table, str(folder), rater)
        lines = [corrections.summary_text(saved.record["summary"]), f"Saved in {folder} ({', '.join(saved.files)})."]
        if saved.dicom_problem:
            lines.append(f"No DICOM results: {saved.dicom_problem}")
        self.ui.statusLabel.text = "\n".join(lines)
        destination = self._parameterNode.sendTo.strip() if self._parameterNode else ""
        if destination and any(name.endswith(".dcm") for name in saved.files):
            with slicer.util.tryWithErrorDisplay("The results were saved, but not sent.", waitCursor=True):
                sent = self.logic.sendResults(str(folder), destination)
            self.ui.statusLabel.text += f"\n{sent}."
        return saved
