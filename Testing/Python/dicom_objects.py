"""Reading the DICOM results back for the tests: the SEG as label maps per source frame, the SR as plain values,
dciodvfy's verdict (Debian dicom3tools)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

from SHIVACMBLib.dicomseries import SourceSeries

REQUIRE_TOOLS = "SHIVACMB_REQUIRE_DICOM_TOOLS"  # set by .ci/run once it installed them: a missing tool then fails


def missing(what: str) -> None:
    """Skip the test where a DICOM tool cannot be installed; fail it where .ci/run installed them."""
    if os.environ.get(REQUIRE_TOOLS):
        pytest.fail(f"{what} is missing although {REQUIRE_TOOLS} is set")
    pytest.skip(f"{what} is not installed (Debian: dicom3tools, orthanc, orthanc-dicomweb)")


def tool(name: str) -> str:
    """The path of a DICOM tool (``/usr/sbin`` is searched too: Orthanc lives there)."""
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)),
                                      None)
    if path is None:
        missing(name)
    return path


def dciodvfy_errors(path: Path) -> List[str]:
    """dciodvfy's error lines for one object (warnings are left out)."""
    done = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    lines = (done.stdout + done.stderr).splitlines()
    assert any(line.strip() in ("Segmentation", "Comprehensive3DSR") for line in lines), lines[:5]
    return [line for line in lines if line.startswith("Error")]


def seg_cmb_labels(path: Path, series: SourceSeries) -> np.ndarray:
    """The SEG as one label map on the series' frames ``[frame, row, column]``, label = cmb_id (segment "CMB k")."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    uids = [str(ds.SOPInstanceUID) for ds in series.datasets]
    numbers = {int(s.SegmentNumber): int(str(s.SegmentLabel).split()[-1]) for s in seg.SegmentSequence}
    frames = np.zeros((len(uids), series.first.Rows, series.first.Columns), np.uint16)
    for number, cmb_id in numbers.items():
        masks = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[number],
                                                  assert_missing_frames_are_empty=True)
        frames[masks[..., 0] > 0] = cmb_id
    return frames


def code(item: Any) -> str:
    return str(item.ConceptCodeSequence[0].CodeValue)


def name(item: Any) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


def sr_groups(path: Path) -> Dict[str, Dict[str, Any]]:
    """Every measurement group of an SR by tracking identifier: its numbers, codes, sites, point and references."""
    import pydicom

    sr = pydicom.dcmread(str(path))
    imaging = next(i for i in sr.ContentSequence if name(i) == "Imaging Measurements")
    groups = {}
    for group in imaging.ContentSequence:
        values: Dict[str, Any] = {"numbers": [], "codes": {}, "sites": [], "template": group.ContentTemplateSequence[0]
                                  .TemplateIdentifier}
        for item in group.ContentSequence:
            kind = item.ValueType
            if name(item) == "Tracking Identifier":
                values["label"] = str(item.TextValue)
            elif kind == "NUM":
                modifiers = {name(m): m.ConceptCodeSequence[0].CodeMeaning for m in item.get("ContentSequence", [])
                             if m.ValueType == "CODE" and name(m) == "Derivation"}
                sites = [_site(m) for m in item.get("ContentSequence", []) if name(m) == "Finding Site"]
                values["numbers"].append((name(item), modifiers.get("Derivation"),
                                          float(item.MeasuredValueSequence[0].NumericValue), sites))
            elif kind == "CODE" and name(item) == "Finding Site":
                values["sites"].append(_site(item))
            elif kind == "CODE":
                values["codes"][name(item)] = code(item)
            elif kind == "SCOORD3D":
                values["point"] = [float(v) for v in item.GraphicData]
                values["frame_of_reference"] = str(item.ReferencedFrameOfReferenceUID)
            elif kind == "IMAGE" and name(item) == "Referenced Segment":
                reference = item.ReferencedSOPSequence[0]
                values["segment"] = (str(reference.ReferencedSOPInstanceUID), int(reference.ReferencedSegmentNumber))
        groups[values["label"]] = values
    return groups


def _site(item: Any) -> tuple:
    """(location code, laterality or modifier code) of a Finding Site item."""
    modifiers = [code(m) for m in item.get("ContentSequence", [])]
    return code(item), modifiers[0] if modifiers else None


def sr_comment(path: Path) -> str:
    """The text under TID 1500's Qualitative Evaluations ("" when there is none)."""
    import pydicom

    sr = pydicom.dcmread(str(path))
    for item in sr.ContentSequence:
        if name(item) == "Qualitative Evaluations":
            return " ".join(str(i.TextValue) for i in item.ContentSequence)
    return ""
