"""Follow-up against baseline (`shivacmb compare` in the background): side-by-side views, the new CMBs in a
table, the follow-up put on the baseline by the registration."""

import json
import os
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode

from SHIVACMBLib.settings import ScanSettings
from SHIVACMBLib.slicerside import slicerbridge

from .command import Exports
from .nodes import TITLE, selectedRow
from .parameters import scanSettings
from .segment import SHIVACMBRun


class SHIVACMBComparison(SHIVACMBRun):
    """One `shivacmb compare` run: follow-up (``inputVolume``) against ``baselineVolume``, up to the loaded
    comparison table and follow-up segmentation (``summary``: compareview.ComparisonSummary)."""

    def __init__(self, logic: "ComparisonLogic", baselineVolume: vtkMRMLScalarVolumeNode,
                 followupVolume: vtkMRMLScalarVolumeNode, tempDir: str, process: slicerbridge.ChildProcess,
                 fileNames: Dict[str, str], onProgress: Optional[Callable[[float, str], None]] = None,
                 onFinished: Optional[Callable[["SHIVACMBComparison"], None]] = None) -> None:
        from SHIVACMBLib.slicerside import compareview

        super().__init__(logic, followupVolume, tempDir, process, fileNames, onProgress, onFinished, show3D=False)
        self.baselineVolume = baselineVolume
        self.monitor = slicerbridge.RunMonitor(parse=compareview.parse_summary_line)

    def _load(self, resultFolder: str) -> None:
        self.tableNode, self.segmentationNode = self.logic.loadComparison(self.baselineVolume, self.inputVolume,
                                                                          resultFolder)


