"""Segmenting a scan (`shivacmb segment` in the background) and showing its results: segments and findings."""

import logging
import os
from typing import Callable, List, Optional, Sequence, Tuple

import slicer
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode

from SHIVACMBLib.findings import Finding
from SHIVACMBLib.settings import ScanSettings
from SHIVACMBLib.slicerside import slicerbridge

from .command import Exports, SHIVACMBCommand
from .nodes import TITLE, selectedRow
from .parameters import scanSettings


class SHIVACMBRun(SHIVACMBCommand):
    """One `shivacmb segment` run on one scan, from start to loaded results.

    Besides ``onFinished(run)``, ``onProgress(fraction, message)`` is called in the main thread.
    """

    def __init__(self, logic: "SegmentLogic", inputVolume: vtkMRMLScalarVolumeNode, tempDir: str,
                 process: slicerbridge.ChildProcess, fileNames: dict,
                 onProgress: Optional[Callable[[float, str], None]] = None,
                 onFinished: Optional[Callable[["SHIVACMBRun"], None]] = None, show3D: bool = True) -> None:
        super().__init__(process, tempDir, onFinished)
        self.logic = logic
        self.inputVolume = inputVolume
        self.fileNames = fileNames  # temporary file path -> what the user calls it
        self.onProgress = onProgress
        self.show3D = show3D
        self.monitor = slicerbridge.RunMonitor()
        self.segmentationNode: Optional[vtkMRMLSegmentationNode] = None
        self.tableNode: Optional[vtkMRMLTableNode] = None

    @property
    def summary(self) -> Optional[slicerbridge.RunSummary]:
        return self.monitor.summary

    def _onLine(self, line: str) -> None:
        progress = self.monitor.feed(line)
        if progress is None:
            logging.info(line)
        elif self.onProgress is not None:
            self.onProgress(progress["fraction"], progress["message"] or progress["stage"])

    def _finished(self, returncode: int) -> None:
        self.status = self.monitor.outcome(returncode, self.process.cancel_requested)
        if self.status == "failed":
            self.errorMessage = self.monitor.failure_message(returncode, self.fileNames)
        if self.status != "done":
            return
        try:
            # A relative output path would be relative to the child's working directory.
            self._load(os.path.join(self.logic.moduleDirectory(), self.summary.output))
        except Exception as err:
            logging.exception("SHIVA-CMB results could not be loaded")
            self.status = "failed"
            self.errorMessage = f"The results could not be loaded: {err}"

    def _load(self, resultFolder: str) -> None:
        self.segmentationNode, self.tableNode = self.logic.loadResults(self.inputVolume, resultFolder,
                                                                       show3D=self.show3D)


