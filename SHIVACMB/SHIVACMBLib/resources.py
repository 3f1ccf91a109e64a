"""Where the project's data files are: the module's Resources/ and the embedded models/.

Three layouts are served: a source checkout (also an editable install and Slicer's
"Add module path"), an installed wheel (data copied under the package), and a Slicer
extension build (Resources/ beside the package).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Tuple

_LIB = Path(__file__).resolve().parent

TERMINOLOGY_FILE = "SegmentationCategoryTypeModifier-SHIVACMB.term.json"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ANATOMIC_REGION = ("SCT", "12738006", "Brain")


def resources_dir() -> Path:
    """The module's Resources folder (Icons/, UI/, Terminology/)."""
    for candidate in (_LIB.parent / "Resources", _LIB / "resources"):
        if (candidate / "Terminology").is_dir():
            return candidate
    raise FileNotFoundError(f"SHIVACMB Resources folder not found near {_LIB}")


def bundled_models_dir() -> Optional[Path]:
    """The project's embedded models folder, if this installation has one."""
    for candidate in (_LIB.parents[1] / "models", _LIB / "bundled_models"):
        if candidate.is_dir():
            return candidate
    return None


@lru_cache(maxsize=1)
def cmb_terminology() -> Tuple[Dict[str, object], Tuple[float, float, float]]:
    """The CMB terminology entry (slicerio dict form) and its display colour (0-1 RGB)."""
    data = json.loads((resources_dir() / "Terminology" / TERMINOLOGY_FILE).read_text(encoding="utf-8"))
    category = data["SegmentationCodes"]["Category"][0]
    cmb_type = category["Type"][0]

    def code(entry: dict) -> list:
        return [entry["CodingSchemeDesignator"], entry["CodeValue"], entry["CodeMeaning"]]

    entry = {
        "contextName": data["SegmentationCategoryTypeContextName"],
        "category": code(category),
        "type": code(cmb_type),
        "anatomicContextName": ANATOMIC_CONTEXT,
        "anatomicRegion": list(ANATOMIC_REGION),
    }
    colour = tuple(round(c / 255.0, 6) for c in cmb_type["recommendedDisplayRGBValue"])
    return entry, colour
