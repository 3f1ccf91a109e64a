"""SHIVA-CMB: find cerebral microbleeds (CMBs) in T2*-GRE and SWI scans from 3D Slicer.

The logic exports the selected scan (and brain mask) to a temporary folder, runs
`shivacmb segment --progress json` with Slicer's Python in a background process, and loads
cmb.seg.nrrd and findings.tsv as a segmentation node and a table node linked to the scan.
The process output is read by a thread into a queue (SHIVACMBLib.slicerbridge.ChildProcess)
that a QTimer drains in the main thread, so the GUI never waits for the network.
"""

import importlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from importlib import metadata
from typing import Annotated, Callable, Dict, List, Optional, Sequence, Tuple

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

from SHIVACMBLib import slicerbridge
from SHIVACMBLib.findings import Finding, read_tsv
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
must be reviewed by a qualified reader before any use.</b>
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
    outputSegmentation - microbleeds found by the last run shown (one segment per microbleed).
    findingsTable - findings of the last run shown (one row per microbleed).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    brainMask: Optional[vtkMRMLLabelMapVolumeNode]
    model: str
    device: Annotated[str, Choice(list(slicerbridge.DEVICES))] = "auto"
    threshold: Annotated[float, WithinRange(0.01, 0.99)] = 0.5
    outputSegmentation: Optional[vtkMRMLSegmentationNode]
    findingsTable: Optional[vtkMRMLTableNode]


#
# SHIVACMBWidget
#


class SHIVACMBWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: settings, Segment/Cancel, progress, and the findings of the selected result."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._missingPackages: List[str] = []
        self._modelsListed = False

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

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes: stop a run still going."""
        if self._run is not None:
            self._run.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        if not self._modelsListed:
            self.refreshModels()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:
            self._run.cancel()
        self.setParameterNode(None)

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
        current = self._parameterNode.model if self._parameterNode else ""
        if current and current not in [choice.value for choice in choices] and os.path.isdir(current):
            try:
                choices = choices + [slicerbridge.model_folder_choice(current)]
            except ValueError as err:
                logging.warning(str(err))
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for index, choice in enumerate(choices):
            combo.addItem(choice.label, choice.value)
            combo.setItemData(index, choice.tooltip, qt.Qt.ToolTipRole)
        combo.blockSignals(wasBlocked)
        self._showSelectedModel()

    def _showSelectedModel(self) -> None:
        """Show the parameter node's model in the selector; take the first listed one if it is not listed."""
        combo = self.ui.modelComboBox
        if not self._parameterNode or combo.count == 0:
            return
        index = combo.findData(self._parameterNode.model)
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
        combo = self.ui.modelComboBox
        if combo.findData(choice.value) < 0:
            combo.addItem(choice.label, choice.value)
            combo.setItemData(combo.count - 1, choice.tooltip, qt.Qt.ToolTipRole)
        if self._parameterNode:
            self._parameterNode.model = choice.value

    def onInstallPackages(self) -> None:
        missing = self.logic.missingPackages()
        if missing and slicer.util.confirmOkCancelDisplay(
                "SHIVA-CMB needs these Python packages in Slicer's Python:\n\n" + "\n".join(missing)
                + "\n\nDownload and install them now? This may take a few minutes.", windowTitle=TITLE):
            with slicer.util.tryWithErrorDisplay("The Python packages could not be installed.", waitCursor=True):
                self.logic.installPackages(missing)
        self.refreshModels()

    # --- running ---------------------------------------------------------------------------

    def _updateButtons(self) -> None:
        """Segment/Cancel and Install buttons for the current state."""
        self.ui.installPackagesButton.visible = bool(self._missingPackages)
        button = self.ui.segmentButton
        if self._run is not None:
            button.text = "Cancel"
            button.toolTip = "Stop the segmentation; nothing is changed in the scene."
            button.enabled = not self._run.cancelRequested
            return
        button.text = "Segment microbleeds"
        pn = self._parameterNode
        ready = bool(pn and pn.inputVolume and pn.model and not self._missingPackages)
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
                                                     onProgress=self.onRunProgress, onFinished=self.onRunFinished)
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

    # --- findings --------------------------------------------------------------------------

    def onFindingSelected(self) -> None:
        """Show the selected microbleed in every slice view and select its segment."""
        view = self.ui.findingsTableView
        tableNode = view.mrmlTableNode()
        index = view.selectionModel().currentIndex()
        if tableNode is None or not index.isValid():
            return
        row = view.sortFilterProxyModel().mapToSource(index).row()
        segmentationNode, segmentId = self.logic.jumpToFinding(tableNode, row)
        if segmentationNode is not None and segmentId:
            self._selectSegment(segmentationNode, segmentId, tableNode.GetNodeReference(SHIVACMBLogic.VOLUME_ROLE))

    @staticmethod
    def _selectSegment(segmentationNode: vtkMRMLSegmentationNode, segmentId: str,
                       volumeNode: Optional[vtkMRMLScalarVolumeNode]) -> None:
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentationNode)
        if volumeNode is not None:
            editor.setSourceVolumeNode(volumeNode)
        editor.setCurrentSegmentID(segmentId)