class SegmentLogic:
    """Runs `shivacmb segment` on a scan node and loads its results (a mixin of SHIVACMBLogic)."""

    def startSegmentation(self, inputVolume: vtkMRMLScalarVolumeNode,
                          brainMask: Optional[vtkMRMLLabelMapVolumeNode] = None,
                          settings: ScanSettings = ScanSettings(report=False),
                          onProgress: Optional[Callable[[float, str], None]] = None,
                          onFinished: Optional[Callable[[SHIVACMBRun], None]] = None,
                          show3D: bool = True) -> SHIVACMBRun:
        """Start segmenting ``inputVolume`` in the background; ``onFinished(run)`` is called at the end."""
        run = self._startSegmentation(inputVolume, brainMask, settings, onProgress, onFinished, show3D)
        run.startPolling()
        return run

    def segment(self, inputVolume: vtkMRMLScalarVolumeNode, brainMask: Optional[vtkMRMLLabelMapVolumeNode] = None,
                settings: ScanSettings = ScanSettings(report=False), show3D: bool = True) -> SHIVACMBRun:
        """Segment ``inputVolume`` and wait for the results; raises RuntimeError when the run fails."""
        run = self._startSegmentation(inputVolume, brainMask, settings, None, None, show3D)
        run.wait()
        if run.status != "done":
            raise RuntimeError(run.errorMessage or f"The segmentation was {run.status}.")
        return run

    def _startSegmentation(self, inputVolume: vtkMRMLScalarVolumeNode,
                           brainMask: Optional[vtkMRMLLabelMapVolumeNode], settings: ScanSettings,
                           onProgress: Optional[Callable[[float, str], None]],
                           onFinished: Optional[Callable[[SHIVACMBRun], None]], show3D: bool) -> SHIVACMBRun:
        if inputVolume is None or inputVolume.GetImageData() is None:
            raise ValueError("Select a scan with image data.")

        def prepare(python: str, exports: Exports) -> List[str]:
            inputPath = exports.volume(inputVolume, "input.nrrd", "scan")
            maskPath = exports.volume(brainMask, "mask.nrrd", "brain mask") if brainMask is not None else None
            return slicerbridge.segment_command(python, inputPath, os.path.join(exports.folder, "output"), settings,
                                                slicerbridge.scan_id_for(inputVolume.GetName()), maskPath)

        return self.startCommand("run", prepare, lambda tempDir, process, fileNames: SHIVACMBRun(
            self, inputVolume, tempDir, process, fileNames, onProgress, onFinished, show3D))

    def loadResults(self, inputVolume: vtkMRMLScalarVolumeNode, resultFolder: str,
                    show3D: bool = True) -> Tuple[vtkMRMLSegmentationNode, vtkMRMLTableNode]:
        """Load cmb.seg.nrrd and findings.tsv for ``inputVolume``; they replace its previous results."""
        from SHIVACMBLib.pipeline import FINDINGS_NAME, RUN_NAME, SEGMENTATION_NAME
        from SHIVACMBLib.slicerside import corrections

        if not slicer.mrmlScene.IsNodePresent(inputVolume):
            raise RuntimeError(f"the scan '{inputVolume.GetName()}' was removed from the scene during the run")
        previous = self.resultNodes(inputVolume)
        segmentationNode = self.loadSegmentation(os.path.join(resultFolder, SEGMENTATION_NAME), inputVolume, show3D)
        try:
            # The voxels of each CMB as Slicer holds them: later edits are found by comparing with these.
            labels, grid, segments = self.exportLabelMap(segmentationNode, inputVolume)
            voxels = corrections.label_voxels(labels, grid)
            del labels
            runPath = os.path.join(resultFolder, RUN_NAME)
            fingerprints = corrections.fingerprints_by_cmb({label: v.fingerprint for label, v in voxels.items()},
                                                           segments)
            state = corrections.RunState.from_files(os.path.join(resultFolder, FINDINGS_NAME),
                                                    runPath if os.path.isfile(runPath) else None, fingerprints)
            tableNode = self.createFindingsTable(state, inputVolume, segmentationNode)
            self.rememberVoxels(tableNode, segments, voxels)
        except Exception:
            slicer.mrmlScene.RemoveNode(segmentationNode)
            raise
        for node in previous:
            slicer.mrmlScene.RemoveNode(node)
        return segmentationNode, tableNode

    def createFindingsTable(self, state, inputVolume: vtkMRMLScalarVolumeNode,
                            segmentationNode: vtkMRMLSegmentationNode) -> vtkMRMLTableNode:
        """A table node of the run's findings (state: corrections.RunState), linked to the scan and segmentation."""
        name = slicer.mrmlScene.GenerateUniqueName(f"{inputVolume.GetName()} CMB findings")
        tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", name)
        tableNode.SetAttribute(self.RUN_STATE_ATTRIBUTE, state.to_json())
        self.showFindings(tableNode, state.findings)
        tableNode.SetNodeReferenceID(self.SEGMENTATION_ROLE, segmentationNode.GetID())
        self.markResult(tableNode, self.FINDINGS_RESULT, inputVolume)
        return tableNode

    def showFindings(self, tableNode: vtkMRMLTableNode, findings: Sequence[Finding]) -> None:
        """Keep ``findings`` as the table's findings and show them, one typed column per findings.tsv column."""
        from SHIVACMBLib.slicerside import corrections

        wasModified = tableNode.StartModify()
        tableNode.SetAttribute(self.FINDINGS_ATTRIBUTE, corrections.findings_to_json(findings))
        self.fillTable(tableNode, slicerbridge.TABLE_COLUMNS, [slicerbridge.finding_row(f) for f in findings])
        # Editable, for the review columns; edits to other cells are put back (applyTableEdits).
        tableNode.SetLocked(False)
        tableNode.EndModify(wasModified)

    def jumpToFinding(self, tableNode: vtkMRMLTableNode,
                      row: int) -> Tuple[Optional[vtkMRMLSegmentationNode], Optional[str]]:
        """Centre every slice view on the finding of a table row; its segmentation node and segment ID."""
        from SHIVACMBLib.slicerside.corrections import segment_for_cmb

        cells = self.tableRows(tableNode)[row]
        position = self.worldPosition(self.findingsVolume(tableNode), [float(cells[name]) for name in ("r", "a", "s")])
        slicer.modules.markups.logic().JumpSlicesToLocation(position[0], position[1], position[2], True)
        segmentationNode = self.findingsSegmentation(tableNode)
        if segmentationNode is None:
            return None, None
        return segmentationNode, segment_for_cmb(self.segmentRecords(segmentationNode), int(cells["cmb_id"]))


