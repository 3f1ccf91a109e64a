"""The MARS rating scale's vocabulary (Microbleed Anatomical Rating Scale), defined once.

Sub-regions in the rating form's order (also the location step's tie-break order and the
atlas codes: code = position + 1), the three areas and the sides. Standard library only:
the rating session and the Slicer module read it without the location step's imports.
"""

from typing import Tuple

SUBREGIONS: Tuple[Tuple[str, str], ...] = (
    ("frontal", "lobar"), ("parietal", "lobar"), ("temporal", "lobar"), ("occipital", "lobar"),
    ("insula", "lobar"), ("unspecified_lobe", "lobar"),
    ("basal_ganglia", "deep"), ("thalamus", "deep"), ("internal_capsule", "deep"), ("external_capsule", "deep"),
    ("corpus_callosum", "deep"), ("deep_white_matter", "deep"),
    ("brainstem", "infratentorial"), ("cerebellum", "infratentorial"),
)
AREAS = ("lobar", "deep", "infratentorial")
SIDES = ("left", "right", "midline")
UNKNOWN = "unknown"
