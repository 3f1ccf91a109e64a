"""``cmb.sr.dcm`` and ``comparison.sr.dcm``: Comprehensive 3D SR measurement reports (DICOM TID 1500, highdicom).

One measurement group per CMB: Volumetric ROI (TID 1411) referencing its segment in cmb.seg.dcm, or a plain group
(TID 1501) for a CMB without a segment (a baseline CMB not seen at follow-up). Each holds the tracking identifier
``CMB <id>``, the finding (category and type of the CMB terminology), its MARS region and side as the finding site,
its volume, maximum and mean probability and fold agreement (the model as algorithm), its review status where a
reader set one, its status at follow-up in a comparison, and its centroid as a 3D point (SCOORD3D POINT, "Center
of Mass", in the series' frame of reference). Values are those of findings.tsv, as written there. One more group
holds the scan's numbers: the count of CMBs (not rejected) and their counts by MARS area and side, and the Boston
distribution; in a comparison, the number of new CMBs and the ARIA-H grade. When a demonstration model made the
findings, a Comment under "Qualitative Evaluations" says they are not for reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import dicomcodes as dc
from .dicomseries import SourceSeries
from .findings import NA, Finding, to_text_rows
from .location import count_locations
from .mars import AREAS, SIDES


@dataclass(frozen=True)
class ReportedCMB:
    """One CMB of a report: its findings.tsv cells, its centroid (LPS mm), its segment and its follow-up status."""

    label: str  # tracking identifier: "CMB 3"
    cells: Dict[str, str]
    lps: Tuple[float, float, float]
    segment: Optional[int] = None  # segment number in the report's Segmentation
    followup_status: Optional[str] = None


def reported_cmbs(findings: Sequence[Finding], segments: Dict[int, int]) -> List[ReportedCMB]:
    """The CMBs of one scan, with their segment numbers (by cmb_id)."""
    return [ReportedCMB(f"CMB {f.cmb_id}", cells, centroid_lps(cells), segments.get(f.cmb_id))
            for f, cells in zip(findings, to_text_rows(findings))]


def centroid_lps(cells: Dict[str, str]) -> Tuple[float, float, float]:
    """A finding's centroid, RAS in findings.tsv, as DICOM patient coordinates (LPS)."""
    return -float(cells["r"]), -float(cells["a"]), float(cells["s"])


def scan_numbers(findings: Sequence[Finding]) -> Tuple[List[Any], List[Any]]:
    """Measurements and evaluations of one scan: the CMB count, counts by MARS area and side, Boston distribution."""
    from highdicom.sr import Measurement, QualitativeEvaluation

    counts = count_locations(findings)
    table = counts["by_area_side"]
    total = sum(f.status != "rejected" for f in findings)
    measurements = [Measurement(name=dc.standard("number_of_lesions"), value=total, unit=dc.standard("no_units"),
                                finding_sites=[dc.finding_site(dc.standard("brain"), "")])]
    for area in AREAS:
        for side in SIDES:
            measurements.append(Measurement(name=dc.standard("number_of_lesions"), value=table[area][side],
                                            unit=dc.standard("no_units"),
                                            finding_sites=[dc.finding_site(dc.private(*dc.AREA_CODES[area]), side)]))
    boston = QualitativeEvaluation(dc.private(*dc.BOSTON), dc.private(*dc.BOSTON_CODES[str(counts["boston"])]))
    return measurements, [boston]


def comparison_numbers(new_cmbs: int, grade: str) -> Tuple[List[Any], List[Any]]:
    """Measurements and evaluations of a comparison: the number of new CMBs and the ARIA-H grade."""
    from highdicom.sr import Measurement, QualitativeEvaluation

    return ([Measurement(name=dc.private(*dc.NEW_COUNT), value=new_cmbs, unit=dc.standard("no_units"))],
            [QualitativeEvaluation(dc.private(*dc.ARIA_H), dc.private(*dc.ARIA_H_CODES[grade]))])