class SegmentSection:
    """The panel's Segment/Cancel button, progress, and the findings table's navigation (a mixin of
    SHIVACMBWidget)."""

    def _updateButtons(self) -> None:
        """Segment/Cancel, Install, Update table and Save buttons for the current state."""
        self.ui.installPackagesButton.visible = bool(self._missingPackages)
        self.ui.installPackagesButton.enabled = self._install is None
        table = self._observedTable
        correctable = self._run is None and table is not None and self.logic.hasRunState(table)
        self.ui.updateTableButton.enabled = correctable
        self.ui.saveResultsButton.enabled = correctable
        button = self.ui.segmentButton
        if self._run is not None:
            button.text = "Cancel"
            button.toolTip = "Stop the segmentation; nothing is changed in the scene."
            button.enabled = not self._run.cancelRequested
            return
        button.text = "Segment microbleeds"
        pn = self._parameterNode
        ready = bool(pn and pn.inputVolume and pn.model and not self._missingPackages and self._install is None)
        button.enabled = ready
        button.toolTip = ("Find the microbleeds of the scan in the background." if ready else
                          "Select a scan and a model (and install the Python packages) first.")

    def onSegmentButton(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self.ui.statusLabel.text = "Cancelling..."
            self._updateButtons()
            return
        pn = self._parameterNode
        volume = pn.inputVolume
        if self.logic.resultNodes(volume) and not slicer.util.confirmOkCancelDisplay(
                f"Segmenting '{volume.GetName()}' again replaces its microbleed segmentation and findings "
                "table, including any changes made to them.", windowTitle=TITLE):
            return
        with slicer.util.tryWithErrorDisplay("The segmentation could not be started.", waitCursor=True):
            self._run = self.logic.startSegmentation(volume, pn.brainMask, scanSettings(pn, report=False),
                                                     onProgress=self.onRunProgress, onFinished=self.onRunFinished,
                                                     show3D=pn.show3D)
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.statusLabel.text = "Starting..."
        self._updateButtons()

    def onRunProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message

    def onRunFinished(self, run: SHIVACMBRun) -> None:
        self._run = None
        self.ui.progressBar.hide()
        if run.status == "done":
            # The scene's parameter node, also when the module was left during the run.
            parameterNode = self.logic.getParameterNode()
            parameterNode.outputSegmentation = run.segmentationNode
            parameterNode.findingsTable = run.tableNode
            self.ui.statusLabel.text = slicerbridge.result_text(run.summary)
        elif run.status == "cancelled":
            self.ui.statusLabel.text = "Cancelled: nothing was changed."
        else:
            self.ui.statusLabel.text = run.errorMessage
            slicer.util.errorDisplay(run.errorMessage, windowTitle=TITLE, detailedText="\n".join(run.monitor.lines))
        self._updateButtons()

    def onShow3DToggled(self, checked: bool) -> None:
        if self._parameterNode:
            self.logic.setShow3D(self._parameterNode.outputSegmentation, checked)

    def onFindingSelected(self) -> None:
        """Show the selected microbleed in every slice view and select its segment."""
        tableNode, row = selectedRow(self.ui.findingsTableView)
        if tableNode is None:
            return
        segmentationNode, segmentId = self.logic.jumpToFinding(tableNode, row)
        if segmentationNode is not None and segmentId:
            self._selectSegment(segmentationNode, segmentId, self.logic.findingsVolume(tableNode))

    @staticmethod
    def _selectSegment(segmentationNode: vtkMRMLSegmentationNode, segmentId: str,
                       volumeNode: Optional[vtkMRMLScalarVolumeNode]) -> None:
        segmentEditorWidget = slicer.modules.segmenteditor.widgetRepresentation().self()
        # The Segment Editor finds or makes its parameter node when entered; after a scene close it has
        # none until then, and its editor ignores selections (Modules/Scripted/SegmentEditor/SegmentEditor.py).
        segmentEditorWidget.selectParameterNode()
        editor = segmentEditorWidget.editor
        editor.setSegmentationNode(segmentationNode)
        if volumeNode is not None:
            editor.setSourceVolumeNode(volumeNode)
        editor.setCurrentSegmentID(segmentId)
