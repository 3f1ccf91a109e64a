"""SHIVA-CMB: find cerebral microbleeds (CMBs) in T2*-GRE and SWI scans from 3D Slicer.

The logic exports the selected scan (and brain mask) to a temporary folder, runs
`shivacmb segment --progress json` with Slicer's Python in a background process, and loads
cmb.seg.nrrd and findings.tsv as a segmentation node and a table node linked to the scan.
The process output is read by a thread into a queue (SHIVACMBLib.slicerside.slicerbridge.ChildProcess)
that a QTimer drains in the main thread, so the GUI never waits for the network; pip installs
run the same way. Corrections made in the Segment Editor and in the table's review columns
are turned into corrected findings by SHIVACMBLib.slicerside.corrections and saved with a provenance
record. The "Rating session" section runs a SHIVACMBLib.rating.review rating session (SHIVACMBRating):
each rating is saved by the core the moment it is made. The "Compare with baseline" section runs
`shivacmb compare` the same way (SHIVACMBComparison) and shows the result with
SHIVACMBLib.slicerside.compareview: baseline and registered follow-up side by side, the new CMBs in a table.
This file only moves data between MRML and SHIVACMBLib.
"""

import importlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from importlib import metadata
from typing import Annotated, Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
import qt
import vtk

import slicer
from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode,
                    vtkMRMLTableNode)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from SHIVACMBLib.slicerside import slicerbridge
from SHIVACMBLib.findings import Finding
from SHIVACMBLib.resources import TERMINOLOGY_FILE

TITLE = "SHIVA-CMB"


#
# SHIVACMB
#


class SHIVACMB(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SHIVA-CMB")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SHIVA-CMB for 3D Slicer developers"]
        self.parent.helpText = _("""
Finds cerebral microbleeds (CMBs) in T2*-weighted gradient echo (T2*-GRE) and susceptibility-weighted
(SWI) MRI with SHIVA-CMB-style 3D U-Nets run by onnxruntime. Select a scan, optionally a brain mask,
and a model, then click <b>Segment microbleeds</b>. The result is one segment per microbleed and a
findings table (position, volume, probability); selecting a table row shows that microbleed in the
slice views.<br><br>
<b>The results are automatic findings, not a diagnosis: every microbleed found, and every one missed,
must be reviewed by a qualified reader before any use.</b><br><br>
To correct the result, edit its segments in the Segment Editor (paint, erase, delete a segment, add a
segment for a missed microbleed) and click <b>Update table</b> (adding or deleting a segment updates the
table by itself); double-click the Status, Note or Rater cell of a row to review it. <b>Save results</b>
writes the corrected cmb.seg.nrrd, findings.tsv and a record of who changed what (corrections.json).
""")
        self.parent.acknowledgementText = _("""
The method is that of SHIVA-CMB: Tsuchida A. et al., "SHIVA-CMB: a deep-learning-based robust cerebral
microbleed segmentation tool trained on multi-source T2*GRE- and susceptibility-weighted MRI",
Scientific Reports, 2024. The official SHIVA-CMB weights are licensed CC BY-NC-SA 4.0 and are not
distributed with this extension: users bring them (converted to ONNX) under that licence.
""")
        slicer.app.connect("startupCompleted()", self.loadTerminology)

    def loadTerminology(self) -> None:
        """Make the CMB segment terminology of cmb.seg.nrrd files known to Slicer."""
        path = os.path.join(os.path.dirname(self.parent.path), "Resources", "Terminology", TERMINOLOGY_FILE)
        slicer.modules.terminologies.logic().LoadTerminologyFromFile(path)


#
# SHIVACMBParameterNode
#


