"""SHIVA-CMB: find cerebral microbleeds (CMBs) in T2*-GRE and SWI scans from 3D Slicer.

The entry Slicer loads: the module description, the parameter node, and the widget and logic
facades, made of one class per section of the panel (SHIVACMBSlicer/: segment and results,
corrections, rating session, comparison, package install). The logic exports the selected
scan to a temporary folder and runs `shivacmb` (SHIVACMBLib.cli) with Slicer's Python in a
background process read from the Qt event loop; what needs no Slicer is in SHIVACMBLib.
"""

from typing import Any, List, Optional

import vtk

import slicer
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

import SHIVACMBSlicer
from SHIVACMBSlicer.command import CommandLogic
from SHIVACMBSlicer.comparison import ComparisonLogic, ComparisonSection
from SHIVACMBSlicer.correcting import CorrectionsLogic, CorrectionsSection
from SHIVACMBSlicer.nodes import ResultNodes, ensureTerminology
from SHIVACMBSlicer.packages import PackagesLogic, PackagesSection
from SHIVACMBSlicer.parameters import withScanSettings
from SHIVACMBSlicer.rating import RatingLogic, RatingSection
from SHIVACMBSlicer.segment import SegmentLogic, SegmentSection
from SHIVACMBSlicer.selftest import SelfTest


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
writes the corrected cmb.seg.nrrd, findings.tsv and a record of who changed what (corrections.json), and for
a scan loaded from DICOM a DICOM Segmentation and measurement report (cmb.seg.dcm, cmb.sr.dcm), sent to the
DICOM server named in <b>Send to</b> when there is one.
""")
        self.parent.acknowledgementText = _("""
The method is that of SHIVA-CMB: Tsuchida A. et al., "SHIVA-CMB: a deep-learning-based robust cerebral
microbleed segmentation tool trained on multi-source T2*GRE- and susceptibility-weighted MRI",
Scientific Reports, 2024. The official SHIVA-CMB weights are licensed CC BY-NC-SA 4.0 and are not
distributed with this extension: users bring them (converted to ONNX) under that licence.
""")
        # Once Slicer has started; a module added later (Additional module paths, Reload) loads it when its
        # panel is set up, as startupCompleted() is emitted only once (nodes.ensureTerminology).
        slicer.app.connect("startupCompleted()", lambda: ensureTerminology(ResultNodes.moduleDirectory()))


#
# SHIVACMBParameterNode
#


@parameterNodeWrapper
@withScanSettings
class SHIVACMBParameterNode:
    """
    The settings of the module, saved with the scene.

    inputVolume - T2*-GRE or SWI scan to search for microbleeds.
    brainMask - brain mask (non-zero voxels are brain); computed from the scan when None.
    model, device, threshold - the scan settings the module shows (SHIVACMBLib.settings, added by withScanSettings);
        model "" means the command's default model.
    outputSegmentation - microbleeds of the findings table shown (one segment per microbleed).
    findingsTable - findings shown (one row per microbleed).
    show3D - show the microbleeds in the 3D views.
    rater - who reviews, named in the saved findings and corrections.json ("" = login name).
    saveFolder - the folder results were last saved in (results go to <saveFolder>/<scan id>).
    sendTo - where Save results sends the DICOM results of a scan from DICOM (a DICOMweb URL or HOST:PORT:AET;
        "" = not sent).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    brainMask: Optional[vtkMRMLLabelMapVolumeNode]
    outputSegmentation: Optional[vtkMRMLSegmentationNode]
    findingsTable: Optional[vtkMRMLTableNode]
    show3D: bool = True
    rater: str
    saveFolder: str
    sendTo: str


#
# SHIVACMBWidget
#


class SHIVACMBWidget(ScriptedLoadableModuleWidget, VTKObservationMixin, PackagesSection, SegmentSection,
                     CorrectionsSection, RatingSection, ComparisonSection):
    """The module panel: settings, Segment/Cancel, progress, the findings of the selected result, corrections,
    rating sessions and comparisons (one section class each)."""

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
        self._thresholdModel: Optional[str] = None  # the model whose own threshold the panel was given
        self._observedTable: Optional[vtkMRMLTableNode] = None
        self._observedSegmentation: Optional[vtkMRMLSegmentationNode] = None
        self._tableEditPending = False
        self._autoUpdatePending = False
        self._rating = None
        self._ratingShortcuts: List[Any] = []
        self._placeNode = None
        self._comparison = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SHIVACMB.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SHIVACMBLogic()
        ensureTerminology(self.logic.moduleDirectory())

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

    def onReload(self) -> None:
        """Reload the sections too (Slicer reloads only this file)."""
        SHIVACMBSlicer.reloadSubmodules()
        ScriptedLoadableModuleWidget.onReload(self)

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
        self.logic.forgetVoxels()
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
        self._thresholdModel = None  # a new node takes its model's own threshold
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        self._followSelectedResult()
        self._showSelectedModel()
        self._updateButtons()


#
# SHIVACMBLogic
#


class SHIVACMBLogic(ScriptedLoadableModuleLogic, ResultNodes, CommandLogic, PackagesLogic, SegmentLogic,
                    CorrectionsLogic, RatingLogic, ComparisonLogic):
    """Runs SHIVA-CMB on MRML volumes, loads its results as MRML nodes and saves corrected results (one class per
    section). Usable without the widget."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._segmentVoxels = {}  # findings table ID -> segment ID -> corrections.LabelVoxels as last measured

    def getParameterNode(self) -> SHIVACMBParameterNode:
        return SHIVACMBParameterNode(super().getParameterNode())


#
# SHIVACMBTest
#


class SHIVACMBTest(ScriptedLoadableModuleTest, SelfTest):
    """Segments a phantom from the module panel, corrects the result as a reader would, and saves it
    (SHIVACMBSlicer/selftest.py)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentCorrectAndSave()