class ComparisonLogic:
    """Compares a follow-up with its baseline and shows the result (a mixin of SHIVACMBLogic)."""

    SIDE_BY_SIDE_VIEWS = ("Red", "Yellow")  # baseline, follow-up

    def startComparison(self, baselineVolume: vtkMRMLScalarVolumeNode, followupVolume: vtkMRMLScalarVolumeNode,
                        baselineTable: Optional[vtkMRMLTableNode] = None,
                        followupTable: Optional[vtkMRMLTableNode] = None,
                        settings: ScanSettings = ScanSettings(report=False),
                        onProgress: Optional[Callable[[float, str], None]] = None,
                        onFinished: Optional[Callable[["SHIVACMBComparison"], None]] = None) -> "SHIVACMBComparison":
        """Start `shivacmb compare` in the background; a scan without a findings table is segmented (with
        ``settings``)."""
        from SHIVACMBLib.findings import write_tsv
        from SHIVACMBLib.slicerside import compareview

        scans = {"baseline": (baselineVolume, baselineTable), "followup": (followupVolume, followupTable)}
        for name, (volume, table) in scans.items():
            if volume is None or volume.GetImageData() is None:
                raise ValueError(f"Select a {name} scan with image data.")
            if table is not None and self.findingsVolume(table) is not volume:
                raise ValueError(f"The table '{table.GetName()}' holds the CMBs of another scan than "
                                 f"'{volume.GetName()}'.")
        if baselineVolume is followupVolume:
            raise ValueError("Select two different scans.")

        def prepare(python: str, exports: Exports) -> List[str]:
            paths = {}
            for name, (volume, table) in scans.items():
                paths[name] = exports.volume(volume, f"{name}.nrrd", "scan")
                if table is not None:
                    paths[f"{name} findings"] = exports.file(f"{name}_findings.tsv",
                                                             f"findings table '{table.GetName()}'")
                    write_tsv(self.shownFindings(table), paths[f"{name} findings"])
            return compareview.compare_command(python, paths["baseline"], paths["followup"],
                                               os.path.join(exports.folder, "comparison"), settings,
                                               paths.get("baseline findings"), paths.get("followup findings"))

        comparison = self.startCommand("compare", prepare, lambda tempDir, process, fileNames: SHIVACMBComparison(
            self, baselineVolume, followupVolume, tempDir, process, fileNames, onProgress, onFinished))
        comparison.startPolling()
        return comparison

    def loadComparison(self, baselineVolume: vtkMRMLScalarVolumeNode, followupVolume: vtkMRMLScalarVolumeNode,
                       folder: str) -> Tuple[vtkMRMLTableNode, vtkMRMLSegmentationNode]:
        """Load comparison.tsv as a table (new CMBs shown) and comparison.seg.nrrd on the follow-up, and put the
        follow-up on the baseline with the registration (see alignFollowup)."""
        from SHIVACMBLib.slicerside import compareview

        from SHIVACMBLib import longitudinal

        for volume in (baselineVolume, followupVolume):
            if not slicer.mrmlScene.IsNodePresent(volume):
                raise RuntimeError(f"the scan '{volume.GetName()}' was removed from the scene during the run")
        rows = longitudinal.read_tsv(os.path.join(folder, longitudinal.TSV_NAME))
        with open(os.path.join(folder, longitudinal.JSON_NAME), encoding="utf-8") as stream:
            toBaseline = compareview.followup_to_baseline_ras(json.load(stream))
        segmentationNode = self.loadSegmentation(os.path.join(folder, longitudinal.SEGMENTATION_NAME),
                                                 followupVolume, show3D=False)
        segmentationNode.SetName(slicer.mrmlScene.GenerateUniqueName(f"{followupVolume.GetName()} CMBs, new vs "
                                                                     f"{baselineVolume.GetName()}"))
        segmentationNode.SetAttribute(self.RESULT_ATTRIBUTE, self.COMPARISON_RESULT)
        name = slicer.mrmlScene.GenerateUniqueName(f"{followupVolume.GetName()} vs {baselineVolume.GetName()}")
        tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", name)
        tableNode.SetAttribute(self.COMPARISON_ROWS_ATTRIBUTE, json.dumps(rows))
        tableNode.SetNodeReferenceID(self.BASELINE_ROLE, baselineVolume.GetID())
        tableNode.SetNodeReferenceID(self.SEGMENTATION_ROLE, segmentationNode.GetID())
        self.markResult(tableNode, self.COMPARISON_RESULT, followupVolume)
        self.showComparison(tableNode, newOnly=True)
        self.alignFollowup(followupVolume, baselineVolume, toBaseline)
        return tableNode, segmentationNode

    def showComparison(self, tableNode: vtkMRMLTableNode, newOnly: bool) -> None:
        """Show a comparison's new CMBs only, or all its CMBs (read-only)."""
        from SHIVACMBLib.slicerside import compareview

        shown = compareview.table_rows(json.loads(tableNode.GetAttribute(self.COMPARISON_ROWS_ATTRIBUTE)), newOnly)
        wasModified = tableNode.StartModify()
        tableNode.SetAttribute(self.COMPARISON_SHOWN_ATTRIBUTE, json.dumps(shown))
        self.fillTable(tableNode, compareview.TABLE_COLUMNS, [compareview.table_cells(row) for row in shown])
        tableNode.SetLocked(True)
        tableNode.EndModify(wasModified)

    def alignFollowup(self, followupVolume: vtkMRMLScalarVolumeNode, baselineVolume: vtkMRMLScalarVolumeNode,
                      toBaseline: np.ndarray) -> bool:
        """Put the follow-up and the segmentations on it under a transform node holding the registration
        (follow-up RAS -> baseline RAS), so that both views show the same place; whether it was done.

        A follow-up under a transform of the user's is left alone (the views then jump apart)."""
        parent = followupVolume.GetParentTransformNode()
        if parent is not None and parent.GetAttribute(self.RESULT_ATTRIBUTE) != self.REGISTRATION_RESULT:
            return False
        if parent is None:
            name = slicer.mrmlScene.GenerateUniqueName(f"{followupVolume.GetName()} to {baselineVolume.GetName()}")
            parent = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
            parent.SetAttribute(self.RESULT_ATTRIBUTE, self.REGISTRATION_RESULT)
        parent.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(toBaseline))
        parent.SetAndObserveTransformNodeID(baselineVolume.GetTransformNodeID())
        for node in [followupVolume, *self.resultNodes(followupVolume)]:
            if node.IsA("vtkMRMLTransformableNode"):
                node.SetAndObserveTransformNodeID(parent.GetID())
        return True

    def comparisonVolumes(self, tableNode: vtkMRMLTableNode) -> Tuple[Optional[vtkMRMLScalarVolumeNode], ...]:
        """The baseline and follow-up scans of a comparison table."""
        return tableNode.GetNodeReference(self.BASELINE_ROLE), tableNode.GetNodeReference(self.VOLUME_ROLE)

    def showSideBySide(self, tableNode: vtkMRMLTableNode) -> None:
        """Baseline on the left, follow-up on the right, both axial; linked when the follow-up lies on the baseline.

        The side-by-side layout asks for two axial views, but vtkMRMLLayoutLogic applies a layout's view
        properties only to the views it creates: a Yellow view that exists already stays sagittal (and,
        linked, would follow the axial Red view). So each view is made axial here.
        """
        baselineVolume, followupVolume = self.comparisonVolumes(tableNode)
        parent = followupVolume.GetParentTransformNode()
        linked = parent is not None and parent.GetAttribute(self.RESULT_ATTRIBUTE) == self.REGISTRATION_RESULT
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        for view, volume in zip(self.SIDE_BY_SIDE_VIEWS, (baselineVolume, followupVolume)):
            sliceWidget = layoutManager.sliceWidget(view)
            sliceWidget.mrmlSliceNode().SetOrientation("Axial")
            composite = sliceWidget.mrmlSliceCompositeNode()
            composite.SetBackgroundVolumeID(volume.GetID())
            composite.SetLinkedControl(linked)
            sliceWidget.sliceLogic().FitSliceToAll()

    def jumpToComparisonRow(self, tableNode: vtkMRMLTableNode, row: int) -> None:
        """Centre the baseline view on the row's CMB in the baseline, and the follow-up view in the follow-up."""
        from SHIVACMBLib.slicerside import compareview

        shown = json.loads(tableNode.GetAttribute(self.COMPARISON_SHOWN_ATTRIBUTE))
        layoutManager = slicer.app.layoutManager()
        for view, volume, ras in zip(self.SIDE_BY_SIDE_VIEWS, self.comparisonVolumes(tableNode),
                                     compareview.positions(shown[row])):
            position = self.worldPosition(volume, ras)
            layoutManager.sliceWidget(view).mrmlSliceNode().JumpSliceByCentering(*position)


