"""Stand-ins for the few Slicer, qt and vtk calls SHIVACMB.py and SHIVACMBSlicer make (adapter tests, edit bench).

3D Slicer cannot run here. These stand-ins do only what the module asks of them, the way the cited
Slicer sources do it (vtkMRMLTableNode.SetCellText converts text to the column's type;
GenerateMergedLabelmapInReferenceGeometry gives the n-th segment the label n on the reference
volume's grid, later segments winning, over the whole grid or the segments' bounding box;
vtkSegment.GetTag fills a vtk.mutable; LoadSegmentationFromFile leaves a storage node pointing to
the file it read; the terminology logic lists the contexts it has loaded; tryWithErrorDisplay shows an
error and raises it again; the DICOM database gives the file of an instance UID). They check that the
module moves data between MRML and SHIVACMBLib as intended; whether Slicer itself behaves so is
checked by SHIVACMBTest inside Slicer.
"""

import contextlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np

MODULE_DIR = Path(__file__).resolve().parents[2] / "SHIVACMB"
MODULE_PY = MODULE_DIR / "SHIVACMB.py"


class Array:
    """vtkIntArray / vtkDoubleArray / vtkStringArray: typed values."""

    kind = str

    def __init__(self):
        self.values, self.name = [], ""

    def SetName(self, name):
        self.name = name

    def SetNumberOfValues(self, n):
        self.values = [self.kind()] * n

    def SetValue(self, index, value):
        self.values[index] = self.kind(value)

    def GetValue(self, index):
        return self.values[index]

    def InsertNextValue(self, value):
        self.values.append(value)

    def GetNumberOfValues(self):
        return len(self.values)


class IntArray(Array):
    kind = int


class DoubleArray(Array):
    kind = float


class Table:
    def __init__(self, node):
        self.node = node

    def GetColumnByName(self, name):
        return next((c for c in self.node.columns if c.name == name), None)

    def GetNumberOfRows(self):
        return len(self.node.columns[0].values) if self.node.columns else 0


class Node:
    def __init__(self, name="node"):
        self.name, self.attributes, self.references, self.modified = name, {}, {}, 0

    def GetName(self):
        return self.name

    def GetID(self):
        return f"id-{self.name}"

    def SetAttribute(self, key, value):
        self.attributes[key] = value

    def GetAttribute(self, key):
        return self.attributes.get(key)

    scene = None  # the Scene of load_module: references given by ID are looked up there

    def SetNodeReferenceID(self, role, node):
        self.references[role] = node  # an ID, as MRML takes it, or the node itself

    def GetNodeReferenceID(self, role):
        node = self.references.get(role)
        return node if node is None or isinstance(node, str) else node.GetID()

    def GetNodeReference(self, role):
        node = self.references.get(role)
        if isinstance(node, str):
            return next((n for n in self.scene.nodes if n.GetID() == node), None)
        return node


class TableNode(Node):
    def __init__(self):
        super().__init__("findings")
        self.columns, self.locked = [], True

    def StartModify(self):
        return 0

    def EndModify(self, was):
        self.modified += 1

    def RemoveAllColumns(self):
        self.columns = []

    def AddColumn(self, array):
        self.columns.append(array)

    def SetColumnTitle(self, name, title):
        pass

    def SetColumnUnitLabel(self, name, unit):
        pass

    def SetUseColumnTitleAsColumnHeader(self, use):
        pass

    def SetLocked(self, locked):
        self.locked = locked

    def GetTable(self):
        return Table(self)

    def GetNumberOfRows(self):
        return Table(self).GetNumberOfRows()

    def GetNumberOfColumns(self):
        return len(self.columns)

    def GetColumnIndex(self, name):
        return [c.name for c in self.columns].index(name)

    def SetCellText(self, row, column, text):
        # vtkMRMLTableNode::SetCellText -> vtkTable::SetValue(vtkVariant(text)): converted to the column's type
        self.columns[column].SetValue(row, text)
        self.modified += 1

    def GetCellText(self, row, column):
        return str(self.columns[column].values[row])