#
# SHIVACMBRun
#


class SHIVACMBRun:
    """One `shivacmb segment` run on one scan, from start to loaded results.

    ``status`` is "running", then "done", "cancelled" or "failed". The output queue is drained
    in the main thread (single-shot QTimers, or :meth:`wait`), so the callbacks may use MRML and widgets:
    ``onProgress(fraction, message)`` and ``onFinished(run)``. The temporary folder is removed
    whatever the outcome.
    """

    POLL_INTERVAL_MS = 200

    def __init__(self, logic: "SHIVACMBLogic", inputVolume: vtkMRMLScalarVolumeNode, tempDir: str,
                 process: slicerbridge.ChildProcess, fileNames: Dict[str, str],
                 onProgress: Optional[Callable[[float, str], None]] = None,
                 onFinished: Optional[Callable[["SHIVACMBRun"], None]] = None) -> None:
        self.logic = logic
        self.inputVolume = inputVolume
        self.tempDir = tempDir
        self.process = process
        self.fileNames = fileNames  # temporary file path -> what the user calls it
        self.onProgress = onProgress
        self.onFinished = onFinished
        self.monitor = slicerbridge.RunMonitor()
        self.status = "running"
        self.errorMessage = ""
        self.segmentationNode: Optional[vtkMRMLSegmentationNode] = None
        self.tableNode: Optional[vtkMRMLTableNode] = None

    @property
    def summary(self) -> Optional[slicerbridge.RunSummary]:
        return self.monitor.summary

    @property
    def cancelRequested(self) -> bool:
        return self.process.cancel_requested

    def startPolling(self) -> None:
        """Follow the run from the Qt event loop (the GUI stays responsive)."""
        qt.QTimer.singleShot(self.POLL_INTERVAL_MS, self._poll)

    def wait(self) -> None:
        """Follow the run until it ends, blocking the caller."""
        self.process.wait(self._onLine)
        self._finish()

    def cancel(self) -> None:
        self.process.cancel()

    def _poll(self) -> None:
        # A single shot re-armed each time: no timer object outlives the run, and a failing
        # callback cannot leave the run unfinished.
        try:
            for line in self.process.read_lines():
                self._onLine(line)
        finally:
            if self.process.finished:
                self._finish()
            else:
                qt.QTimer.singleShot(self.POLL_INTERVAL_MS, self._poll)

    def _onLine(self, line: str) -> None:
        progress = self.monitor.feed(line)
        if progress is None:
            logging.info(line)
        elif self.onProgress is not None:
            self.onProgress(progress["fraction"], progress["message"] or progress["stage"])

    def _finish(self) -> None:
        returncode = self.process.returncode
        self.status = self.monitor.outcome(returncode, self.process.cancel_requested)
        try:
            if self.status == "done":
                # A relative output path would be relative to the child's working directory.
                resultFolder = os.path.join(self.logic.moduleDirectory(), self.summary.output)
                self.segmentationNode, self.tableNode = self.logic.loadResults(self.inputVolume, resultFolder)
            elif self.status == "failed":
                self.errorMessage = self.monitor.failure_message(returncode, self.fileNames)
        except Exception as err:
            logging.exception("SHIVA-CMB results could not be loaded")
            self.status = "failed"
            self.errorMessage = f"The results could not be loaded: {err}"
        finally:
            shutil.rmtree(self.tempDir, ignore_errors=True)
        logging.info(f"SHIVA-CMB run {self.status}: {' '.join(self.process.args)}")
        if self.onFinished is not None:
            self.onFinished(self)


