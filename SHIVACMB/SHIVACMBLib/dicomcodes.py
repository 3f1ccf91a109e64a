"""The coded concepts of the DICOM results: the CMB terminology, MARS regions, areas and sides, review and follow-up
statuses, measurements and units.

Standard concepts (SNOMED CT ``SCT``, DICOM ``DCM``, LOINC ``LN``, UCUM) carry the values of the DICOM standard's
tables (Part 16; the tests compare them with pydicom's copy). What the standard does not name (the MARS areas, the
basal ganglia and deep white matter as MARS regions, an unspecified lobe, review status, fold agreement, the Boston
distribution, the follow-up status and the ARIA-H grade) is in the private coding scheme ``99SHIVACMB``, which every
object that uses it declares (:func:`private_scheme`). docs/dicom.md lists them all.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from .mars import SUBREGIONS
from .resources import ANATOMIC_REGION, cmb_terminology

PRIVATE = "99SHIVACMB"
PRIVATE_NAME = "SHIVA-CMB concepts"
PRIVATE_OWNER = "SHIVA-CMB for 3D Slicer developers"


def concept(value: str, scheme: str, meaning: str) -> Any:
    """A coded concept (highdicom CodedConcept)."""
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def private(value: str, meaning: str) -> Any:
    """A concept of the private scheme ``99SHIVACMB``."""
    return concept(value, PRIVATE, meaning)


def private_scheme() -> Any:
    """The Coding Scheme Identification Sequence item declaring ``99SHIVACMB``."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE
    item.CodingSchemeName = PRIVATE_NAME
    item.CodingSchemeResponsibleOrganization = PRIVATE_OWNER
    return item


# Standard concepts as (value, scheme, meaning), DICOM PS3.16.
STANDARD: Dict[str, Tuple[str, str, str]] = {
    "brain": (ANATOMIC_REGION[1], ANATOMIC_REGION[0], ANATOMIC_REGION[2]),
    "frontal": ("83251001", "SCT", "Frontal lobe"),
    "parietal": ("16630005", "SCT", "Parietal lobe"),
    "temporal": ("78277001", "SCT", "Temporal lobe"),
    "occipital": ("31065004", "SCT", "Occipital lobe"),
    "insula": ("36169008", "SCT", "Insula"),
    "thalamus": ("42695009", "SCT", "Thalamus"),
    "internal_capsule": ("85637007", "SCT", "internal capsule"),
    "external_capsule": ("10517005", "SCT", "external capsule"),
    "corpus_callosum": ("88442005", "SCT", "Corpus callosum"),
    "brainstem": ("119238007", "SCT", "Brain Stem"),
    "cerebellum": ("113305005", "SCT", "Cerebellum"),
    "left": ("7771000", "SCT", "Left"),
    "right": ("24028007", "SCT", "Right"),
    "median": ("130290", "DCM", "Median"),
    "volume": ("118565006", "SCT", "Volume"),
    "probability": ("122157", "DCM", "Probability"),
    "maximum": ("56851009", "SCT", "Maximum"),
    "mean": ("373098007", "SCT", "Mean"),
    "number_of_lesions": ("246206008", "SCT", "Number of lesions (observable entity)"),
    "cubic_millimeter": ("mm3", "UCUM", "cubic millimeter"),
    "no_units": ("1", "UCUM", "no units"),
    "brain_mri": ("24590-2", "LN", "Brain MRI"),
    "comment": ("121106", "DCM", "Comment"),
    "center_of_mass": ("128138", "DCM", "Center of Mass"),
    "artificial_intelligence": ("123110", "DCM", "Artificial Intelligence"),
    "device": ("121007", "DCM", "Device"),
    "person": ("121006", "DCM", "Person"),
}
QUALITATIVE_EVALUATIONS = ("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500's container of comments


def standard(name: str) -> Any:
    return concept(*STANDARD[name])


def cmb_category_and_type() -> Tuple[Any, Any]:
    """The segmented property category and type of a CMB: the module's terminology (Resources/Terminology)."""
    entry, _ = cmb_terminology()
    (category_scheme, category, category_meaning), (type_scheme, kind, type_meaning) = entry["category"], entry["type"]
    return concept(category, category_scheme, category_meaning), concept(kind, type_scheme, type_meaning)


_PRIVATE_REGIONS = {
    "unspecified_lobe": ("LOBE-NOS", "Cerebral lobe, not specified"),
    "basal_ganglia": ("BASAL-GANGLIA", "Basal ganglia (MARS)"),
    "deep_white_matter": ("DEEP-WM", "Deep white matter (MARS)"),
}
AREA_CODES = {"lobar": ("AREA-LOBAR", "Lobar area (MARS)"), "deep": ("AREA-DEEP", "Deep area (MARS)"),
              "infratentorial": ("AREA-INFRATENT", "Infratentorial area (MARS)")}
REVIEW_STATUS = ("REVIEW-STATUS", "Review status")
REVIEW_CODES = {"definite": ("DEFINITE", "Definite CMB"), "possible": ("POSSIBLE", "Possible CMB"),
                "rejected": ("REJECTED", "Not a CMB"), "added": ("ADDED", "CMB added by a reader")}
FOLD_AGREEMENT = ("FOLD-AGREEMENT", "Fraction of model folds detecting the CMB")
BOSTON = ("BOSTON", "Boston criteria CMB distribution")
BOSTON_CODES = {"strictly_lobar": ("STRICTLY-LOBAR", "Strictly lobar"), "mixed": ("MIXED", "Mixed"),
                "deep": ("DEEP", "Deep"), "none": ("NONE", "No CMB"), "unknown": ("UNKNOWN", "Not known")}
FOLLOWUP_STATUS = ("FOLLOWUP-STATUS", "Status at follow-up")
FOLLOWUP_CODES = {"new": ("NEW", "New CMB"), "persistent": ("PERSISTENT", "Persistent CMB"),
                  "not seen at follow-up": ("NOT-SEEN", "Not seen at follow-up"),
                  "outside the other scan": ("OUTSIDE", "Outside the other scan")}
NEW_COUNT = ("NEW-CMB-COUNT", "Number of new CMBs")
ARIA_H = ("ARIA-H-MH", "ARIA-H microhemorrhage severity")
ARIA_H_CODES = {"none": ("ARIA-H-NONE", "No ARIA-H microhemorrhage"), "mild": ("ARIA-H-MILD", "Mild"),
                "moderate": ("ARIA-H-MODERATE", "Moderate"), "severe": ("ARIA-H-SEVERE", "Severe")}
assert set(_PRIVATE_REGIONS) | set(STANDARD) >= {name for name, _ in SUBREGIONS}


def region(name: str) -> Optional[Any]:
    """The finding site of a MARS sub-region (None when the region is not known)."""
    if name in _PRIVATE_REGIONS:
        return private(*_PRIVATE_REGIONS[name])
    if name in dict(SUBREGIONS):
        return standard(name)
    return None


def finding_site(location: Any, side: str) -> Any:
    """A finding site with the side: left and right as laterality, the midline as the topographical modifier
    Median."""
    from highdicom.sr import FindingSite

    if side in ("left", "right"):
        return FindingSite(anatomic_location=location, laterality=standard(side))
    if side == "midline":
        return FindingSite(anatomic_location=location, topographical_modifier=standard("median"))
    return FindingSite(anatomic_location=location)