class Mutable:
    """vtk.mutable."""

    def __init__(self, value):
        self.value = value

    def __str__(self):
        return str(self.value)


class Segment:
    def __init__(self, name, mask, tags=None):
        self.name, self.mask, self.tags = name, mask, dict(tags or {})

    def GetName(self):
        return self.name

    def SetName(self, name):
        self.name = name

    def GetTag(self, key, value):
        if key not in self.tags:
            return False
        value.value = self.tags[key]
        return True

    def SetTag(self, key, value):
        self.tags[key] = value


class Segmentation:
    def __init__(self):
        self.segments = {}

    def GetNumberOfSegments(self):
        return len(self.segments)

    def GetNthSegmentID(self, index):
        return list(self.segments)[index]

    def GetSegment(self, segment_id):
        return self.segments.get(segment_id)

    def RemoveSegment(self, segment_id):
        del self.segments[segment_id]

    def RemoveAllSegments(self):
        self.segments.clear()

    def CreateRepresentation(self, name):
        return True


class DisplayNode:
    visible3D = None

    def SetVisibility3D(self, show):
        self.visible3D = show


class SegmentationNode(Node):
    def __init__(self):
        super().__init__("CMBs")
        self.segmentation, self.display, self.surfaces = Segmentation(), DisplayNode(), False

    def GetSegmentation(self):
        return self.segmentation

    def GetDisplayNode(self):
        return self.display

    def CreateClosedSurfaceRepresentation(self):
        self.surfaces = True

    def CreateDefaultDisplayNodes(self):
        pass

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volume):
        self.reference = volume

    storage = transform = None

    def GetStorageNode(self):
        return self.storage

    def SetAndObserveStorageNodeID(self, node_id):
        self.storage = None if node_id is None else self.storage

    def SetAndObserveTransformNodeID(self, node_id):
        self.transform = node_id

    def AddSegmentFromClosedSurfaceRepresentation(self, surface, name, colour):
        # a sphere's surface is kept as (centre, radius); the ID is the name, as Slicer makes it unique
        self.segmentation.segments[name] = Segment(name, surface, {"colour": tuple(colour)})
        return name


class SphereSource:
    """vtk.vtkSphereSource: its output stands for the sphere as (centre, radius)."""

    def SetCenter(self, *centre):
        self.centre = centre

    def SetRadius(self, radius):
        self.radius = radius

    def SetPhiResolution(self, n):
        pass

    SetThetaResolution = SetPhiResolution

    def Update(self):
        pass

    def GetOutput(self):
        return self.centre, self.radius


class MarkupsNode(Node):
    """A point list: the points clicked in the slice views."""

    def __init__(self):
        super().__init__("points")
        self.points = []

    def GetNumberOfControlPoints(self):
        return len(self.points)

    def GetNthControlPointPositionWorld(self, index, position):
        position[:] = self.points[index]

    def RemoveAllControlPoints(self):
        self.points.clear()


class Scene:
    """slicer.mrmlScene: the nodes added and not yet removed."""

    def __init__(self):
        self.nodes = []

    def AddNewNodeByClass(self, class_name, name):
        node = {"vtkMRMLSegmentationNode": SegmentationNode, "vtkMRMLMarkupsFiducialNode": MarkupsNode,
                "vtkMRMLTableNode": TableNode}[class_name]()
        node.name = name
        self.nodes.append(node)
        return node

    def IsNodePresent(self, node):
        return node in self.nodes

    def GenerateUniqueName(self, name):
        return name

    def RemoveNode(self, node):
        self.nodes.remove(node)

    def nodes_by_class(self, class_name):
        """slicer.util.getNodesByClass."""
        kinds = {"vtkMRMLSegmentationNode": SegmentationNode, "vtkMRMLTableNode": TableNode}
        return [node for node in self.nodes if type(node) is kinds.get(class_name)]

    def load_volume(self, path):
        node = Node(path)
        self.nodes.append(node)
        return node