@parameterNodeWrapper
class SHIVACMBParameterNode:
    """
    The settings of the module, saved with the scene.

    inputVolume - T2*-GRE or SWI scan to search for microbleeds.
    brainMask - brain mask (non-zero voxels are brain); computed from the scan when None.
    model - installed model name or model folder; "" means the command's default model.
    device - where the network runs (auto, cpu, cuda).
    threshold - probability above which a voxel belongs to a microbleed.
    outputSegmentation - microbleeds of the findings table shown (one segment per microbleed).
    findingsTable - findings shown (one row per microbleed).
    show3D - show the microbleeds in the 3D views.
    rater - who reviews, named in the saved findings and corrections.json ("" = login name).
    saveFolder - the folder results were last saved in (results go to <saveFolder>/<scan id>).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    brainMask: Optional[vtkMRMLLabelMapVolumeNode]
    model: str
    device: Annotated[str, Choice(list(slicerbridge.DEVICES))] = "auto"
    threshold: Annotated[float, WithinRange(0.01, 0.99)] = 0.5
    outputSegmentation: Optional[vtkMRMLSegmentationNode]
    findingsTable: Optional[vtkMRMLTableNode]
    show3D: bool = True
    rater: str
    saveFolder: str


#
# SHIVACMBWidget
#


class SHIVACMBWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: settings, Segment/Cancel, progress, the findings of the selected result, corrections."""

    AUTO_UPDATE_DELAY_MS = 300  # one table update for a burst of segments added or removed

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._install = None
        self._missingPackages: List[str] = []
        self._modelsListed = False
        self._observedTable: Optional[vtkMRMLTableNode] = None
        self._observedSegmentation: Optional[vtkMRMLSegmentationNode] = None
        self._tableEditPending = False
        self._autoUpdatePending = False
        self._rating: Optional["SHIVACMBRating"] = None
        self._ratingShortcuts: List[Any] = []
        self._placeNode = None
        self._comparison: Optional["SHIVACMBComparison"] = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SHIVACMB.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SHIVACMBLogic()

        # Result selectors list only the results this module made.
        self.ui.outputSegmentationSelector.addAttribute(
            "vtkMRMLSegmentationNode", SHIVACMBLogic.RESULT_ATTRIBUTE, SHIVACMBLogic.SEGMENTATION_RESULT)
        self.ui.findingsTableSelector.addAttribute(
            "vtkMRMLTableNode", SHIVACMBLogic.RESULT_ATTRIBUTE, SHIVACMBLogic.FINDINGS_RESULT)
        self.ui.progressBar.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.installPackagesButton.connect("clicked(bool)", self.onInstallPackages)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.modelFolderButton.connect("clicked(bool)", self.onChooseModelFolder)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.findingsTableView.connect("selectionChanged()", self.onFindingSelected)
        self.ui.updateTableButton.connect("clicked(bool)", self.onUpdateTable)
        self.ui.saveResultsButton.connect("clicked(bool)", self.onSaveResults)
        self.ui.show3DCheckBox.connect("toggled(bool)", self.onShow3DToggled)
        self.ui.raterLineEdit.placeholderText = self.logic.defaultRater()
        self._setupRating()
        self._setupComparison()

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes: stop a run still going."""
        for command in (self._run, self._comparison):
            if command is not None:
                command.cancel()
        self._observeResult(None, None)
        self.removeObservers()
        for shortcut in self._ratingShortcuts:
            shortcut.setParent(None)
        self._ratingShortcuts = []
        self._closeRating()

    def enter(self) -> None:
        self.initializeParameterNode()
        if not self._modelsListed:
            self.refreshModels()
        self._enableRatingKeys()

    def exit(self) -> None:
        # The result stays observed, so that segments added or deleted in the Segment Editor update the table.
        self.setParameterNode(None)
        self._enableRatingKeys()  # off: D, P, N... are other modules' keys

    def onSceneStartClose(self, caller, event) -> None:
        for command in (self._run, self._comparison):
            if command is not None:
                command.cancel()
        self.setParameterNode(None)
        self._observeResult(None, None)
        self._stopPlacing()
        if self._rating is not None:
            self._rating.forgetNodes()  # the scene removes them; the ratings are saved already

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Use the scene's parameter node; pick the first scan when none is selected."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[SHIVACMBParameterNode]) -> None:
        """Bind the GUI to a parameter node (None: unbind)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        self._followSelectedResult()
        self._showSelectedModel()
        self._updateButtons()

    # --- packages and models ---------------------------------------------------------------

    def refreshModels(self) -> None:
        """List the installed models (needs the Python packages of the command)."""
        self._missingPackages = self.logic.missingPackages()
        self._updateButtons()
        if self._missingPackages:
            self.ui.statusLabel.text = ("Before the first run, SHIVA-CMB needs these Python packages in Slicer: "
                                        + ", ".join(self._missingPackages) + ". Click 'Install Python packages'.")
            return
        with slicer.util.tryWithErrorDisplay("The installed models could not be listed.", waitCursor=True):
            choices, problems = self.logic.listModels()
            self._fillModelSelector(choices)
            self._modelsListed = True
            self.ui.statusLabel.text = self._modelListStatus(choices, problems)

    @staticmethod
    def _modelListStatus(choices: Sequence[slicerbridge.ModelChoice], problems: Sequence[str]) -> str:
        lines = []
        if not choices:
            lines.append("No CMB model is installed. Use 'Folder...' to choose a model folder (a folder with "
                         "model.json and its ONNX files), for example the SHIVA-CMB weights you obtained.")
        if problems:
            lines.append("Model folders that cannot be used:\n" + "\n".join(problems))
        return "\n".join(lines)

    def _fillModelSelector(self, choices: List[slicerbridge.ModelChoice]) -> None:
        """Fill the model selector; a model folder chosen earlier stays listed while it exists."""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for choice in choices:
            self._addModelChoice(choice)
        combo.blockSignals(wasBlocked)
        self._showSelectedModel()

    def _addModelChoice(self, choice: slicerbridge.ModelChoice) -> None:
        combo = self.ui.modelComboBox
        if combo.findData(choice.value) < 0:
            combo.addItem(choice.label, choice.value)
            combo.setItemData(combo.count - 1, choice.tooltip, qt.Qt.ToolTipRole)

    def _showSelectedModel(self) -> None:
        """Show the parameter node's model in the selector (a model folder is added to it).

        A model that is neither listed nor an existing folder is replaced by the first one listed.
        """
        combo = self.ui.modelComboBox
        if not self._parameterNode:
            return
        model = self._parameterNode.model
        if model and combo.findData(model) < 0 and os.path.isdir(model):
            wasBlocked = combo.blockSignals(True)
            try:
                self._addModelChoice(slicerbridge.model_folder_choice(model))
            except ValueError as err:
                logging.warning(str(err))
            combo.blockSignals(wasBlocked)
        if combo.count == 0:
            return
        index = combo.findData(model)
        if index < 0:
            self._parameterNode.model = combo.itemData(0)
            return
        wasBlocked = combo.blockSignals(True)
        combo.currentIndex = index
        combo.blockSignals(wasBlocked)

    def onModelSelected(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index)

    def onChooseModelFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Choose a SHIVA-CMB model folder")
        if not folder:
            return
        try:
            choice = slicerbridge.model_folder_choice(folder)
        except ValueError as err:
            slicer.util.errorDisplay(str(err), windowTitle=TITLE)
            return
        self._addModelChoice(choice)
        if self._parameterNode:
            self._parameterNode.model = choice.value

    def onInstallPackages(self) -> None:
        """Install the missing packages with pip in the background (Slicer stays usable), after asking."""
        missing = self.logic.missingPackages()
        if not missing:
            self.refreshModels()
            return
        if not slicer.util.confirmOkCancelDisplay(
                "SHIVA-CMB needs these Python packages in Slicer's Python:\n\n" + "\n".join(missing)
                + "\n\nDownload and install them now? This may take a few minutes.", windowTitle=TITLE):
            return
        with slicer.util.tryWithErrorDisplay("The Python packages could not be installed.", waitCursor=True):
            self._install = self.logic.startInstallPackages(missing, onFinished=self.onInstallFinished)
        self.ui.progressBar.setRange(0, 0)  # busy: pip gives no overall progress
        self.ui.progressBar.show()
        self.ui.statusLabel.text = "Installing " + ", ".join(missing) + "..."
        self._updateButtons()

    def onInstallFinished(self, command: "SHIVACMBCommand") -> None:
        self._install = None
        self.ui.progressBar.hide()
        self.ui.progressBar.setRange(0, 100)
        if command.status != "done":
            slicer.util.errorDisplay("The Python packages could not be installed.\n\n" + command.errorMessage,
                                     windowTitle=TITLE, detailedText="\n".join(command.lines))
        self.refreshModels()

    # --- running ---------------------------------------------------------------------------

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
            self._run = self.logic.startSegmentation(volume, pn.brainMask, pn.model, pn.device, pn.threshold,
                                                     onProgress=self.onRunProgress, onFinished=self.onRunFinished,
                                                     show3D=pn.show3D)
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.statusLabel.text = "Starting..."
        self._updateButtons()

    def onRunProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message

    def onRunFinished(self, run: "SHIVACMBRun") -> None:
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

    # --- findings and corrections ----------------------------------------------------------

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

    def onFindingsTableModified(self, caller=None, event=None) -> None:
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

    def onSegmentsAddedOrRemoved(self, caller=None, event=None) -> None:
        if not self._autoUpdatePending:
            self._autoUpdatePending = True
            qt.QTimer.singleShot(self.AUTO_UPDATE_DELAY_MS, self._autoUpdate)

    def _autoUpdate(self) -> None:
        self._autoUpdatePending = False
        table = self._observedTable
        if (self._run is None and table is not None and slicer.mrmlScene.IsNodePresent(table)
                and self.logic.hasRunState(table)):
            self._updateTable(table, showErrors=False)

    def onSegmentsPainted(self, caller=None, event=None) -> None:
        self.ui.statusLabel.text = "The segments were edited: click 'Update table' to measure them again."

    def onUpdateTable(self) -> None:
        if self._observedTable is not None:
            self._updateTable(self._observedTable, showErrors=True)

    def _updateTable(self, table: vtkMRMLTableNode, showErrors: bool) -> None:
        from SHIVACMBLib.slicerside import corrections

        if showErrors:
            with slicer.util.tryWithErrorDisplay("The findings could not be updated.", waitCursor=True):
                update = self.logic.updateFindings(table)
        else:
            try:
                update = self.logic.updateFindings(table)
            except Exception:
                logging.exception("SHIVA-CMB: the findings could not be updated")
                return
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

    def saveResultsTo(self, parent: str):
        """Save the selected findings' corrected results into ``<parent>/<scan id>``; what was saved, or None."""
        from SHIVACMBLib.slicerside import corrections

        table = self._observedTable
        volume = self.logic.findingsVolume(table)
        folder = slicerbridge.result_folder(parent, volume.GetName())
        existing = slicerbridge.existing_results(folder, corrections.SAVED_FILES)
        if existing and not slicer.util.confirmOkCancelDisplay(
                f"{folder} already holds {', '.join(existing)}. Replace them?", windowTitle=TITLE):
            return None
        rater = (self._parameterNode.rater.strip() if self._parameterNode else "") or self.logic.defaultRater()
        with slicer.util.tryWithErrorDisplay("The results could not be saved.", waitCursor=True):
            saved = self.logic.saveResults(table, str(folder), rater)
        self.ui.statusLabel.text = (corrections.summary_text(saved.record["summary"])
                                    + f"\nSaved in {folder} (cmb.seg.nrrd, findings.tsv, corrections.json).")
        return saved

    def onShow3DToggled(self, checked: bool) -> None:
        if self._parameterNode:
            self.logic.setShow3D(self._parameterNode.outputSegmentation, checked)

    @staticmethod
    def _selectedRow(view) -> Tuple[Optional[vtkMRMLTableNode], int]:
        """A table view's node and the table row of its current index (-1: none)."""
        tableNode = view.mrmlTableNode()
        index = view.selectionModel().currentIndex()
        if tableNode is None or not index.isValid():
            return None, -1
        return tableNode, view.sortFilterProxyModel().mapToSource(index).row()

    def onFindingSelected(self) -> None:
        """Show the selected microbleed in every slice view and select its segment."""
        tableNode, row = self._selectedRow(self.ui.findingsTableView)
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

    # --- rating session --------------------------------------------------------------------

    def _setupRating(self) -> None:
        from SHIVACMBLib.slicerside import ratingview
        from SHIVACMBLib.rating import review

        self.ui.ratingModeComboBox.addItems(list(review.MODES))
        self.ui.notRatableComboBox.addItems(list(review.REASONS))
        self.ui.newSessionButton.connect("clicked(bool)", self.onNewSession)
        self.ui.openSessionButton.connect("clicked(bool)", self.onOpenSession)
        self.ui.ratingScanList.connect("itemDoubleClicked(QListWidgetItem*)", self.onScanChosen)
        self.ui.ratingFindingsList.connect("currentRowChanged(int)", self.onRatingFindingSelected)
        self.ui.submitScanButton.connect("clicked(bool)", self.onSubmitScan)
        self.ui.notRatableButton.connect("clicked(bool)", self.onNotRatable)
        actions = {"definite": lambda: self.onRateFinding("definite"),
                   "possible": lambda: self.onRateFinding("possible"),
                   "rejected": lambda: self.onRateFinding("rejected"), "add": self.onAddCmb,
                   "next": lambda: self.onStepScan(1), "previous": lambda: self.onStepScan(-1)}
        buttons = {"definite": self.ui.definiteButton, "possible": self.ui.possibleButton,
                   "rejected": self.ui.rejectButton, "add": self.ui.addCmbButton, "next": self.ui.nextScanButton,
                   "previous": self.ui.previousScanButton}
        for name, action in actions.items():
            buttons[name].connect("clicked(bool)", lambda checked, action=action: action())
            # Shortcuts of the main window, so that they work while the mouse is over a slice view.
            shortcut = qt.QShortcut(slicer.util.mainWindow())
            shortcut.setKey(qt.QKeySequence(ratingview.SHORTCUTS[name]))
            shortcut.connect("activated()", action)
            self._ratingShortcuts.append(shortcut)
        self._showRating()

    def onNewSession(self) -> None:
        from SHIVACMBLib.rating import review

        window = slicer.util.mainWindow()
        scans = qt.QFileDialog.getExistingDirectory(window, "Choose the folder of the scans to rate")
        if not scans:
            return
        ai = qt.QFileDialog.getExistingDirectory(window, "Choose the folder of AI results (Cancel: none)")
        folder = qt.QFileDialog.getExistingDirectory(window, "Choose an empty folder for the rating session")
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("The rating session could not be made.", waitCursor=True):
            found = review.scans_from(scans)
            results = review.ai_results(ai, [scanId for scanId, _ in found]) if ai else {}
            review.create_session(folder, found, self.ui.ratingModeComboBox.currentText, results)
        self.openRatingSession(folder)

    def onOpenSession(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Choose a rating session folder")
        if folder:
            self.openRatingSession(folder)

    def openRatingSession(self, folder: str) -> None:
        """Open a session as the rater named in the panel, at its first unfinished scan."""
        from SHIVACMBLib.rating import review

        self._closeRating()
        rater = (self._parameterNode.rater.strip() if self._parameterNode else "") or self.logic.defaultRater()
        try:
            self._rating = SHIVACMBRating(self.logic, review.RatingSession(folder, rater))
            self._rating.show(self._rating.session.current_index())
        except Exception as err:
            self._closeRating()
            slicer.util.errorDisplay(f"The rating session could not be opened.\n\n{err}", windowTitle=TITLE)
        self._showRating()

    def _closeRating(self) -> None:
        self._stopPlacing()
        if self._rating is not None:
            self._rating.close()
            self._rating = None

    def _showRating(self) -> None:
        """Scan list, progress line, findings list and buttons for the session's state."""
        from SHIVACMBLib.slicerside import ratingview

        rating = self._rating
        scanList, findingsList = self.ui.ratingScanList, self.ui.ratingFindingsList
        wasBlocked = findingsList.blockSignals(True)
        scanList.clear()
        findingsList.clear()
        if rating is not None:
            scanList.addItems(ratingview.scan_lines(rating.session))
            scanList.setCurrentRow(rating.index)
            findingsList.addItems([ratingview.finding_line(name, f) for name, f in rating.shown])
        findingsList.blockSignals(wasBlocked)
        open_ = rating is not None and rating.scanId is not None
        changeable = open_ and rating.changeable
        self._enableRatingKeys()
        for button in (self.ui.definiteButton, self.ui.possibleButton, self.ui.rejectButton, self.ui.addCmbButton,
                       self.ui.submitScanButton, self.ui.notRatableButton):
            button.enabled = changeable
        self.ui.previousScanButton.enabled = open_ and rating.index > 0
        self.ui.nextScanButton.enabled = open_ and rating.index < len(rating.session.scan_ids) - 1
        if rating is None:
            self.ui.ratingProgressLabel.text = "No rating session open."
        else:
            self.ui.ratingProgressLabel.text = (
                f"{ratingview.progress_text(rating.session, rating.index)}: {rating.scanId or 'all scans done'}; "
                f"{rating.session.mode} session, rater {rating.session.rater}")

    def _enableRatingKeys(self) -> None:
        """The rating keys work while a session is open and the module is shown (Slicer updates isEntered
        before it calls enter() and exit()); otherwise the keys are the slice views' and other modules'."""
        on = self._rating is not None and self._rating.scanId is not None and self.parent.isEntered
        for shortcut in self._ratingShortcuts:
            shortcut.setEnabled(on)

    def _ratingAction(self, what: str, action: Callable[[], Any]) -> None:
        """Run a rating change; a refused one (the core says why) is shown and changes nothing."""
        if self._rating is None or self._rating.scanId is None:
            return
        try:
            action()
        except Exception as err:
            slicer.util.errorDisplay(f"{what}\n\n{err}", windowTitle=TITLE)
        self._showRating()

    def onScanChosen(self, item) -> None:
        self._ratingAction("The scan could not be loaded.", lambda: self._rating.show(self.ui.ratingScanList.row(item)))

    def onStepScan(self, step: int) -> None:
        if self._rating is not None:
            index = min(max(self._rating.index + step, 0), len(self._rating.session.scan_ids) - 1)
            self._ratingAction("The scan could not be loaded.", lambda: self._rating.show(index))

    def onRatingFindingSelected(self, row: int) -> None:
        if self._rating is not None and 0 <= row < len(self._rating.shown):
            self._rating.jumpTo(row)

    def onRateFinding(self, status: str) -> None:
        row = self.ui.ratingFindingsList.currentRow
        if self._rating is None or not 0 <= row < len(self._rating.shown):
            return
        self._ratingAction("The rating could not be saved.", lambda: self._rating.setStatus(row, status))
        self.ui.ratingFindingsList.setCurrentRow(row)

    def onSubmitScan(self) -> None:
        self._ratingAction("The scan could not be submitted.", lambda: self._rating.submit())

    def onNotRatable(self) -> None:
        reason = self.ui.notRatableComboBox.currentText
        self._ratingAction("The scan could not be saved.", lambda: self._rating.notRatable(reason))

    def onAddCmb(self) -> None:
        """Place one markup point in a slice view; it becomes a CMB of the scan (onCmbPlaced)."""
        if self._rating is None or not self._rating.changeable:
            return
        if self._placeNode is None:
            self._placeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "SHIVACMB new CMB")
            self.addObserver(self._placeNode, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onCmbPlaced)
        markups = slicer.modules.markups.logic()
        markups.SetActiveList(self._placeNode)
        markups.StartPlaceMode(False)  # one point, then back to view mode

    def onCmbPlaced(self, caller, event) -> None:
        count = caller.GetNumberOfControlPoints()
        if count == 0:
            return
        position = [0.0, 0.0, 0.0]
        caller.GetNthControlPointPositionWorld(count - 1, position)
        self._ratingAction("The CMB could not be saved.", lambda: self._rating.add(position))
        # The point is now a sphere segment; remove it once the markups widget has finished placing it.
        qt.QTimer.singleShot(0, caller.RemoveAllControlPoints)

    def _stopPlacing(self) -> None:
        if self._placeNode is not None:
            self.removeObserver(self._placeNode, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onCmbPlaced)
            if slicer.mrmlScene.IsNodePresent(self._placeNode):
                slicer.mrmlScene.RemoveNode(self._placeNode)
            self._placeNode = None

    # --- compare with baseline -------------------------------------------------------------

    def _setupComparison(self) -> None:
        for selector in (self.ui.baselineFindingsSelector, self.ui.followupFindingsSelector):
            selector.addAttribute("vtkMRMLTableNode", SHIVACMBLogic.RESULT_ATTRIBUTE, SHIVACMBLogic.FINDINGS_RESULT)
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
                model=pn.model if pn else "", device=pn.device if pn else "auto",
                threshold=pn.threshold if pn else None, onProgress=self.onComparisonProgress,
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
        tableNode, row = self._selectedRow(self.ui.comparisonTableView)
        if tableNode is not None:
            self.logic.jumpToComparisonRow(tableNode, row)


