"""The MRML nodes SHIVA-CMB makes: how they are marked, filled, found and shown; the CMB terminology."""

import os
from typing import Any, List, Optional, Sequence, Tuple

import vtk

import slicer
from slicer import vtkMRMLNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode

from SHIVACMBLib.resources import TERMINOLOGY_FILE, cmb_terminology

TITLE = "SHIVA-CMB"


def ensureTerminology(moduleDirectory: str) -> None:
    """Make the CMB terminology of cmb.seg.nrrd files known to Slicer, once.

    Called when Slicer has started and whenever the module is set up or loads a result: Slicer
    emits startupCompleted() only once, before a module added later (Additional module paths,
    Reload) exists.
    """
    logic = slicer.modules.terminologies.logic()
    names = vtk.vtkStringArray()
    logic.GetLoadedTerminologyNames(names)
    if cmb_terminology()[0]["contextName"] not in {names.GetValue(i) for i in range(names.GetNumberOfValues())}:
        logic.LoadTerminologyFromFile(os.path.join(moduleDirectory, "Resources", "Terminology", TERMINOLOGY_FILE))


def selectedRow(view: Any) -> Tuple[Optional[vtkMRMLTableNode], int]:
    """A table view's node and the table row of its current index (-1: none)."""
    tableNode = view.mrmlTableNode()
    index = view.selectionModel().currentIndex()
    if tableNode is None or not index.isValid():
        return None, -1
    return tableNode, view.sortFilterProxyModel().mapToSource(index).row()


class ResultNodes:
    """Marks and reads the nodes this module makes (a mixin of SHIVACMBLogic).

    They carry the attribute RESULT_ATTRIBUTE and a VOLUME_ROLE reference to their scan: a new
    run on a scan replaces those nodes, and no other node is ever changed.
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
    ARRAY_CLASSES = {"int": vtk.vtkIntArray, "double": vtk.vtkDoubleArray, "string": vtk.vtkStringArray}

    @staticmethod
    def moduleDirectory() -> str:
        """The folder holding SHIVACMB.py, SHIVACMBLib and Resources (the child's working directory)."""
        return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def resultNodes(self, inputVolume: Optional[vtkMRMLScalarVolumeNode]) -> List[vtkMRMLNode]:
        """The segmentation and table nodes this module made for ``inputVolume``."""
        if inputVolume is None:
            return []
        return [node for className in ("vtkMRMLSegmentationNode", "vtkMRMLTableNode")
                for node in slicer.util.getNodesByClass(className)
                if node.GetAttribute(self.RESULT_ATTRIBUTE)
                and node.GetNodeReferenceID(self.VOLUME_ROLE) == inputVolume.GetID()]

    def loadSegmentation(self, path: str, inputVolume: vtkMRMLScalarVolumeNode,
                         show3D: bool = True) -> vtkMRMLSegmentationNode:
        """The segmentation node of a cmb.seg.nrrd, aligned with and linked to ``inputVolume``.

        The file lies in a temporary folder: it is read by the Segmentations logic, not by the
        application's IO manager (which would list it in Recent files), and the node keeps no
        storage node, so that saving the scene writes it beside the scene, not back into a
        recreated temporary folder (vtkSlicerSegmentationsModuleLogic::LoadSegmentationFromFile
        leaves one pointing to the file it read).
        """
        ensureTerminology(self.moduleDirectory())
        name = slicer.mrmlScene.GenerateUniqueName(f"{inputVolume.GetName()} CMBs")
        segmentationNode = slicer.modules.segmentations.logic().LoadSegmentationFromFile(path, True, name)
        if segmentationNode is None:
            raise RuntimeError(f"{path} could not be read as a segmentation.")
        storageNode = segmentationNode.GetStorageNode()
        segmentationNode.SetAndObserveStorageNodeID(None)
        if storageNode is not None:
            slicer.mrmlScene.RemoveNode(storageNode)
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        self.setShow3D(segmentationNode, show3D)
        self.markResult(segmentationNode, self.SEGMENTATION_RESULT, inputVolume)
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

    def fillTable(self, tableNode: vtkMRMLTableNode, columns: Sequence[Any], rows: Sequence[Sequence[Any]]) -> None:
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

    def markResult(self, node: vtkMRMLNode, kind: str, inputVolume: vtkMRMLScalarVolumeNode) -> None:
        """Tag a node as this module's result for ``inputVolume`` and file it beside the scan."""
        node.SetAttribute(self.RESULT_ATTRIBUTE, kind)
        node.SetNodeReferenceID(self.VOLUME_ROLE, inputVolume.GetID())
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        scanParent = shNode.GetItemParent(shNode.GetItemByDataNode(inputVolume))
        shNode.SetItemParent(shNode.GetItemByDataNode(node), scanParent)

    def findingsSegmentation(self, tableNode: Optional[vtkMRMLTableNode]) -> Optional[vtkMRMLSegmentationNode]:
        return tableNode.GetNodeReference(self.SEGMENTATION_ROLE) if tableNode is not None else None

    def findingsVolume(self, tableNode: Optional[vtkMRMLTableNode]) -> Optional[vtkMRMLScalarVolumeNode]:
        return tableNode.GetNodeReference(self.VOLUME_ROLE) if tableNode is not None else None

    @staticmethod
    def segmentTag(segment: Any, key: str) -> Optional[str]:
        """A segment's tag value (None: no such tag)."""
        # vtkSegment::GetTag(std::string, std::string&) -> bool; a vtk.mutable receives the value
        # (Docs/developer_guide/script_repository/segmentations.md, "toggles visibility of completed segments").
        value = vtk.mutable("")
        return str(value) if segment.GetTag(key, value) else None

    @staticmethod
    def worldPosition(volumeNode: Optional[vtkMRMLNode], ras: Sequence[float]) -> Tuple[float, float, float]:
        """A position given in the scan's own RAS (findings) in world RAS (the scan may be transformed)."""
        transformNode = volumeNode.GetParentTransformNode() if volumeNode is not None else None
        if transformNode is None:
            return tuple(ras)
        toWorld = vtk.vtkGeneralTransform()
        transformNode.GetTransformToWorld(toWorld)
        return tuple(toWorld.TransformPoint(ras))

    @staticmethod
    def scanFile(volumeNode: Optional[vtkMRMLScalarVolumeNode]) -> Optional[str]:
        """The file the scan was loaded from or last saved to, if any."""
        storageNode = volumeNode.GetStorageNode() if volumeNode is not None else None
        if storageNode is None or not storageNode.GetFileName():
            return None
        return storageNode.GetFileName()