class ComparisonSection:
    """The panel's Compare with baseline section (a mixin of SHIVACMBWidget)."""

    def _setupComparison(self) -> None:
        for selector in (self.ui.baselineFindingsSelector, self.ui.followupFindingsSelector):
            selector.addAttribute("vtkMRMLTableNode", self.logic.RESULT_ATTRIBUTE, self.logic.FINDINGS_RESULT)
        self.ui.compareButton.connect("clicked(bool)", self.onCompareButton)
        self.ui.newOnlyCheckBox.connect("toggled(bool)", self.onNewOnlyToggled)
        self.ui.comparisonTableView.connect("selectionChanged()", self.onComparisonRowSelected)

    def onCompareButton(self) -> None:
        """Start comparing the follow-up with the baseline, or cancel the comparison running."""
        if self._comparison is not None:
            self._comparison.cancel()
            self.ui.compareStatusLabel.text = "Cancelling..."
            return
        pn = self._parameterNode
        with slicer.util.tryWithErrorDisplay("The comparison could not be started.", waitCursor=True):
            self._comparison = self.logic.startComparison(
                self.ui.baselineVolumeSelector.currentNode(), self.ui.followupVolumeSelector.currentNode(),
                self.ui.baselineFindingsSelector.currentNode(), self.ui.followupFindingsSelector.currentNode(),
                scanSettings(pn, report=False) if pn else ScanSettings(report=False),
                onProgress=self.onComparisonProgress,
                onFinished=self.onComparisonFinished)
        self.ui.compareStatusLabel.text = "Starting..."
        self.ui.compareButton.text = "Cancel comparison"

    def onComparisonProgress(self, fraction: float, message: str) -> None:
        self.ui.compareStatusLabel.text = f"{int(round(100 * fraction))} %: {message}"

    def onComparisonFinished(self, comparison: "SHIVACMBComparison") -> None:
        from SHIVACMBLib.slicerside import compareview

        self._comparison = None
        self.ui.compareButton.text = "Compare with baseline"
        if comparison.status == "done":
            self.ui.comparisonTableView.setMRMLTableNode(comparison.tableNode)
            self.logic.showComparison(comparison.tableNode, self.ui.newOnlyCheckBox.checked)
            self.logic.showSideBySide(comparison.tableNode)
            self.ui.compareStatusLabel.text = compareview.result_text(comparison.summary)
        elif comparison.status == "cancelled":
            self.ui.compareStatusLabel.text = "Cancelled: nothing was changed."
        else:
            self.ui.compareStatusLabel.text = comparison.errorMessage
            slicer.util.errorDisplay(comparison.errorMessage, windowTitle=TITLE,
                                     detailedText="\n".join(comparison.monitor.lines))

    def onNewOnlyToggled(self, checked: bool) -> None:
        tableNode = self.ui.comparisonTableView.mrmlTableNode()
        if tableNode is not None:
            self.logic.showComparison(tableNode, checked)

    def onComparisonRowSelected(self) -> None:
        """Show the selected CMB in both views: baseline on the left, follow-up on the right."""
        tableNode, row = selectedRow(self.ui.comparisonTableView)
        if tableNode is not None:
            self.logic.jumpToComparisonRow(tableNode, row)