class ImageData:
    def __init__(self, size):
        self.size = size

    def GetDimensions(self):
        return self.size

    def GetExtent(self):
        return (0, self.size[0] - 1, 0, self.size[1] - 1, 0, self.size[2] - 1)


class VolumeNode(Node):
    def __init__(self, grid):
        super().__init__("SWI scan")
        self.grid = grid

    def GetImageData(self):
        return ImageData(self.grid.size)

    def GetIJKToRASMatrix(self, matrix):
        matrix.value = self.grid.ijk_to_ras()

    def GetStorageNode(self):
        return None

    def GetParentTransformNode(self):
        return None

    def GetTransformNodeID(self):
        return None


class Matrix:
    value = None


class OrientedImage:
    """slicer.vtkOrientedImageData, as filled by the merged-labelmap call below."""

    labels = None
    extent = (0, -1, 0, -1, 0, -1)

    def GetPointData(self):
        return types.SimpleNamespace(GetScalars=lambda: self.labels)

    def GetExtent(self):
        return self.extent


class BoxMask:
    """A segment's voxels in its bounding box: ``array`` ([k, j, i] booleans) at voxel ``corner`` (k, j, i)."""

    def __init__(self, corner, array):
        self.corner, self.array = tuple(int(c) for c in corner), np.asarray(array, bool)


def _box(mask):
    """(corner, array) of a segment's voxels: a BoxMask, or the bounding box of a whole-grid boolean array."""
    if isinstance(mask, BoxMask):
        return (mask.corner, mask.array) if mask.array.any() else None
    where = np.nonzero(mask)
    if len(where[0]) == 0:
        return None
    low, high = [int(a.min()) for a in where], [int(a.max()) + 1 for a in where]
    return tuple(low), mask[low[0]:high[0], low[1]:high[1], low[2]:high[2]]


EXPORT_MODES = []  # the extent mode of every merged-labelmap call, in order


def merged_labelmap(segmentation_node, volume, segment_ids, mode, merged):
    """GenerateMergedLabelmapInReferenceGeometry: label n for the n-th ID on the volume's grid, later wins; over
    the whole grid (EXTENT_REFERENCE_GEOMETRY: a VTK_SHORT image of every voxel) or the segments' bounding box
    (EXTENT_UNION_OF_EFFECTIVE_SEGMENTS; an empty extent when they have no voxel)."""
    EXPORT_MODES.append(mode)
    boxes = [(n, _box(segmentation_node.segmentation.segments[segment_id].mask))
             for n, segment_id in enumerate(segment_ids.values, start=1)]
    boxes = [(n, box) for n, box in boxes if box is not None]
    if mode == "EXTENT_REFERENCE_GEOMETRY":
        low, high = np.zeros(3, int), np.asarray(volume.grid.array_shape)
    elif boxes:
        low = np.min([box[0] for _, box in boxes], axis=0)
        high = np.max([np.add(box[0], box[1].shape) for _, box in boxes], axis=0)
    else:
        merged.labels, merged.extent = None, (0, -1, 0, -1, 0, -1)
        return
    labels = np.zeros(tuple(high - low), np.int16)
    for n, (corner, array) in boxes:
        at = tuple(slice(c - lo, c - lo + s) for c, lo, s in zip(corner, low, array.shape))
        labels[at][array] = n
    merged.labels = labels
    merged.extent = (int(low[2]), int(high[2]) - 1, int(low[1]), int(high[1]) - 1, int(low[0]), int(high[0]) - 1)


class Timers:
    """qt.QTimer.singleShot: callbacks run when the test says so (the event loop)."""

    def __init__(self):
        self.pending = []

    def singleShot(self, ms, callback):
        self.pending.append(callback)

    def run(self):
        while self.pending:
            self.pending.pop(0)()


class StorageNode(Node):
    """A storage node: the file its node was read from."""

    def __init__(self, path):
        super().__init__("storage")
        self.path = path

    def GetFileName(self):
        return self.path