#
# SHIVACMBCommand, SHIVACMBRun, SHIVACMBComparison
#


class SHIVACMBCommand:
    """A command running in the background (slicerbridge.ChildProcess), followed from the Qt event loop.

    ``status`` is "running", then "done", "cancelled" or "failed" (``errorMessage`` says why).
    The output queue is drained in the main thread (single-shot QTimers, or :meth:`wait`), so
    ``onFinished(command)`` may use MRML and widgets. ``tempDir``, if given, is removed at the
    end whatever the outcome.
    """

    POLL_INTERVAL_MS = 200

    def __init__(self, process: slicerbridge.ChildProcess, tempDir: Optional[str] = None,
                 onFinished: Optional[Callable[[Any], None]] = None) -> None:
        self.process = process
        self.tempDir = tempDir
        self.onFinished = onFinished
        self.lines: Deque[str] = deque(maxlen=200)
        self.status = "running"
        self.errorMessage = ""

    @property
    def cancelRequested(self) -> bool:
        return self.process.cancel_requested

    def startPolling(self) -> None:
        """Follow the command from the Qt event loop (the GUI stays responsive)."""
        qt.QTimer.singleShot(self.POLL_INTERVAL_MS, self._poll)

    def wait(self) -> None:
        """Follow the command until it ends, blocking the caller."""
        self.process.wait(self._onLine)
        self._finish()

    def cancel(self) -> None:
        self.process.cancel()

    def _poll(self) -> None:
        # A single shot re-armed each time: no timer object outlives the command, and a failing
        # callback cannot leave the command unfinished.
        try:
            for line in self.process.read_lines():
                self._onLine(line)
        finally:
            if self.process.finished:
                self._finish()
            else:
                qt.QTimer.singleShot(self.POLL_INTERVAL_MS, self._poll)

    def _onLine(self, line: str) -> None:
        self.lines.append(line)
        logging.info(line)

    def _finished(self, returncode: int) -> None:
        """Set ``status`` and ``errorMessage`` once the process has exited (subclasses load results here)."""
        if self.process.cancel_requested:
            self.status = "cancelled"
        elif returncode == 0:
            self.status = "done"
        else:
            self.status = "failed"
            self.errorMessage = slicerbridge.error_line(self.lines) or f"exit code {returncode}"

    def _finish(self) -> None:
        try:
            self._finished(self.process.returncode)
        finally:
            if self.tempDir:
                shutil.rmtree(self.tempDir, ignore_errors=True)
        logging.info(f"SHIVA-CMB: {self.status}: {' '.join(self.process.args)}")
        if self.onFinished is not None:
            self.onFinished(self)