#
# SHIVACMBLogic
#


class SHIVACMBLogic(ScriptedLoadableModuleLogic):
    """Runs SHIVA-CMB on MRML volumes and loads its results as MRML nodes; usable without the widget.

    The nodes it makes carry the attribute RESULT_ATTRIBUTE and a VOLUME_ROLE reference to their
    scan: a new run on a scan replaces those nodes, and no other node is ever changed.
    """

    RESULT_ATTRIBUTE = "SHIVACMB.result"
    SEGMENTATION_RESULT = "segmentation"
    FINDINGS_RESULT = "findings"
    VOLUME_ROLE = "SHIVACMBSourceVolume"
    SEGMENTATION_ROLE = "SHIVACMBSegmentation"
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

    # --- Python packages -------------------------------------------------------------------

    @staticmethod
    def missingPackages(extra: Sequence[Tuple[str, str]] = ()) -> List[str]:
        """pip requirements of the packages the command needs that Slicer's Python lacks."""
        onnxruntime = slicerbridge.onnxruntime_requirement(tuple(sys.version_info[:2]), sys.platform,
                                                           shutil.which("nvidia-smi") is not None)
        return slicerbridge.missing_requirements(lambda name: importlib.util.find_spec(name) is not None,
                                                 onnxruntime, extra)

    @staticmethod
    def installPackages(requirements: Sequence[str]) -> None:
        """pip-install into Slicer's Python without replacing the numpy, scipy or SimpleITK Slicer ships."""
        if not requirements:
            return
        constraintsPath = os.path.join(slicer.app.temporaryPath, "SHIVACMB-pip-constraints.txt")
        with open(constraintsPath, "w", encoding="utf-8") as constraints:
            constraints.write(slicerbridge.pip_constraints(
                {name: SHIVACMBLogic._installedVersion(name) for name in slicerbridge.SLICER_PACKAGES}))
        slicer.util.pip_install(["-c", constraintsPath, *requirements])
        importlib.invalidate_caches()

    @staticmethod
    def _installedVersion(distribution: str) -> Optional[str]:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            return None

    # --- models ----------------------------------------------------------------------------

    def listModels(self) -> Tuple[List[slicerbridge.ModelChoice], List[str]]:
        """Installed models as selector entries, and the model folders that cannot be used."""
        completed = slicerbridge.run_command(slicerbridge.models_list_command(self.pythonExecutable()),
                                             cwd=self.moduleDirectory(), env=self.childEnvironment())
        if completed.returncode != 0:
            output = completed.stdout.splitlines() + completed.stderr.splitlines()
            raise RuntimeError(slicerbridge.error_line(output) or f"exit code {completed.returncode}")
        return slicerbridge.model_choices(completed.stdout)

    # --- running ---------------------------------------------------------------------------

    def startSegmentation(self, inputVolume: vtkMRMLScalarVolumeNode,
                          brainMask: Optional[vtkMRMLLabelMapVolumeNode] = None, model: str = "", device: str = "auto",
                          threshold: Optional[float] = None,
                          onProgress: Optional[Callable[[float, str], None]] = None,
                          onFinished: Optional[Callable[[SHIVACMBRun], None]] = None) -> SHIVACMBRun:
        """Start segmenting ``inputVolume`` in the background; ``onFinished(run)`` is called at the end."""
        run = self._launch(inputVolume, brainMask, model, device, threshold, onProgress, onFinished)
        run.startPolling()
        return run

    def segment(self, inputVolume: vtkMRMLScalarVolumeNode, brainMask: Optional[vtkMRMLLabelMapVolumeNode] = None,
                model: str = "", device: str = "auto",
                threshold: Optional[float] = None) -> SHIVACMBRun:
        """Segment ``inputVolume`` and wait for the results; raises RuntimeError when the run fails."""
        run = self._launch(inputVolume, brainMask, model, device, threshold, None, None)
        run.wait()
        if run.status != "done":
            raise RuntimeError(run.errorMessage or f"The segmentation was {run.status}.")
        return run

    def _launch(self, inputVolume: vtkMRMLScalarVolumeNode, brainMask: Optional[vtkMRMLLabelMapVolumeNode],
                model: str, device: str, threshold: Optional[float],
                onProgress: Optional[Callable[[float, str], None]],
                onFinished: Optional[Callable[[SHIVACMBRun], None]]) -> SHIVACMBRun:
        if inputVolume is None or inputVolume.GetImageData() is None:
            raise ValueError("Select a scan with image data.")
        missing = self.missingPackages()
        if missing:
            raise RuntimeError("Install the Python packages SHIVA-CMB needs first: " + ", ".join(missing))
        python = self.pythonExecutable()
        # The command prints paths normalised; normalising here lets failure_message recognise them.
        tempDir = os.path.normpath(tempfile.mkdtemp(prefix="SHIVACMB-", dir=slicer.app.temporaryPath))
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
        return SHIVACMBRun(self, inputVolume, tempDir, process, fileNames, onProgress, onFinished)

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

    def loadResults(self, inputVolume: vtkMRMLScalarVolumeNode,
                    resultFolder: str) -> Tuple[vtkMRMLSegmentationNode, vtkMRMLTableNode]:
        """Load cmb.seg.nrrd and findings.tsv for ``inputVolume``; they replace its previous results."""
        from SHIVACMBLib.pipeline import FINDINGS_NAME, SEGMENTATION_NAME

        if not slicer.mrmlScene.IsNodePresent(inputVolume):
            raise RuntimeError(f"the scan '{inputVolume.GetName()}' was removed from the scene during the run")
        findings = read_tsv(os.path.join(resultFolder, FINDINGS_NAME))
        previous = self.resultNodes(inputVolume)
        segmentationNode = self.loadSegmentation(os.path.join(resultFolder, SEGMENTATION_NAME), inputVolume)
        try:
            tableNode = self.createFindingsTable(findings, inputVolume, segmentationNode)
        except Exception:
            slicer.mrmlScene.RemoveNode(segmentationNode)
            raise
        for node in previous:
            slicer.mrmlScene.RemoveNode(node)
        return segmentationNode, tableNode

    def loadSegmentation(self, path: str, inputVolume: vtkMRMLScalarVolumeNode) -> vtkMRMLSegmentationNode:
        """The segmentation node of a cmb.seg.nrrd, aligned with and linked to ``inputVolume``."""
        name = slicer.mrmlScene.GenerateUniqueName(f"{inputVolume.GetName()} CMBs")
        segmentationNode = slicer.util.loadSegmentation(path, {"name": name})
        segmentationNode.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        segmentationNode.CreateClosedSurfaceRepresentation()
        self._markResult(segmentationNode, self.SEGMENTATION_RESULT, inputVolume)
        return segmentationNode

    def createFindingsTable(self, findings: Sequence[Finding], inputVolume: vtkMRMLScalarVolumeNode,
                            segmentationNode: vtkMRMLSegmentationNode) -> vtkMRMLTableNode:
        """A table node with one typed column per findings.tsv column, linked to the scan and segmentation."""
        name = slicer.mrmlScene.GenerateUniqueName(f"{inputVolume.GetName()} CMB findings")
        tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", name)
        self.fillFindingsTable(tableNode, findings)
        tableNode.SetNodeReferenceID(self.SEGMENTATION_ROLE, segmentationNode.GetID())
        self._markResult(tableNode, self.FINDINGS_RESULT, inputVolume)
        return tableNode

    def fillFindingsTable(self, tableNode: vtkMRMLTableNode, findings: Sequence[Finding]) -> None:
        rows = [slicerbridge.finding_row(finding) for finding in findings]
        wasModified = tableNode.StartModify()
        tableNode.RemoveAllColumns()
        for index, column in enumerate(slicerbridge.TABLE_COLUMNS):
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
        # Edits in the table are not carried back to the findings: keep it read-only.
        tableNode.SetLocked(True)
        tableNode.EndModify(wasModified)

    def _markResult(self, node: vtkMRMLNode, kind: str, inputVolume: vtkMRMLScalarVolumeNode) -> None:
        """Tag a node as this module's result for ``inputVolume`` and file it beside the scan."""
        node.SetAttribute(self.RESULT_ATTRIBUTE, kind)
        node.SetNodeReferenceID(self.VOLUME_ROLE, inputVolume.GetID())
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        scanParent = shNode.GetItemParent(shNode.GetItemByDataNode(inputVolume))
        shNode.SetItemParent(shNode.GetItemByDataNode(node), scanParent)

    # --- navigation ------------------------------------------------------------------------

    def jumpToFinding(self, tableNode: vtkMRMLTableNode,
                      row: int) -> Tuple[Optional[vtkMRMLSegmentationNode], Optional[str]]:
        """Centre every slice view on the finding of a table row; its segmentation node and segment ID."""
        from SHIVACMBLib.segfile import segment_id

        ras = [float(self._cellText(tableNode, row, name)) for name in ("r", "a", "s")]
        position = self.worldPosition(tableNode.GetNodeReference(self.VOLUME_ROLE), ras)
        slicer.modules.markups.logic().JumpSlicesToLocation(position[0], position[1], position[2], True)
        segmentationNode = tableNode.GetNodeReference(self.SEGMENTATION_ROLE)
        segmentId = segment_id(int(self._cellText(tableNode, row, "cmb_id")))
        if segmentationNode is None or segmentationNode.GetSegmentation().GetSegment(segmentId) is None:
            return segmentationNode, None
        return segmentationNode, segmentId

    @staticmethod
    def _cellText(tableNode: vtkMRMLTableNode, row: int, columnName: str) -> str:
        return tableNode.GetCellText(row, slicerbridge.column_index(columnName))

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
    """Segments a phantom (bright ellipsoid "brain" with three dark spheres) with a tiny fixed-weight model."""

    SPACING = (1.0, 1.0, 1.2)  # mm, i j k
    SHAPE_IJK = (100, 120, 75)
    BRAIN_RADII = (32.0, 38.0, 28.0)  # mm, around RAS (0, 0, 0)
    CMB_CENTRES = ((12.0, 15.0, 9.6), (-15.0, -10.0, 6.0), (5.0, -20.0, -8.4))  # RAS mm
    CMB_RADIUS = 3.0
    MODEL_BOX = (80, 96, 80)

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentPhantom()

    def test_SegmentPhantom(self) -> None:
        logic = SHIVACMBLogic()
        missing = logic.missingPackages(extra=(("onnx", "onnx"),))
        if missing:
            self.delayDisplay("Installing " + ", ".join(missing))
            logic.installPackages(missing)

        volume = self._phantomVolume()
        modelParent = tempfile.mkdtemp(prefix="SHIVACMB-test-model-", dir=slicer.app.temporaryPath)
        try:
            self._segmentPhantom(logic, volume, self._phantomModel(modelParent))
        finally:
            shutil.rmtree(modelParent, ignore_errors=True)
        self.delayDisplay("Test passed")

    def _segmentPhantom(self, logic: SHIVACMBLogic, volume: vtkMRMLScalarVolumeNode, modelFolder: str) -> None:
        self.delayDisplay("Segmenting the phantom")
        run = logic.segment(volume, model=modelFolder, device="cpu", threshold=0.5)

        segmentation = run.segmentationNode.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(self.CMB_CENTRES))
        expected = np.array(self.CMB_CENTRES)
        for index in range(segmentation.GetNumberOfSegments()):
            centre = np.array(run.segmentationNode.GetSegmentCenterRAS(segmentation.GetNthSegmentID(index)))
            self.assertLess(np.linalg.norm(expected - centre, axis=1).min(), 1.5)
        self.assertEqual(run.tableNode.GetNumberOfRows(), len(self.CMB_CENTRES))
        self.assertEqual(run.summary.cmb_count, len(self.CMB_CENTRES))
        self.assertFalse(os.path.exists(run.tempDir))

        self.delayDisplay("Segmenting again replaces the results")
        again = logic.segment(volume, model=modelFolder, device="cpu", threshold=0.5)
        self.assertEqual({node.GetID() for node in logic.resultNodes(volume)},
                         {again.segmentationNode.GetID(), again.tableNode.GetID()})

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
        from SHIVACMBLib.blobmodel import write_model

        return str(write_model(os.path.join(parent, "phantom-blob-detector"), name="phantom-blob-detector",
                               shape=self.MODEL_BOX))