class SegmentationsLogic:
    """slicer.modules.segmentations.logic(): LoadSegmentationFromFile reads a .seg.nrrd into a new node and, as
    vtkSlicerSegmentationsModuleLogic does, leaves a storage node pointing to the file."""

    def __init__(self, scene):
        self.scene = scene

    def LoadSegmentationFromFile(self, path, auto_opacities, name):
        from SHIVACMBLib.segfile import read_seg_nrrd

        labels, _, records = read_seg_nrrd(path)
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        for record in records:
            node.segmentation.segments[record["id"]] = Segment(record["name"], labels == record["labelValue"],
                                                               record.get("tags", {}))
        node.storage = StorageNode(path)
        self.scene.nodes.append(node.storage)
        return node


class TerminologiesLogic:
    """slicer.modules.terminologies.logic(): the terminology contexts loaded, by the file they came from."""

    def __init__(self):
        self.loaded = {}

    def GetLoadedTerminologyNames(self, names):
        for name in self.loaded:
            names.InsertNextValue(name)

    def LoadTerminologyFromFile(self, path):
        context = json.loads(Path(path).read_text(encoding="utf-8"))["SegmentationCategoryTypeContextName"]
        self.loaded[context] = path
        return context


class SubjectHierarchy:
    """vtkMRMLSubjectHierarchyNode: every node at the top."""

    def GetItemByDataNode(self, node):
        return id(node)

    def GetItemParent(self, item):
        return 0

    def SetItemParent(self, item, parent):
        pass


class DicomDatabase:
    """slicer.dicomDatabase (ctkDICOMDatabase): fileForInstance gives the file of a SOP Instance UID, "" when the
    database does not hold it."""

    def __init__(self):
        self.files = {}

    def fileForInstance(self, uid):
        return self.files.get(uid, "")


@contextlib.contextmanager
def try_with_error_display(message, errors, waitCursor=False):
    """slicer.util.tryWithErrorDisplay: an exception is shown (here: recorded) with the message, and raised again."""
    try:
        yield
    except Exception as err:
        errors.append(f"{message}\n\n{err}")
        raise


def _io_manager_load(*args, **kwargs):
    raise AssertionError("slicer.util.loadSegmentation goes through the IO manager: the file enters Recent files")