def make_report(series: SourceSeries, cmbs: Sequence[ReportedCMB], numbers: Tuple[List[Any], List[Any]],
                identity: Dict[str, Any], model: Dict[str, Any], segmentation: Optional[Any] = None,
                description_key: str = "sr_series_description") -> Any:
    """The SR of ``cmbs`` and the scan's ``numbers`` against ``series`` (and ``segmentation``, which the CMBs with a
    segment number reference)."""
    import highdicom as hd

    algorithm = hd.sr.AlgorithmIdentification(name=str(model["name"]), version=str(model["version"]))
    frame_of_reference = str(series.first.FrameOfReferenceUID)
    groups = [_group(cmb, algorithm, frame_of_reference, segmentation) for cmb in cmbs]
    measurements, evaluations = numbers
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="Scan summary"),
        algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=evaluations))
    report = hd.sr.MeasurementReport(observation_context=_observers(identity, model),
                                     procedure_reported=dc.standard("brain_mri"), imaging_measurements=groups)
    if identity["statement"]:
        report[0].ContentSequence.append(_comment(identity["statement"]))
    evidence = list(series.datasets) + ([segmentation] if segmentation is not None else [])
    document = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=hd.UID(), series_number=identity["sr_series_number"],
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=identity["manufacturer"], is_complete=True,
        is_final=False, is_verified=False, series_description=identity[description_key])
    document.CodingSchemeIdentificationSequence = [dc.private_scheme()]
    return document


def _group(cmb: ReportedCMB, algorithm: Any, frame_of_reference: str, segmentation: Optional[Any]) -> Any:
    """The measurement group of one CMB (TID 1411 with its segment, else TID 1501), its centroid appended."""
    import highdicom as hd
    import numpy as np

    cells = cmb.cells
    by_model = None if cells["status"] == "added" else algorithm
    measurements = [hd.sr.Measurement(name=dc.standard("volume"), value=float(cells["volume_mm3"]),
                                      unit=dc.standard("cubic_millimeter"))]
    for column, name, derivation in (("max_prob", "probability", "maximum"), ("mean_prob", "probability", "mean"),
                                     ("fold_agreement", None, None)):
        if cells[column] == NA:
            continue
        measurements.append(hd.sr.Measurement(
            name=dc.standard(name) if name else dc.private(*dc.FOLD_AGREEMENT), value=float(cells[column]),
            unit=dc.standard("no_units"), derivation=dc.standard(derivation) if derivation else None,
            algorithm_id=algorithm))
    evaluations = []
    if cells["status"] in dc.REVIEW_CODES:
        evaluations.append(hd.sr.QualitativeEvaluation(dc.private(*dc.REVIEW_STATUS),
                                                       dc.private(*dc.REVIEW_CODES[cells["status"]])))
    if cmb.followup_status is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(dc.private(*dc.FOLLOWUP_STATUS),
                                                       dc.private(*dc.FOLLOWUP_CODES[cmb.followup_status])))
    location = dc.region(cells["region"])
    category, kind = dc.cmb_category_and_type()
    common = dict(tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=cmb.label),
                  finding_type=kind, finding_category=category, algorithm_id=by_model,
                  finding_sites=None if location is None else [dc.finding_site(location, cells["side"])],
                  measurements=measurements, qualitative_evaluations=evaluations)
    if cmb.segment is not None and segmentation is not None:
        reference = hd.sr.ReferencedSegment(  # what dcmqi writes; from_segmentation fails on a one-segment SEG
            sop_class_uid=str(segmentation.SOPClassUID), sop_instance_uid=str(segmentation.SOPInstanceUID),
            segment_number=cmb.segment,
            source_series=hd.sr.SourceSeriesForSegmentation(str(segmentation.ReferencedSeriesSequence[0]
                                                                .SeriesInstanceUID)))
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=reference, **common)
    else:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    group[0].ContentSequence.append(hd.sr.Scoord3DContentItem(
        name=dc.standard("center_of_mass"), graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=np.array([cmb.lps], dtype=float), frame_of_reference_uid=frame_of_reference,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return group


def _observers(identity: Dict[str, Any], model: Dict[str, Any]) -> Any:
    """The device that made the findings (shivacmb and the model) and, for corrected findings, the reader."""
    import highdicom as hd

    device = hd.sr.ObserverContext(
        observer_type=dc.standard("device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=identity["device_uid"], name=identity["model_name"], manufacturer_name=identity["manufacturer"],
            model_name=f"{model['name']} {model['version']}"[:64]))
    person = None
    if identity["reader"]:
        person = hd.sr.ObserverContext(
            observer_type=dc.standard("person"),
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name=identity["reader"]))
    return hd.sr.ObservationContext(observer_person_context=person, observer_device_context=device)


def _comment(text: str) -> Any:
    """TID 1500's Qualitative Evaluations container holding one Comment."""
    import highdicom as hd

    container = hd.sr.ContainerContentItem(name=dc.concept(*dc.QUALITATIVE_EVALUATIONS),
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([hd.sr.TextContentItem(
        name=dc.standard("comment"), value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)])
    return container
