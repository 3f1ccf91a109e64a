"""DICOM results (``cmb.seg.dcm``, ``cmb.sr.dcm``, ``comparison.sr.dcm``): the series they are made against, what
identifies them, and writing them.

A scan read from a DICOM series gets them against that series; a NIfTI or NRRD scan converted from one gets them with
``--dicom-source DIR``, once the series is found to lie on the scan's grid (:mod:`.dicomseries`); other scans get
none, and ``--no-dicom`` leaves them out. They are made in memory before any file is written; a series they cannot
be made against is refused in one line naming it (InputError, exit 2). Both objects take the patient and study of
the source series, new series and instance UIDs, the model as the algorithm, and, when a demonstration model made
the findings, the statement that they are not for reads (series description, SEG Image Comments, SR Comment).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import __version__
from .dicomseg import make_segmentation
from .dicomseries import SourceSeries, read_series, series_files
from .dicomsr import ReportedCMB, comparison_numbers, make_report, reported_cmbs, scan_numbers
from .errors import InputError, one_line
from .files import atomic_path
from .findings import Finding
from .modelstore.models import DEFAULT_MODEL
from .scan import Scan

PathLike = Union[str, Path]
SEGMENTATION_NAME = "cmb.seg.dcm"
REPORT_NAME = "cmb.sr.dcm"
COMPARISON_NAME = "comparison.sr.dcm"
DICOM_NAMES = (SEGMENTATION_NAME, REPORT_NAME, COMPARISON_NAME)
SERIES_NUMBERS = {"seg": 9901, "sr": 9902, "comparison": 9903}
MANUFACTURER = "SHIVA-CMB for 3D Slicer"
NOT_FOR_READS = "not for clinical or research reads"


def source_series(scan: Scan, dicom_source: Optional[PathLike], enabled: bool = True) -> Optional[SourceSeries]:
    """The series a scan's DICOM results are made against: the scan's own when it is a DICOM series, else
    ``dicom_source``; None when there is none or they are switched off."""
    if dicom_source is not None and not enabled:
        raise InputError(Path(dicom_source), "--dicom-source asks for DICOM results and --no-dicom leaves them out: "
                                             "give one of them")
    if dicom_source is not None and scan.format == "dicom":
        raise InputError(Path(dicom_source), "the scan is a DICOM series itself: --dicom-source is for a NIfTI or NRRD "
                                             "scan converted from one")
    if not enabled:
        return None
    if scan.format == "dicom":
        return read_series(scan.files, scan.path, scan.geometry)
    if dicom_source is not None:
        folder = Path(dicom_source)
        return read_series(series_files(folder), folder, scan.geometry)
    return None


def statement(model: Mapping[str, Any]) -> str:
    """The statement the results carry when a demonstration model made them ("" otherwise)."""
    if model.get("name") != DEFAULT_MODEL and NOT_FOR_READS not in str(model.get("description", "")).lower():
        return ""
    return f"Findings made by {_name(model)}, a demonstration model: {NOT_FOR_READS}."


def _name(model: Mapping[str, Any]) -> str:
    return f"{model.get('name') or 'unknown model'} {model.get('version') or ''}".strip()


def identity(model: Mapping[str, Any], reader: str = "") -> Dict[str, Any]:
    """Series and equipment attributes of the results; ``reader``: who corrected the findings ("" for none)."""
    import highdicom as hd

    said = statement(model)
    suffix = " (demonstration model, not for reads)" if said else ""
    return {"manufacturer": MANUFACTURER, "model_name": "shivacmb", "software_versions": __version__,
            "device_serial_number": __version__, "device_uid": hd.UID(), "reader": person_name(reader),
            "statement": said,
            "content_description": f"CMBs by {_name(model)}"[:64],
            "seg_series_number": SERIES_NUMBERS["seg"], "sr_series_number": SERIES_NUMBERS["sr"],
            "seg_series_description": f"CMB segmentation{suffix}", "sr_series_description": f"CMB report{suffix}",
            "comparison_series_description": f"CMB follow-up report{suffix}"}


def person_name(reader: str) -> str:
    """A reader's name as a DICOM person name: "Family^Given..." as given, a single name as the family name."""
    reader = " ".join(reader.split())[:64]
    return reader if not reader or "^" in reader else reader + "^"


def algorithm_model(model: Mapping[str, Any]) -> Dict[str, str]:
    """The model's name and version as the objects name the algorithm."""
    return {"name": str(model.get("name") or "unknown"), "version": str(model.get("version") or "unknown")}


@dataclass
class DicomResults:
    """DICOM objects of one result, in the order they are written and sent (a Segmentation before its report)."""

    series: SourceSeries
    objects: List[Tuple[str, Any]]

    @property
    def names(self) -> List[str]:
        return [name for name, _ in self.objects]

    def write(self, folder: Path, stack: Optional[contextlib.ExitStack] = None) -> List[str]:
        """Write every object into ``folder`` under a temporary name, each renamed into place when ``stack`` closes
        (when all are written, without one); their file names."""
        with contextlib.ExitStack() as own:
            for name, dataset in self.objects:
                dataset.save_as(str((stack or own).enter_context(atomic_path(folder / name))))
        return self.names

    def summary(self) -> Dict[str, Any]:
        """What run.json records: the source series and each object's series and instance UIDs."""
        return {"source": self.series.summary(),
                "objects": {name: {"sop_class_uid": str(ds.SOPClassUID),
                                   "series_instance_uid": str(ds.SeriesInstanceUID),
                                   "sop_instance_uid": str(ds.SOPInstanceUID)} for name, ds in self.objects}}


@contextlib.contextmanager
def _refused_by(series: SourceSeries) -> Iterator[None]:
    """What highdicom refuses in the source series becomes one line naming it."""
    try:
        yield
    except (ValueError, AttributeError) as err:  # what highdicom raises for what a source image lacks
        raise InputError(series.folder, f"cannot make DICOM results against this series: {one_line(err)} (give "
                                        "--no-dicom to leave them out)") from None


def scan_results(series: SourceSeries, labels: np.ndarray, findings: Sequence[Finding], model: Mapping[str, Any],
                 reader: str = "") -> DicomResults:
    """cmb.seg.dcm (when a CMB has voxels in ``labels``, ``[k, j, i]`` on the scan's grid) and cmb.sr.dcm."""
    named, algorithm = identity(model, reader), algorithm_model(model)
    with _refused_by(series):
        segmentation, numbers = make_segmentation(series, labels, findings, named, algorithm)
        report = make_report(series, reported_cmbs(findings, numbers), scan_numbers(findings), named, algorithm,
                             segmentation)
    return DicomResults(series, ([(SEGMENTATION_NAME, segmentation)] if segmentation is not None else [])
                        + [(REPORT_NAME, report)])


def comparison_results(series: SourceSeries, cmbs: Sequence[ReportedCMB], new_cmbs: int, grade: str,
                       model: Mapping[str, Any], segmentation: Optional[Any] = None) -> DicomResults:
    """comparison.sr.dcm against the follow-up's series (CMBs with a segment reference ``segmentation``)."""
    named = identity(model)
    named["sr_series_number"] = SERIES_NUMBERS["comparison"]
    with _refused_by(series):
        report = make_report(series, cmbs, comparison_numbers(new_cmbs, grade), named, algorithm_model(model),
                             segmentation, description_key="comparison_series_description")
    return DicomResults(series, [(COMPARISON_NAME, report)])