class SHIVACMBRun(SHIVACMBCommand):
    """One `shivacmb segment` run on one scan, from start to loaded results.

    Besides ``onFinished(run)``, ``onProgress(fraction, message)`` is called in the main thread.
    """

    def __init__(self, logic: "SHIVACMBLogic", inputVolume: vtkMRMLScalarVolumeNode, tempDir: str,
                 process: slicerbridge.ChildProcess, fileNames: Dict[str, str],
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


class SHIVACMBComparison(SHIVACMBRun):
    """One `shivacmb compare` run: follow-up (``inputVolume``) against ``baselineVolume``, up to the loaded
    comparison table and follow-up segmentation (``summary``: compareview.ComparisonSummary)."""

    def __init__(self, logic: "SHIVACMBLogic", baselineVolume: vtkMRMLScalarVolumeNode,
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


class SHIVACMBUpdate:
    """The findings of a table brought up to date with its segmentation (SHIVACMBLogic.updateFindings)."""

    def __init__(self, correction, labels: np.ndarray, grid, state) -> None:
        from SHIVACMBLib.slicerside import corrections

        self.correction = correction  # corrections.Correction
        self.labels = labels  # exported label map, [k, j, i] on the scan's grid
        self.grid = grid  # geometry.Geometry of the scan
        self.state = state  # corrections.RunState
        self.counts = corrections.summarize(state.findings, correction.findings)


#
# SHIVACMBRating
#


class SHIVACMBRating:
    """A rating session (SHIVACMBLib.rating.review.RatingSession) shown in Slicer, one scan at a time.

    The scan is loaded from its file, its findings drawn as sphere segments (SHIVACMBLib.slicerside.ratingview:
    colour = status). Every change goes to the session, which saves it before returning, so closing
    Slicer at any point loses nothing. In a blind session the AI findings are drawn only once the
    scan is submitted.
    """

    def __init__(self, logic: "SHIVACMBLogic", session) -> None:
        self.logic = logic
        self.session = session
        self.index = 0
        self.scanId: Optional[str] = None
        self.shown: List[Tuple[str, Finding]] = []  # (segment name, finding), in list order
        self.volumeNode: Optional[vtkMRMLScalarVolumeNode] = None
        self.segmentationNode: Optional[vtkMRMLSegmentationNode] = None

    @property
    def changeable(self) -> bool:
        from SHIVACMBLib.rating.review import DONE

        return self.scanId is not None and self.session.rating(self.scanId).state not in DONE

    def show(self, index: int) -> None:
        """Load scan ``index`` (all done: the last one) and start rating it."""
        scanIds = self.session.scan_ids
        self.index = min(index, len(scanIds) - 1)
        self.scanId = scanIds[self.index]
        self._removeNodes()
        self.volumeNode = slicer.util.loadVolume(self.session.session.entry(self.scanId).path)
        self.segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                                   f"{self.scanId} rating")
        self.segmentationNode.CreateDefaultDisplayNodes()
        self.segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(self.volumeNode)
        if self.changeable:
            self.session.open_scan(self.scanId)  # rating time runs from here
        self._draw()

    def setStatus(self, row: int, status: str) -> None:
        name, finding = self.shown[row]
        if name.startswith("CMB"):
            self.session.set_status(self.scanId, finding.cmb_id, status)
            self._draw()

    def add(self, ras: Sequence[float]) -> int:
        """Mark a CMB at a point (world RAS: the scan is loaded without a transform)."""
        cmbId = self.session.add(self.scanId, ras)
        self._draw()
        return cmbId

    def submit(self) -> None:
        self.session.submit(self.scanId)
        self._next()

    def notRatable(self, reason: str) -> None:
        self.session.not_ratable(self.scanId, reason)
        self._next()

    def _next(self) -> None:
        self._draw()  # a blind scan shows its AI findings now
        current = self.session.current_index()
        if current < len(self.session.scan_ids) and current != self.index:
            self.show(current)

    def jumpTo(self, row: int) -> None:
        ras = self.shown[row][1].ras
        slicer.modules.markups.logic().JumpSlicesToLocation(ras[0], ras[1], ras[2], True)

    def _draw(self) -> None:
        """One sphere segment per finding shown."""
        from SHIVACMBLib.slicerside import ratingview

        self.shown = ratingview.shown_findings(self.session, self.scanId)
        segmentation = self.segmentationNode.GetSegmentation()
        segmentation.RemoveAllSegments()
        for name, finding in self.shown:
            self.logic.addSphereSegment(self.segmentationNode, name, finding.ras, ratingview.sphere_radius(finding),
                                        ratingview.colour(name, finding))

    def forgetNodes(self) -> None:
        """The scene was closed: its nodes are gone."""
        self.volumeNode = self.segmentationNode = None

    def _removeNodes(self) -> None:
        for node in (self.segmentationNode, self.volumeNode):
            if node is not None and slicer.mrmlScene.IsNodePresent(node):
                slicer.mrmlScene.RemoveNode(node)
        self.forgetNodes()

    def close(self) -> None:
        self._removeNodes()
        self.session.close()


#
# SHIVACMBLogic
#


class SHIVACMBLogic(ScriptedLoadableModuleLogic):
    """Runs SHIVA-CMB on MRML volumes, loads its results as MRML nodes and saves corrected results.

    Usable without the widget. The nodes it makes carry the attribute RESULT_ATTRIBUTE and a
    VOLUME_ROLE reference to their scan: a new run on a scan replaces those nodes, and no other
    node is ever changed. The findings table also keeps, as attributes, the run's own findings
    and voxels (RUN_STATE_ATTRIBUTE) and the findings shown (FINDINGS_ATTRIBUTE), so that
    corrections survive saving and reloading the scene.
    """

    RESULT_ATTRIBUTE = "SHIVACMB.result"
    SEGMENTATION_RESULT = "segmentation"
    FINDINGS_RESULT = "findings"
    RUN_STATE_ATTRIBUTE = "SHIVACMB.runState"
    FINDINGS_ATTRIBUTE = "SHIVACMB.findings"
    VOLUME_ROLE = "SHIVACMBSourceVolume"
    SEGMENTATION_ROLE = "SHIVACMBSegmentation"
    COMPARISON_RESULT = "comparison"  # comparison table and segmentation; VOLUME_ROLE: the follow-up
    REGISTRATION_RESULT = "registration"  # transform putting a follow-up on its baseline
    BASELINE_ROLE = "SHIVACMBBaselineVolume"
    COMPARISON_ROWS_ATTRIBUTE = "SHIVACMB.comparisonRows"  # every comparison.tsv row, as JSON
    COMPARISON_SHOWN_ATTRIBUTE = "SHIVACMB.comparisonShown"  # the rows shown, in table order
    SIDE_BY_SIDE_VIEWS = ("Red", "Yellow")  # baseline, follow-up
    CANCEL_GRACE_S = 10.0
    ARRAY_CLASSES = {"int": vtk.vtkIntArray, "double": vtk.vtkDoubleArray, "string": vtk.vtkStringArray}

    def getParameterNode(self) -> SHIVACMBParameterNode:
        return SHIVACMBParameterNode(super().getParameterNode())

    # --- child process environment ---------------------------------------------------------

    @staticmethod
    def moduleDirectory() -> str:
        """The folder holding SHIVACMB.py and SHIVACMBLib (the child's working directory)."""
        return os.path.dirname(os.path.abspath(__file__))

    @staticmethod
    def pythonExecutable() -> str:
        python = shutil.which("PythonSlicer")
        if not python:
            raise RuntimeError("PythonSlicer (Slicer's Python interpreter) was not found.")
        return python

    @staticmethod
    def childEnvironment() -> Dict[str, str]:
        return slicerbridge.child_environment(slicer.util.startupEnvironment())

    @staticmethod
    def temporaryFolder(kind: str) -> str:
        """A new folder under Slicer's temporary folder; its owner removes it."""
        # The command prints paths normalised; normalising here lets failure_message recognise them.
        return os.path.normpath(tempfile.mkdtemp(prefix=f"SHIVACMB-{kind}-", dir=slicer.app.temporaryPath))

    # --- Python packages -------------------------------------------------------------------

    @staticmethod
    def missingPackages(extra: Sequence[Tuple[str, str]] = ()) -> List[str]:
        """pip requirements of the packages the command needs that Slicer's Python lacks."""
        onnxruntime = slicerbridge.onnxruntime_requirement(tuple(sys.version_info[:2]), sys.platform,
                                                           shutil.which("nvidia-smi") is not None)
        return slicerbridge.missing_requirements(lambda name: importlib.util.find_spec(name) is not None,
                                                 onnxruntime, extra)

    def startInstallPackages(self, requirements: Sequence[str],
                             onFinished: Optional[Callable[["SHIVACMBCommand"], None]] = None) -> "SHIVACMBCommand":
        """pip-install in the background, without replacing the numpy, scipy or SimpleITK Slicer ships."""
        command = self._pipCommand(requirements, onFinished)
        command.startPolling()
        return command

    def installPackages(self, requirements: Sequence[str]) -> None:
        """pip-install and wait (the self-test); RuntimeError when pip fails."""
        if not requirements:
            return
        command = self._pipCommand(requirements, None)
        command.wait()
        if command.status != "done":
            raise RuntimeError(f"pip could not install {', '.join(requirements)}: {command.errorMessage}")

    def _pipCommand(self, requirements: Sequence[str],
                    onFinished: Optional[Callable[["SHIVACMBCommand"], None]]) -> "SHIVACMBCommand":
        # What slicer.util.pip_install runs (PythonSlicer -m pip install, in Slicer's own environment),
        # but read line by line from the event loop instead of blocking Slicer until pip ends.
        tempDir = self.temporaryFolder("pip")
        try:
            constraints = os.path.join(tempDir, "constraints.txt")
            with open(constraints, "w", encoding="utf-8") as stream:
                stream.write(slicerbridge.pip_constraints(
                    {name: self._installedVersion(name) for name in slicerbridge.SLICER_PACKAGES}))
            args = slicerbridge.pip_install_command(self.pythonExecutable(), constraints, requirements)
            process = slicerbridge.ChildProcess(args, env=slicerbridge.child_environment(os.environ))
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise

        def finished(command: "SHIVACMBCommand") -> None:
            importlib.invalidate_caches()
            if onFinished is not None:
                onFinished(command)

        logging.info(f"SHIVA-CMB started: {' '.join(args)}")
        return SHIVACMBCommand(process, tempDir, finished)

    @staticmethod
    def _installedVersion(distribution: str) -> Optional[str]:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            return None

    # --- models ----------------------------------------------------------------------------

    @staticmethod
    def listModels() -> Tuple[List[slicerbridge.ModelChoice], List[str]]:
        """Installed models as selector entries, and the model folders that cannot be used."""
        return slicerbridge.installed_model_choices()

    # --- running ---------------------------------------------------------------------------

    def startSegmentation(self, inputVolume: vtkMRMLScalarVolumeNode,
                          brainMask: Optional[vtkMRMLLabelMapVolumeNode] = None, model: str = "", device: str = "auto",
                          threshold: Optional[float] = None,
                          onProgress: Optional[Callable[[float, str], None]] = None,
                          onFinished: Optional[Callable[[SHIVACMBRun], None]] = None,
                          show3D: bool = True) -> SHIVACMBRun:
        """Start segmenting ``inputVolume`` in the background; ``onFinished(run)`` is called at the end."""
        run = self._launch(inputVolume, brainMask, model, device, threshold, onProgress, onFinished, show3D)
        run.startPolling()
        return run

    def segment(self, inputVolume: vtkMRMLScalarVolumeNode, brainMask: Optional[vtkMRMLLabelMapVolumeNode] = None,
                model: str = "", device: str = "auto", threshold: Optional[float] = None,
                show3D: bool = True) -> SHIVACMBRun:
        """Segment ``inputVolume`` and wait for the results; raises RuntimeError when the run fails."""
        run = self._launch(inputVolume, brainMask, model, device, threshold, None, None, show3D)
        run.wait()
        if run.status != "done":
            raise RuntimeError(run.errorMessage or f"The segmentation was {run.status}.")
        return run

    def _launch(self, inputVolume: vtkMRMLScalarVolumeNode, brainMask: Optional[vtkMRMLLabelMapVolumeNode],
                model: str, device: str, threshold: Optional[float],
                onProgress: Optional[Callable[[float, str], None]],
                onFinished: Optional[Callable[[SHIVACMBRun], None]], show3D: bool) -> SHIVACMBRun:
        if inputVolume is None or inputVolume.GetImageData() is None:
            raise ValueError("Select a scan with image data.")
        python, tempDir = self._childSetup("run")
        try:
            inputPath = self.exportVolume(inputVolume, os.path.join(tempDir, "input.nrrd"))
            fileNames = {inputPath: f"scan '{inputVolume.GetName()}'"}
            maskPath = None
            if brainMask is not None:
                maskPath = self.exportVolume(brainMask, os.path.join(tempDir, "mask.nrrd"))
                fileNames[maskPath] = f"brain mask '{brainMask.GetName()}'"
            settings = slicerbridge.SegmentSettings(model=model, device=device, threshold=threshold, mask=maskPath,
                                                    scan_id=slicerbridge.scan_id_for(inputVolume.GetName()))
            args = slicerbridge.segment_command(python, inputPath, os.path.join(tempDir, "output"), settings)
            process = slicerbridge.ChildProcess(args, cwd=self.moduleDirectory(), env=self.childEnvironment(),
                                                grace_s=self.CANCEL_GRACE_S)
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        logging.info(f"SHIVA-CMB started: {' '.join(args)}")
        return SHIVACMBRun(self, inputVolume, tempDir, process, fileNames, onProgress, onFinished, show3D)

    def _childSetup(self, kind: str) -> Tuple[str, str]:
        """Slicer's Python and a new temporary folder for a command; refused while packages are missing."""
        missing = self.missingPackages()
        if missing:
            raise RuntimeError("Install the Python packages SHIVA-CMB needs first: " + ", ".join(missing))
        return self.pythonExecutable(), self.temporaryFolder(kind)

    @staticmethod
    def exportVolume(volumeNode: vtkMRMLScalarVolumeNode, path: str) -> str:
        """Write a volume as NRRD with its exact grid, without touching its storage node."""
        if not slicer.util.exportNode(volumeNode, path, {"useCompression": 0}):
            raise RuntimeError(f"'{volumeNode.GetName()}' could not be written to {path}.")
        return path

    # --- results ---------------------------------------------------------------------------

    def resultNodes(self, inputVolume: Optional[vtkMRMLScalarVolumeNode]) -> List[vtkMRMLNode]:
        """The segmentation and table nodes this module made for ``inputVolume``."""
        if inputVolume is None:
            return []
        return [node for className in ("vtkMRMLSegmentationNode", "vtkMRMLTableNode")
                for node in slicer.util.getNodesByClass(className)
                if node.GetAttribute(self.RESULT_ATTRIBUTE)
                and node.GetNodeReferenceID(self.VOLUME_ROLE) == inputVolume.GetID()]

    def loadResults(self, inputVolume: vtkMRMLScalarVolumeNode, resultFolder: str,
                    show3D: bool = True) -> Tuple[vtkMRMLSegmentationNode, vtkMRMLTableNode]:
        """Load cmb.seg.nrrd and findings.tsv for ``inputVolume``; they replace its previous results."""
        from SHIVACMBLib.slicerside import corrections
        from SHIVACMBLib.pipeline import FINDINGS_NAME, RUN_NAME, SEGMENTATION_NAME

        if not slicer.mrmlScene.IsNodePresent(inputVolume):
            raise RuntimeError(f"the scan '{inputVolume.GetName()}' was removed from the scene during the run")
        previous = self.resultNodes(inputVolume)
        segmentationNode = self.loadSegmentation(os.path.join(resultFolder, SEGMENTATION_NAME), inputVolume, show3D)
        try:
            # The voxels of each CMB as Slicer holds them: later edits are found by comparing with these.
            labels, _, segments = self.exportLabelMap(segmentationNode, inputVolume)
            runPath = os.path.join(resultFolder, RUN_NAME)
            state = corrections.RunState.from_files(os.path.join(resultFolder, FINDINGS_NAME),
                                                    runPath if os.path.isfile(runPath) else None,
                                                    corrections.fingerprints_by_cmb(labels, segments))
            del labels
            tableNode = self.createFindingsTable(state, inputVolume, segmentationNode)
        except Exception:
            slicer.mrmlScene.RemoveNode(segmentationNode)
            raise
        for node in previous:
            slicer.mrmlScene.RemoveNode(node)
        return segmentationNode, tableNode

    def loadSegmentation(self, path: str, inputVolume: vtkMRMLScalarVolumeNode,
                         show3D: bool = True) -> vtkMRMLSegmentationNode:
        """The segmentation node of a cmb.seg.nrrd, aligned with and linked to ``inputVolume``."""
        name = slicer.mrmlScene.GenerateUniqueName(f"{inputVolume.GetName()} CMBs")
        segmentationNode = slicer.util.loadSegmentation(path, {"name": name})
        segmentationNode.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        self.setShow3D(segmentationNode, show3D)
        self._markResult(segmentationNode, self.SEGMENTATION_RESULT, inputVolume)
        return segmentationNode

    @staticmethod
    def setShow3D(segmentationNode: Optional[vtkMRMLSegmentationNode], show: bool) -> None:
        """Show or hide a result segmentation in the 3D views (its surfaces are made when first shown)."""
        if segmentationNode is None:
            return
        if show:
            segmentationNode.CreateClosedSurfaceRepresentation()
        displayNode = segmentationNode.GetDisplayNode()
        if displayNode is not None:
            displayNode.SetVisibility3D(show)

    def createFindingsTable(self, state, inputVolume: vtkMRMLScalarVolumeNode,
                            segmentationNode: vtkMRMLSegmentationNode) -> vtkMRMLTableNode:
        """A table node of the run's findings (state: corrections.RunState), linked to the scan and segmentation."""
        name = slicer.mrmlScene.GenerateUniqueName(f"{inputVolume.GetName()} CMB findings")
        tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", name)
        tableNode.SetAttribute(self.RUN_STATE_ATTRIBUTE, state.to_json())
        self.showFindings(tableNode, state.findings)
        tableNode.SetNodeReferenceID(self.SEGMENTATION_ROLE, segmentationNode.GetID())
        self._markResult(tableNode, self.FINDINGS_RESULT, inputVolume)
        return tableNode

    def showFindings(self, tableNode: vtkMRMLTableNode, findings: Sequence[Finding]) -> None:
        """Keep ``findings`` as the table's findings and show them, one typed column per findings.tsv column."""
        from SHIVACMBLib.slicerside import corrections

        wasModified = tableNode.StartModify()
        tableNode.SetAttribute(self.FINDINGS_ATTRIBUTE, corrections.findings_to_json(findings))
        self._fillTable(tableNode, slicerbridge.TABLE_COLUMNS, [slicerbridge.finding_row(f) for f in findings])
        # Editable, for the review columns; edits to other cells are put back (applyTableEdits).
        tableNode.SetLocked(False)
        tableNode.EndModify(wasModified)

    def _fillTable(self, tableNode: vtkMRMLTableNode, columns: Sequence[Any], rows: Sequence[Sequence[Any]]) -> None:
        """Replace a table's columns by typed ``columns`` (slicerbridge.Column) holding ``rows``."""
        tableNode.RemoveAllColumns()
        for index, column in enumerate(columns):
            array = self.ARRAY_CLASSES[column.kind]()
            array.SetName(column.name)
            array.SetNumberOfValues(len(rows))
            for rowIndex, row in enumerate(rows):
                array.SetValue(rowIndex, row[index])
            tableNode.AddColumn(array)
            tableNode.SetColumnTitle(column.name, column.title)
            if column.unit:
                tableNode.SetColumnUnitLabel(column.name, column.unit)
        # Without this the column names would be shown as row 0 and every row would be off by one.
        tableNode.SetUseColumnTitleAsColumnHeader(True)

    def _markResult(self, node: vtkMRMLNode, kind: str, inputVolume: vtkMRMLScalarVolumeNode) -> None:
        """Tag a node as this module's result for ``inputVolume`` and file it beside the scan."""
        node.SetAttribute(self.RESULT_ATTRIBUTE, kind)
        node.SetNodeReferenceID(self.VOLUME_ROLE, inputVolume.GetID())
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        scanParent = shNode.GetItemParent(shNode.GetItemByDataNode(inputVolume))
        shNode.SetItemParent(shNode.GetItemByDataNode(node), scanParent)

    # --- state kept with a findings table --------------------------------------------------

    def findingsSegmentation(self, tableNode: Optional[vtkMRMLTableNode]) -> Optional[vtkMRMLSegmentationNode]:
        return tableNode.GetNodeReference(self.SEGMENTATION_ROLE) if tableNode is not None else None

    def findingsVolume(self, tableNode: Optional[vtkMRMLTableNode]) -> Optional[vtkMRMLScalarVolumeNode]:
        return tableNode.GetNodeReference(self.VOLUME_ROLE) if tableNode is not None else None

    def hasRunState(self, tableNode: Optional[vtkMRMLTableNode]) -> bool:
        return tableNode is not None and bool(tableNode.GetAttribute(self.RUN_STATE_ATTRIBUTE))

    def runState(self, tableNode: vtkMRMLTableNode):
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

    # --- corrections -----------------------------------------------------------------------

    def applyTableEdits(self, tableNode: vtkMRMLTableNode):
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
        """Measure the table's segmentation again and show the corrected findings (corrections.correct).

        Segments found to be new CMBs get their SHIVACMB.cmb_id tag and the name "CMB <id>";
        every CMB segment's SHIVACMB.status tag follows its status.
        """
        from SHIVACMBLib.slicerside import corrections

        segmentationNode = self.findingsSegmentation(tableNode)
        volumeNode = self.findingsVolume(tableNode)
        if segmentationNode is None or volumeNode is None:
            raise RuntimeError("The scan or the segmentation of these findings is no longer in the scene.")
        self.applyTableEdits(tableNode)
        state = self.runState(tableNode)
        labels, grid, segments = self.exportLabelMap(segmentationNode, volumeNode)
        correction = corrections.correct(state, self.shownFindings(tableNode), segments, labels, grid)
        self._tagSegments(segmentationNode, correction)
        self.showFindings(tableNode, correction.findings)
        return SHIVACMBUpdate(correction, labels, grid, state)

    def _tagSegments(self, segmentationNode: vtkMRMLSegmentationNode, correction) -> None:
        from SHIVACMBLib.segfile import ID_TAG, STATUS_TAG, segment_name

        statuses = {f.cmb_id: f.status for f in correction.findings}
        segmentation = segmentationNode.GetSegmentation()
        for segmentId, cmbId in correction.segment_cmb_ids.items():
            segment = segmentation.GetSegment(segmentId)
            if self._segmentTag(segment, ID_TAG) != str(cmbId):
                segment.SetTag(ID_TAG, str(cmbId))
            if segmentId in correction.new_tags:
                segment.SetName(segment_name(cmbId))
            if self._segmentTag(segment, STATUS_TAG) != statuses[cmbId]:
                segment.SetTag(STATUS_TAG, statuses[cmbId])

    def saveResults(self, tableNode: vtkMRMLTableNode, folder: str, rater: str):
        """Update the findings, then write cmb.seg.nrrd, findings.tsv and corrections.json into ``folder``.

        Returns corrections.Saved; the table then shows the findings as saved (raters named).
        """
        from SHIVACMBLib.slicerside import corrections

        update = self.updateFindings(tableNode)
        volumeNode = self.findingsVolume(tableNode)
        scan = {"name": volumeNode.GetName(), "file": self.scanFile(volumeNode)}
        saved = corrections.save(folder, update.labels, update.grid, update.state, update.correction, rater,
                                 scan=scan, host=f"3D Slicer {slicer.app.applicationVersion}")
        self.showFindings(tableNode, saved.findings)
        return saved

    @staticmethod
    def defaultRater() -> str:
        from SHIVACMBLib.slicerside import corrections

        return corrections.who_default()

    @staticmethod
    def scanFile(volumeNode: Optional[vtkMRMLScalarVolumeNode]) -> Optional[str]:
        """The file the scan was loaded from or last saved to, if any."""
        storageNode = volumeNode.GetStorageNode() if volumeNode is not None else None
        if storageNode is None or not storageNode.GetFileName():
            return None
        return storageNode.GetFileName()

    def segmentRecords(self, segmentationNode: vtkMRMLSegmentationNode) -> list:
        """Every segment in order (corrections.SegmentRecord); label n is the n-th segment, as exported."""
        from SHIVACMBLib.slicerside.corrections import SegmentRecord, tag_cmb_id
        from SHIVACMBLib.segfile import ID_TAG

        segmentation = segmentationNode.GetSegmentation()
        records = []
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            segment = segmentation.GetSegment(segmentId)
            records.append(SegmentRecord(segmentId, index + 1, tag_cmb_id(self._segmentTag(segment, ID_TAG)),
                                         segment.GetName()))
        return records

    @staticmethod
    def _segmentTag(segment, key: str) -> Optional[str]:
        # vtkSegment::GetTag(std::string, std::string&) -> bool; a vtk.mutable receives the value
        # (Docs/developer_guide/script_repository/segmentations.md, "toggles visibility of completed segments").
        value = vtk.mutable("")
        return str(value) if segment.GetTag(key, value) else None

    def exportLabelMap(self, segmentationNode: vtkMRMLSegmentationNode, volumeNode: vtkMRMLScalarVolumeNode):
        """Every segment as its own label value (n for the n-th segment) on the scan's grid.

        Returns the label map ([k, j, i] numpy array), the scan's grid (geometry.Geometry, in the
        scan's own coordinates, as findings are) and the segments (segmentRecords).
        """
        from vtk.util import numpy_support

        from SHIVACMBLib.geometry import Geometry

        records = self.segmentRecords(segmentationNode)
        imageData = volumeNode.GetImageData()
        extent = imageData.GetExtent()
        ijkToRAS = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRAS)
        ijkToLPS = np.diag([-1.0, -1.0, 1.0, 1.0]) @ slicer.util.arrayFromVTKMatrix(ijkToRAS)
        grid = Geometry.from_matrix(imageData.GetDimensions(), ijkToLPS)
        if extent[0] != 0 or extent[2] != 0 or extent[4] != 0:
            raise RuntimeError(f"'{volumeNode.GetName()}' has an image extent that does not start at 0.")
        if not records:
            return np.zeros(grid.array_shape, np.int16), grid, records
        segmentation = segmentationNode.GetSegmentation()
        # What vtkSlicerSegmentationsModuleLogic::ExportSegmentsToLabelmapNode does (Slicer v5.8.1,
        # Modules/Loadable/Segmentations/Logic/vtkSlicerSegmentationsModuleLogic.cxx, lines 1049-1116):
        # make sure the binary labelmap exists, then GenerateMergedLabelmapInReferenceGeometry with the
        # reference volume (same file, lines 993-1046; declared public in the .h, lines 444-452). That
        # resamples into the volume's geometry when the segmentation is under another transform, and
        # with EXTENT_REFERENCE_GEOMETRY the image covers the whole volume. Label values: the n-th of the
        # segment IDs gets n (Libs/vtkSegmentationCore/vtkSegmentation.cxx, GenerateMergedLabelmap,
        # lines 1637-1703: "labelValue = backgroundColorIndex + 1 + segmentIndex"), voxels are VTK_SHORT,
        # and where segments overlap the later one wins. Calling it directly, rather than
        # ExportSegmentsToLabelmapNode or slicer.util.arrayFromSegmentBinaryLabelmap, adds no labelmap
        # and no colour table node to the scene (ExportSegmentsToLabelmapNode adds a colour table).
        if not segmentation.CreateRepresentation(
                slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()):
            raise RuntimeError(f"'{segmentationNode.GetName()}' has no binary labelmap representation.")
        segmentIds = vtk.vtkStringArray()
        for record in records:
            segmentIds.InsertNextValue(record.segment_id)
        merged = slicer.vtkOrientedImageData()
        slicer.vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
            segmentationNode, volumeNode, segmentIds, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, merged)
        scalars = merged.GetPointData().GetScalars() if merged.GetPointData() is not None else None
        if scalars is None or tuple(merged.GetExtent()) != tuple(extent):
            raise RuntimeError(f"The segments of '{segmentationNode.GetName()}' could not be exported on the grid "
                               f"of '{volumeNode.GetName()}'.")
        labels = numpy_support.vtk_to_numpy(scalars).reshape(grid.array_shape).copy()
        return labels, grid, records

    # --- navigation ------------------------------------------------------------------------

    @staticmethod
    def addSphereSegment(segmentationNode: vtkMRMLSegmentationNode, name: str, ras: Sequence[float], radius: float,
                         colour: Sequence[float]) -> str:
        """A sphere segment (a point marked as a CMB, or a finding); its segment ID."""
        sphere = vtk.vtkSphereSource()
        sphere.SetCenter(*ras)
        sphere.SetRadius(radius)
        sphere.SetPhiResolution(16)
        sphere.SetThetaResolution(16)
        sphere.Update()
        return segmentationNode.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), name, list(colour))

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

    # --- compare with baseline -------------------------------------------------------------

    def startComparison(self, baselineVolume: vtkMRMLScalarVolumeNode, followupVolume: vtkMRMLScalarVolumeNode,
                        baselineTable: Optional[vtkMRMLTableNode] = None,
                        followupTable: Optional[vtkMRMLTableNode] = None, model: str = "", device: str = "auto",
                        threshold: Optional[float] = None, onProgress: Optional[Callable[[float, str], None]] = None,
                        onFinished: Optional[Callable[["SHIVACMBComparison"], None]] = None) -> "SHIVACMBComparison":
        """Start `shivacmb compare` in the background; a scan without a findings table is segmented."""
        from SHIVACMBLib.slicerside import compareview
        from SHIVACMBLib.findings import write_tsv

        scans = {"baseline": (baselineVolume, baselineTable), "followup": (followupVolume, followupTable)}
        for name, (volume, table) in scans.items():
            if volume is None or volume.GetImageData() is None:
                raise ValueError(f"Select a {name} scan with image data.")
            if table is not None and self.findingsVolume(table) is not volume:
                raise ValueError(f"The table '{table.GetName()}' holds the CMBs of another scan than "
                                 f"'{volume.GetName()}'.")
        if baselineVolume is followupVolume:
            raise ValueError("Select two different scans.")
        python, tempDir = self._childSetup("compare")
        paths, fileNames = {}, {}
        try:
            for name, (volume, table) in scans.items():
                paths[name] = self.exportVolume(volume, os.path.join(tempDir, f"{name}.nrrd"))
                fileNames[paths[name]] = f"scan '{volume.GetName()}'"
                if table is not None:
                    paths[f"{name} findings"] = os.path.join(tempDir, f"{name}_findings.tsv")
                    write_tsv(self.shownFindings(table), paths[f"{name} findings"])
                    fileNames[paths[f"{name} findings"]] = f"findings table '{table.GetName()}'"
            settings = slicerbridge.SegmentSettings(model=model, device=device, threshold=threshold)
            args = compareview.compare_command(python, paths["baseline"], paths["followup"],
                                               os.path.join(tempDir, "comparison"), settings,
                                               paths.get("baseline findings"), paths.get("followup findings"))
            process = slicerbridge.ChildProcess(args, cwd=self.moduleDirectory(), env=self.childEnvironment(),
                                                grace_s=self.CANCEL_GRACE_S)
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        logging.info(f"SHIVA-CMB comparison started: {' '.join(args)}")
        comparison = SHIVACMBComparison(self, baselineVolume, followupVolume, tempDir, process, fileNames,
                                        onProgress, onFinished)
        comparison.startPolling()
        return comparison

    def loadComparison(self, baselineVolume: vtkMRMLScalarVolumeNode, followupVolume: vtkMRMLScalarVolumeNode,
                       folder: str) -> Tuple[vtkMRMLTableNode, vtkMRMLSegmentationNode]:
        """Load comparison.tsv as a table (new CMBs shown) and comparison.seg.nrrd on the follow-up, and put the
        follow-up on the baseline with the registration (see alignFollowup)."""
        import json

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
        self._markResult(tableNode, self.COMPARISON_RESULT, followupVolume)
        self.showComparison(tableNode, newOnly=True)
        self.alignFollowup(followupVolume, baselineVolume, toBaseline)
        return tableNode, segmentationNode

    def showComparison(self, tableNode: vtkMRMLTableNode, newOnly: bool) -> None:
        """Show a comparison's new CMBs only, or all its CMBs (read-only)."""
        import json

        from SHIVACMBLib.slicerside import compareview

        shown = compareview.table_rows(json.loads(tableNode.GetAttribute(self.COMPARISON_ROWS_ATTRIBUTE)), newOnly)
        wasModified = tableNode.StartModify()
        tableNode.SetAttribute(self.COMPARISON_SHOWN_ATTRIBUTE, json.dumps(shown))
        self._fillTable(tableNode, compareview.TABLE_COLUMNS, [compareview.table_cells(row) for row in shown])
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
        """Baseline on the left, follow-up on the right; linked when the follow-up lies on the baseline."""
        baselineVolume, followupVolume = self.comparisonVolumes(tableNode)
        parent = followupVolume.GetParentTransformNode()
        linked = parent is not None and parent.GetAttribute(self.RESULT_ATTRIBUTE) == self.REGISTRATION_RESULT
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        for view, volume in zip(self.SIDE_BY_SIDE_VIEWS, (baselineVolume, followupVolume)):
            sliceWidget = layoutManager.sliceWidget(view)
            composite = sliceWidget.mrmlSliceCompositeNode()
            composite.SetBackgroundVolumeID(volume.GetID())
            composite.SetLinkedControl(linked)
            sliceWidget.sliceLogic().FitSliceToAll()

    def jumpToComparisonRow(self, tableNode: vtkMRMLTableNode, row: int) -> None:
        """Centre the baseline view on the row's CMB in the baseline, and the follow-up view in the follow-up."""
        import json

        from SHIVACMBLib.slicerside import compareview

        shown = json.loads(tableNode.GetAttribute(self.COMPARISON_SHOWN_ATTRIBUTE))
        layoutManager = slicer.app.layoutManager()
        for view, volume, ras in zip(self.SIDE_BY_SIDE_VIEWS, self.comparisonVolumes(tableNode),
                                     compareview.positions(shown[row])):
            position = self.worldPosition(volume, ras)
            layoutManager.sliceWidget(view).mrmlSliceNode().JumpSliceByCentering(*position)

    @staticmethod
    def worldPosition(volumeNode: Optional[vtkMRMLNode], ras: Sequence[float]) -> Tuple[float, float, float]:
        """A position given in the scan's own RAS (findings) in world RAS (the scan may be transformed)."""
        transformNode = volumeNode.GetParentTransformNode() if volumeNode is not None else None
        if transformNode is None:
            return tuple(ras)
        toWorld = vtk.vtkGeneralTransform()
        transformNode.GetTransformToWorld(toWorld)
        return tuple(toWorld.TransformPoint(ras))