def load_module(patch):
    """SHIVACMB.py and SHIVACMBSlicer imported against the stand-ins; ``patch`` (pytest's monkeypatch, or
    :class:`Patch`) puts the stand-ins into sys.modules. A namespace of the module's classes and the stand-ins."""
    timers = Timers()
    jumps = []
    vtk = types.ModuleType("vtk")
    vtk.vtkIntArray, vtk.vtkDoubleArray, vtk.vtkStringArray = IntArray, DoubleArray, Array
    vtk.vtkMatrix4x4, vtk.mutable, vtk.vtkSphereSource = Matrix, Mutable, SphereSource
    vtk.vtkCommand = types.SimpleNamespace(ModifiedEvent="Modified")
    util = types.ModuleType("vtk.util")
    numpy_support = types.ModuleType("vtk.util.numpy_support")
    numpy_support.vtk_to_numpy = lambda array: array
    util.numpy_support, vtk.util = numpy_support, util
    qt = types.ModuleType("qt")
    qt.QTimer = timers

    slicer = types.ModuleType("slicer")
    for name in ("vtkMRMLLabelMapVolumeNode", "vtkMRMLNode", "vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode",
                 "vtkMRMLTableNode"):
        setattr(slicer, name, type(name, (), {}))
    slicer.vtkOrientedImageData = OrientedImage
    slicer.vtkSegmentation = types.SimpleNamespace(
        EXTENT_REFERENCE_GEOMETRY="EXTENT_REFERENCE_GEOMETRY",
        EXTENT_UNION_OF_EFFECTIVE_SEGMENTS="EXTENT_UNION_OF_EFFECTIVE_SEGMENTS",
        SegmentAdded=1, SegmentRemoved=2, SourceRepresentationModified=3)
    slicer.vtkSegmentationConverter = types.SimpleNamespace(
        GetSegmentationBinaryLabelmapRepresentationName=lambda: "Binary labelmap")
    slicer.vtkSlicerSegmentationsModuleLogic = types.SimpleNamespace(
        GenerateMergedLabelmapInReferenceGeometry=merged_labelmap)
    slicer.vtkMRMLSubjectHierarchyNode = types.SimpleNamespace(GetSubjectHierarchyNode=lambda scene: SubjectHierarchy())
    slicer.app = types.SimpleNamespace(applicationVersion="5.8.1")
    slicer.mrmlScene = Scene()
    Node.scene = slicer.mrmlScene
    slicer.modules = types.SimpleNamespace(
        markups=types.SimpleNamespace(logic=lambda: types.SimpleNamespace(
            JumpSlicesToLocation=lambda r, a, s, centred: jumps.append((r, a, s, centred)))),
        segmentations=types.SimpleNamespace(logic=lambda logic=SegmentationsLogic(slicer.mrmlScene): logic),
        terminologies=types.SimpleNamespace(logic=lambda logic=TerminologiesLogic(): logic))
    slicer.util = types.ModuleType("slicer.util")
    slicer.util.VTKObservationMixin = type("VTKObservationMixin", (), {"__init__": lambda self: None})
    slicer.util.arrayFromVTKMatrix = lambda matrix: matrix.value
    slicer.util.loadVolume = slicer.mrmlScene.load_volume
    slicer.util.getNodesByClass = slicer.mrmlScene.nodes_by_class
    slicer.util.loadSegmentation = _io_manager_load
    slicer.util.mainWindow = lambda: None  # as under --no-main-window
    errors = []
    slicer.util.tryWithErrorDisplay = lambda message, waitCursor=False: try_with_error_display(message, errors)
    slicer.util.confirmOkCancelDisplay = lambda text, windowTitle=None: True
    slicer.dicomDatabase = DicomDatabase()
    slicer.i18n = types.ModuleType("slicer.i18n")
    slicer.i18n.tr, slicer.i18n.translate = (lambda text: text), (lambda context, text: text)
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.Choice = wrapper.WithinRange = lambda *args: args
    wrapper.parameterNodeWrapper = lambda cls: cls
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):
        setattr(scripted, name, type(name, (), {"__init__": lambda self, *args: None}))
    for name, value in (("vtk", vtk), ("vtk.util", util), ("vtk.util.numpy_support", numpy_support), ("qt", qt),
                        ("slicer", slicer), ("slicer.util", slicer.util), ("slicer.i18n", slicer.i18n),
                        ("slicer.parameterNodeWrapper", wrapper), ("slicer.ScriptedLoadableModule", scripted)):
        patch.setitem(sys.modules, name, value)
    for name in [name for name in sys.modules if name.split(".")[0] == "SHIVACMBSlicer"]:
        patch.delitem(sys.modules, name)  # imported again, against these stand-ins
    patch.syspath_prepend(str(MODULE_DIR))
    spec = importlib.util.spec_from_file_location("SHIVACMB_under_test", MODULE_PY)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    package = {name: importlib.import_module(f"SHIVACMBSlicer.{name}")
               for name in ("command", "comparison", "correcting", "nodes", "parameters", "rating", "segment")}
    return types.SimpleNamespace(
        module=loaded, package=package, SHIVACMBLogic=loaded.SHIVACMBLogic, SHIVACMBWidget=loaded.SHIVACMBWidget,
        SHIVACMBParameterNode=loaded.SHIVACMBParameterNode, SHIVACMBCommand=package["command"].SHIVACMBCommand,
        SHIVACMBRun=package["segment"].SHIVACMBRun, SHIVACMBRating=package["rating"].SHIVACMBRating,
        slicer=slicer, qt=qt, timers=timers, jumps=jumps, scene=slicer.mrmlScene, errors=errors)


class Patch:
    """What :func:`load_module` asks of pytest's monkeypatch, done for good (the bench)."""

    @staticmethod
    def setitem(mapping, key, value):
        mapping[key] = value

    @staticmethod
    def delitem(mapping, key):
        del mapping[key]

    @staticmethod
    def syspath_prepend(path):
        sys.path.insert(0, path)
