"""Rating sessions in Slicer (SHIVACMBLib.rating.review): one scan at a time, findings drawn as spheres."""

from typing import Any, Callable, List, Optional, Sequence, Tuple

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

from SHIVACMBLib.findings import Finding

from .nodes import TITLE


class SHIVACMBRating:
    """A rating session (SHIVACMBLib.rating.review.RatingSession) shown in Slicer, one scan at a time.

    The scan is loaded from its file, its findings drawn as sphere segments (SHIVACMBLib.slicerside.ratingview:
    colour = status). Every change goes to the session, which saves it before returning, so closing
    Slicer at any point loses nothing. In a blind session the AI findings are drawn only once the
    scan is submitted.
    """

    def __init__(self, logic: "RatingLogic", session: Any) -> None:
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


class RatingLogic:
    """Draws findings (a mixin of SHIVACMBLogic)."""

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


class RatingSection:
    """The panel's Rating session section (a mixin of SHIVACMBWidget)."""

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
        # Shortcuts of the main window, so that they work while the mouse is over a slice view; without a main
        # window (--no-main-window, as the generic tests run) there is nothing to attach them to.
        window = slicer.util.mainWindow()
        for name, action in actions.items():
            buttons[name].connect("clicked(bool)", lambda checked, action=action: action())
            if window is not None:
                shortcut = qt.QShortcut(window)
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