#
# SHIVACMBTest
#


class SHIVACMBTest(ScriptedLoadableModuleTest):
    """Segments a phantom from the module panel, corrects the result as a reader would, and saves it.

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

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentCorrectAndSave()

    def test_SegmentCorrectAndSave(self) -> None:
        logic = SHIVACMBLogic()
        missing = logic.missingPackages(extra=(("onnx", "onnx"),))
        if missing:
            self.delayDisplay("Installing " + ", ".join(missing))
            logic.installPackages(missing)

        temporaries = self._temporaries()
        volume = self._phantomVolume()
        voxels = slicer.util.arrayFromVolume(volume).copy()
        work = tempfile.mkdtemp(prefix="SHIVACMB-test-", dir=slicer.app.temporaryPath)
        try:
            model = self._phantomModel(work)
            widget = slicer.util.getModuleWidget("SHIVACMB")
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

    def _segmentFromThePanel(self, widget: SHIVACMBWidget, volume: vtkMRMLScalarVolumeNode,
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

    def _selectRows(self, widget: SHIVACMBWidget, table: vtkMRMLTableNode) -> None:
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

    def _correct(self, widget: SHIVACMBWidget, table: vtkMRMLTableNode) -> None:
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
        self.assertEqual(SHIVACMBLogic._segmentTag(segment, ID_TAG), "4")
        self.assertEqual(SHIVACMBLogic._segmentTag(segment, STATUS_TAG), "added")
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

    def _save(self, widget: SHIVACMBWidget, table: vtkMRMLTableNode, parent: str) -> None:
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

    def _show3D(self, widget: SHIVACMBWidget) -> None:
        self.delayDisplay("Show 3D")
        displayNode = widget._parameterNode.outputSegmentation.GetDisplayNode()
        widget.ui.show3DCheckBox.checked = False
        self.assertFalse(displayNode.GetVisibility3D())
        widget.ui.show3DCheckBox.checked = True
        self.assertTrue(displayNode.GetVisibility3D())

    def _segmentAgain(self, logic: SHIVACMBLogic, volume: vtkMRMLScalarVolumeNode, model: str,
                      table: vtkMRMLTableNode) -> None:
        self.delayDisplay("Segmenting again replaces the results, and only them")
        previous = [table, logic.findingsSegmentation(table)]
        again = logic.segment(volume, model=model, device="cpu", threshold=0.5)
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
        return SHIVACMBLogic.tableRows(table)

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
