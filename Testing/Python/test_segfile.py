"""cmb.seg.nrrd: one segment per CMB, Slicer conventions, geometry, round trip through slicerio."""

import nrrd
import numpy as np
import slicerio

import phantoms
from SHIVACMBLib.findings import Finding
from SHIVACMBLib.resources import cmb_terminology
from SHIVACMBLib.segfile import read_seg_nrrd, write_seg_nrrd


def test_round_trip(tmp_path):
    grid = phantoms.grid_around((5, -3, 2), (30, 34, 24), (0.7, 0.8, 2.0), phantoms.rotation((1, 0, 1), 15))
    labels = np.zeros(grid.array_shape, np.uint8)
    labels[3:5, 10:13, 8:11] = 1
    labels[9, 20, 30:32] = 2
    findings = [Finding(1, 0, 0, 0, 9, 11, 3, 10.0, 18), Finding(2, 0, 0, 0, 30, 20, 9, 2.0, 2, status="definite")]
    path = tmp_path / "cmb.seg.nrrd"
    write_seg_nrrd(path, labels, grid, findings)

    back, back_grid, segments = read_seg_nrrd(path)
    assert np.array_equal(back, labels)
    assert np.allclose(back_grid.ijk_to_lps(), grid.ijk_to_lps(), atol=1e-6)
    assert [s["name"] for s in segments] == ["CMB 1", "CMB 2"]
    assert [s["id"] for s in segments] == ["CMB_1", "CMB_2"]
    assert [s["labelValue"] for s in segments] == [1, 2]
    assert segments[0]["extent"] == [8, 10, 10, 12, 3, 4]  # i, j, k ranges
    entry, colour = cmb_terminology()
    assert segments[0]["terminology"]["type"] == entry["type"] == ["SCT", "50960005", "Hemorrhage"]
    assert np.allclose(segments[1]["color"], colour)
    assert segments[1]["tags"]["SHIVACMB.status"] == "definite"

    header = nrrd.read_header(str(path))
    assert header["space"] == "left-posterior-superior"
    assert header["Segment1_Layer"] == "0"
    assert header["Segment0_Tags"] == (
        "TerminologyEntry:Segmentation category and type - SHIVA-CMB~SCT^49755003^Morphologically Altered Structure"
        "~SCT^50960005^Hemorrhage~^^~Anatomic codes - DICOM master list~SCT^12738006^Brain~^^"
        "|SHIVACMB.cmb_id:1|SHIVACMB.status:unreviewed|")


def test_segment_mask_via_slicerio(tmp_path):
    grid = phantoms.grid_around((0, 0, 0), (10, 10, 10), (1, 1, 1))
    labels = np.zeros(grid.array_shape, np.uint8)
    labels[2, 3, 4] = 1
    write_seg_nrrd(tmp_path / "s.seg.nrrd", labels, grid, [Finding(1, 0, 0, 0, 4, 3, 2, 1.0, 1)])
    seg = slicerio.read_segmentation(str(tmp_path / "s.seg.nrrd"))
    mask = slicerio.segment_mask(seg, slicerio.segment_from_name(seg, "CMB 1"))
    assert np.argwhere(mask).tolist() == [[4, 3, 2]]  # slicerio indexes i, j, k


def test_no_cmb_gives_an_empty_segmentation(tmp_path):
    grid = phantoms.grid_around((0, 0, 0), (10, 10, 10), (1, 1, 1))
    write_seg_nrrd(tmp_path / "e.seg.nrrd", np.zeros(grid.array_shape, np.uint8), grid, [])
    labels, _, segments = read_seg_nrrd(tmp_path / "e.seg.nrrd")
    assert segments == [] and not labels.any()
