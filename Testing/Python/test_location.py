"""MARS location of CMBs: atlas registration on atlas-made phantoms, parcellation table, counts."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

import phantoms
from atlas_phantoms import make_atlas_phantom, pick_sites
from SHIVACMBLib.errors import InputError
from SHIVACMBLib.findings import Finding, read_tsv
from SHIVACMBLib.geometry import Geometry, resample
from SHIVACMBLib.location import (AREA_OF, AXIS_SCALE, CODE_OF, MIN_DICE, SUBREGIONS, UNKNOWN, VOLUME_RATIO,
                                  WHITE_MATTER, RegistrationCheck, boston_distribution, count_locations, locate,
                                  parcellation_table)
from SHIVACMBLib import pipeline
from SHIVACMBLib.pipeline import SegmentOptions, segment
from SHIVACMBLib.preprocess import compute_brain_mask
from SHIVACMBLib.report import _location_section

# (spacing, direction): LPS-stored, RAS-stored oblique thick slices, sagittal permuted oblique
ATLAS_GEOMETRIES = {
    "lps-1mm": ((1.0, 1.0, 1.0), np.eye(3)),
    "ras-oblique-0.9x0.9x3": ((0.9, 0.9, 3.0), np.diag([-1.0, -1.0, 1.0]) @ phantoms.rotation((1, 0.4, 0), 18)),
    "sagittal-oblique-1.2x1x1": ((1.2, 1.0, 1.0),
                                 np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float) @ phantoms.rotation((0, 0, 1), 12)),
}


def test_atlas_registration_gives_mars_area_and_side_in_every_geometry():
    results = []
    for seed, (spacing, direction) in enumerate(ATLAS_GEOMETRIES.values(), start=11):
        phantom = make_atlas_phantom(seed, spacing, direction, n_cmb=13)
        mask = compute_brain_mask(phantom.scan())
        located = locate(phantom.image, mask.image, phantom.labels, phantom.findings)
        assert located.warnings == [] and located.summary["failed"] == [], located.summary
        # the B-spline lowers the overlap of these affine-moved brains a little (0.01-0.03) and stays
        assert located.summary["registration"] == "affine + B-spline, Mattes MI", located.summary
        assert "brain overlap Dice 0.9" in _location_section(located.summary, located.findings)
        results += [(f, truth) for f, truth in zip(located.findings, phantom.truth)]
    areas = [f.mars_area == area for f, (_name, area, _side, _x) in results]
    assert sum(areas) / len(areas) >= 0.95, [(f.region, t) for f, t in results]
    lateral = [(f.side, side) for f, (_n, _a, side, x) in results if abs(x) > 3.0]
    assert lateral and all(found == truth for found, truth in lateral), lateral


def test_atlas_registration_follows_a_non_linear_warp():
    spacing, direction = ATLAS_GEOMETRIES["ras-oblique-0.9x0.9x3"]
    phantom = make_atlas_phantom(24, spacing, direction, n_cmb=13, warp_mm=20.0)  # brain moved 2.5 mm on average
    mask = compute_brain_mask(phantom.scan())
    located = locate(phantom.image, mask.image, phantom.labels, phantom.findings)
    assert located.summary["registration"] == "affine + B-spline, Mattes MI" and located.warnings == []
    assert [f.mars_area for f in located.findings] == [area for _name, area, _side, _x in phantom.truth]
    lateral = [(f.side, side) for f, (_n, _a, side, x) in zip(located.findings, phantom.truth) if abs(x) > 8.0]
    assert lateral and all(found == truth for found, truth in lateral), lateral


def test_right_cerebellum_cmb_in_lps_1x1x3_scan_is_infratentorial_right():
    rng = np.random.default_rng(5)
    sites = [s for s in pick_sites(rng, 6, 2.5, names=["cerebellum"]) if -s[0][0] > 10.0][:2]
    assert sites
    phantom = make_atlas_phantom(5, (1.0, 1.0, 3.0), np.eye(3), sites=sites, radius=2.5)
    assert Geometry.of(phantom.image).orientation() == "LPS"
    mask = compute_brain_mask(phantom.scan())
    located = locate(phantom.image, mask.image, phantom.labels, phantom.findings)
    for finding in located.findings:
        assert (finding.region, finding.mars_area, finding.side) == ("cerebellum", "infratentorial", "right")


def _corner_mask(grid: Geometry, _true_mask: np.ndarray) -> np.ndarray:
    wrong = np.zeros(grid.array_shape, np.uint8)
    wrong[:25, :25, :25] = 1  # a 37 mm cube in a corner of the field of view
    return wrong


def _one_hemisphere(grid: Geometry, true_mask: np.ndarray) -> np.ndarray:
    lps_x = grid.index_to_lps(np.stack(np.nonzero(true_mask)[::-1], axis=1).astype(float))[:, 0]
    wrong = np.zeros(grid.array_shape, np.uint8)
    wrong[tuple(np.array(np.nonzero(true_mask))[:, lps_x < np.median(lps_x)])] = 1
    return wrong


@pytest.mark.parametrize("wrong_mask, reason", [(_corner_mask, "atlas volume scaled by"),
                                                (_one_hemisphere, "brain overlap Dice")],
                         ids=["corner-cube", "one-hemisphere"])
def test_failed_registration_gives_unknown_and_a_warning(wrong_mask, reason):
    phantom = make_atlas_phantom(3, (1.5, 1.5, 1.5), n_cmb=3)
    grid = Geometry.of(phantom.image)
    true_mask = sitk.GetArrayFromImage(resample(compute_brain_mask(phantom.scan()).image, grid,
                                                sitk.sitkNearestNeighbor, pixel_type=sitk.sitkUInt8))
    located = locate(phantom.image, grid.with_image(wrong_mask(grid, true_mask)), phantom.labels, phantom.findings)
    assert len(located.warnings) == 1 and "registration failed" in located.warnings[0]
    assert reason in located.warnings[0], located.warnings
    assert all((f.region, f.mars_area, f.side) == (UNKNOWN,) * 3 for f in located.findings)
    assert located.summary["by_area_side"][UNKNOWN]["count"] == 3
    assert located.summary["boston"] == UNKNOWN
    assert any(reason in problem for problem in located.summary["failed"])
    assert "registration failed (" in _location_section(located.summary, located.findings)


def test_registration_check_accepts_human_brain_scales_only():
    assert RegistrationCheck(0.95, 1.12, (1.09, 1.02, 1.01)).problems() == []
    affine_only = RegistrationCheck(0.95, 1.12, (1.09, 1.02, 1.01), "lowered the brain overlap").to_dict()
    assert affine_only["registration"] == "affine, Mattes MI (the B-spline lowered the brain overlap)"
    assert RegistrationCheck(0.9, 2.4, (1.4, 1.35, 1.27)).problems() == []  # a 0.9 L brain
    assert RegistrationCheck(0.9, 0.6, (0.9, 0.85, 0.78)).problems() == []  # a 3.5 L head
    assert RegistrationCheck(0.74, 1.1, (1.1, 1.0, 1.0)).problems() == [f"brain overlap Dice 0.74 < {MIN_DICE}"]
    tiny = RegistrationCheck(0.95, 25.9, (3.07, 2.92, 2.89)).problems()  # atlas shrunk into a wrong small mask
    assert len(tiny) == 2 and tiny[0].startswith("atlas volume scaled by 25.90")
    mirrored = RegistrationCheck(0.95, -1.1, (1.1, 1.0, 1.0)).problems()  # left-right flipped
    assert mirrored == [f"atlas volume scaled by -1.10, outside {VOLUME_RATIO[0]}-{VOLUME_RATIO[1]}"]
    squashed = RegistrationCheck(0.95, 1.12, (2.0, 0.8, 0.7)).problems()  # a plausible volume, a slab's shape
    assert squashed == [f"atlas axes scaled by 2.00/0.80/0.70, outside {AXIS_SCALE[0]}-{AXIS_SCALE[1]}"]


# --- parcellation ---------------------------------------------------------------------------

PARC_GRID = Geometry((80, 80, 60), (1.0, 1.0, 1.0), (40.0, 40.0, -30.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS axes


def _parcellation() -> np.ndarray:
    """An aparc+aseg-like map on PARC_GRID ([k, j, i]; i runs to the right, x = i - 40 mm RAS)."""
    k, j, i = np.indices(PARC_GRID.array_shape)
    x = i - 40.0
    parc = np.where(x < 0, 2, 41)  # left / right cerebral white matter
    parc[(j >= 70) & (x < 0)] = 1003  # ctx-lh-caudalmiddlefrontal
    parc[(j >= 70) & (x >= 0)] = 2029  # ctx-rh-superiorparietal
    parc[(j < 12) & (np.abs(x) < 10)] = 16  # brainstem
    parc[(k >= 40) & (j >= 20) & (j < 40) & (x >= -20) & (x < -10)] = 10  # left thalamus
    parc[(k >= 40) & (j >= 20) & (j < 40) & (x >= -30) & (x < -20)] = 12  # left putamen
    parc[(k < 10) & (j >= 40) & (j < 60)] = 24  # CSF
    return parc.astype(np.int16)


def _findings_at(points_ras, grid: Geometry, radius: float = 1.6, straddle=None):
    """Spheres at RAS points (and one CMB made of the voxels holding the ``straddle`` points)."""
    labels = np.zeros(grid.array_shape, np.uint8)
    k, j, i = np.indices(grid.array_shape)
    ras = grid.index_to_ras(np.stack([i, j, k], axis=-1).astype(float))
    findings = []
    for n, p in enumerate(points_ras, start=1):
        inside = np.linalg.norm(ras - np.asarray(p), axis=-1) <= radius
        labels[inside] = n
        ijk = np.rint(grid.ras_to_index(np.asarray(p))).astype(int)
        findings.append(Finding(n, *map(float, p), *map(int, ijk), float(inside.sum()), int(inside.sum())))
    if straddle is not None:  # two voxels, one each side of a boundary
        n = len(findings) + 1
        for p in straddle:
            ijk = np.rint(grid.ras_to_index(np.asarray(p))).astype(int)
            labels[ijk[2], ijk[1], ijk[0]] = n
        centre = np.mean(straddle, axis=0)
        findings.append(Finding(n, *map(float, centre), *map(int, ijk), 2.0, 2))
    return labels, findings


@pytest.mark.parametrize("native_direction", [np.eye(3), phantoms.rotation((0.2, 1, 0), 25)], ids=["lps", "oblique"])
@pytest.mark.parametrize("stored", ["int16", "float32"])
def test_parcellation_labels_map_to_mars_regions(tmp_path, native_direction, stored):
    path = tmp_path / "aparc+aseg.nii.gz"
    parcellation = _parcellation() if stored == "int16" else _parcellation().astype(np.float32) - 0.2  # 40.8 is 41
    sitk.WriteImage(PARC_GRID.with_image(parcellation), str(path))
    native = phantoms.grid_around((0.0, 0.0, 0.0), (90, 90, 70), (0.8, 0.8, 1.5), native_direction)
    # RAS y of parcellation row j is j - 40, z of slice k is k - 30
    points = [(-15.0, -10.0, 15.0),  # left thalamus
              (-12.0, 28.0, 0.0),  # left white matter 2 mm from frontal cortex
              (25.0, 26.0, 0.0),  # right white matter next to parietal cortex
              (25.0, 0.0, -5.0),  # right white matter far from cortex
              (5.0, -34.0, 0.0),  # brainstem, right of the midline
              (0.3, -34.0, -10.0),  # brainstem, on the midline
              (12.0, 5.0, -26.0)]  # CSF only within 4 mm
    labels, findings = _findings_at(points, native)
    image = native.with_image(np.ones(native.array_shape, np.float32))
    located = locate(image, image, labels, findings, parcellation=path)
    got = [(f.region, f.mars_area, f.side) for f in located.findings]
    assert got == [("thalamus", "deep", "left"), ("frontal", "lobar", "left"), ("parietal", "lobar", "right"),
                   ("deep_white_matter", "deep", "right"), ("brainstem", "infratentorial", "right"),
                   ("brainstem", "infratentorial", "midline"), (UNKNOWN, UNKNOWN, UNKNOWN)]
    assert located.summary["source"] == "parcellation" and located.warnings == []
    assert located.summary["boston"] == "mixed"


def test_a_tie_between_regions_goes_to_the_first_in_mars_order(tmp_path):
    path = tmp_path / "aparc+aseg.nii.gz"
    sitk.WriteImage(PARC_GRID.with_image(_parcellation()), str(path))
    labels, findings = _findings_at([], PARC_GRID, straddle=[(-21.0, -10.0, 15.0), (-20.0, -10.0, 15.0)])
    image = PARC_GRID.with_image(np.ones(PARC_GRID.array_shape, np.float32))
    located = locate(image, image, labels, findings, parcellation=path)  # one voxel putamen, one thalamus
    assert [(f.region, f.side) for f in located.findings] == [("basal_ganglia", "left")]


def test_parcellation_without_freesurfer_labels_is_refused(tmp_path):
    path = tmp_path / "labels.nii.gz"
    sitk.WriteImage(PARC_GRID.with_image(np.full(PARC_GRID.array_shape, 999, np.int16)), str(path))
    labels, findings = _findings_at([(0.0, 0.0, 0.0)], PARC_GRID)
    image = PARC_GRID.with_image(np.ones(PARC_GRID.array_shape, np.float32))
    with pytest.raises(InputError, match="labels.nii.gz: no FreeSurfer/SynthSeg label"):
        locate(image, image, labels, findings, parcellation=path)


def test_parcellation_outside_the_scan_is_refused(tmp_path):
    path = tmp_path / "aseg.nii.gz"
    elsewhere = Geometry(PARC_GRID.size, PARC_GRID.spacing, (40.0, 40.0, 30.0), PARC_GRID.direction)  # 60 mm up
    sitk.WriteImage(elsewhere.with_image(_parcellation()), str(path))
    labels, findings = _findings_at([(0.0, 0.0, 0.0)], PARC_GRID)
    image = PARC_GRID.with_image(np.ones(PARC_GRID.array_shape, np.float32))
    for cmbs in (findings, []):  # checked even when there is no CMB to locate
        with pytest.raises(InputError, match=r"aseg.nii.gz: parcellation does not overlap the scan: only 0% of"):
            locate(image, image, labels, cmbs, parcellation=path)


def test_freesurfer_mgz_parcellation_is_refused_with_the_conversion(tmp_path):
    path = tmp_path / "aparc+aseg.mgz"
    path.write_bytes(b"\x1f\x8b")
    labels, findings = _findings_at([(0.0, 0.0, 0.0)], PARC_GRID)
    image = PARC_GRID.with_image(np.ones(PARC_GRID.array_shape, np.float32))
    with pytest.raises(InputError, match=r"aparc\+aseg.mgz: .*mri_convert aparc\+aseg.mgz aparc\+aseg.nii.gz"):
        locate(image, image, labels, findings, parcellation=path)


def test_parcellation_table_is_consistent():
    table = parcellation_table()
    for label, (region, side) in table.items():
        assert region in CODE_OF or region in (WHITE_MATTER, "none"), (label, region)
        assert side in ("left", "right", "-"), (label, side)
    # FreeSurfer conventions: aseg left/right pairs, Desikan-Killiany lobes, wmparc, SynthSeg's labels
    assert table[10] == ("thalamus", "left") and table[49] == ("thalamus", "right")
    assert table[16] == ("brainstem", "-") and table[8][0] == table[47][0] == "cerebellum"
    assert table[1035] == ("insula", "left") and table[2035] == ("insula", "right")
    assert table[1024][0] == "frontal" and table[2022][0] == "parietal" and table[1011][0] == "occipital"
    assert table[2030][0] == "temporal" and table[17][0] == "temporal"
    assert table[3028] == ("frontal", "left") and table[4000] == (WHITE_MATTER, "right") and table[5002] == ("deep_white_matter", "right")
    assert all(table[v][0] == "corpus_callosum" for v in range(251, 256))
    synthseg = (2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28,
                41, 42, 43, 44, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60)
    assert all(v in table for v in synthseg)
    assert [AREA_OF[name] for name, _a in SUBREGIONS].count("infratentorial") == 2


# --- counts ---------------------------------------------------------------------------------


def _finding(n, area, side, status="unreviewed", region=None):
    region = region or {"lobar": "frontal", "deep": "thalamus", "infratentorial": "cerebellum"}.get(area, UNKNOWN)
    return Finding(n, 0.0, 0.0, 0.0, 0, 0, 0, 1.0, 1, region=region, mars_area=area, side=side, status=status)


def test_counts_by_area_side_rating_and_boston():
    findings = [_finding(1, "lobar", "left", "definite"), _finding(2, "lobar", "right", "possible"),
                _finding(3, "deep", "midline", "definite"), _finding(4, "infratentorial", "right", "rejected")]
    counts = count_locations(findings)
    assert counts["by_area_side"]["lobar"] == {"left": 1, "right": 1, "midline": 0}
    assert counts["by_area_side"]["infratentorial"]["right"] == 0  # rejected CMBs are not counted
    assert counts["by_rating"]["definite"]["deep"]["midline"] == 1
    assert counts["by_rating"]["possible"]["lobar"]["right"] == 1
    assert counts["by_region"] == {"frontal": 2, "thalamus": 1}
    assert counts["boston"] == "mixed"
    assert "by_rating" not in count_locations([_finding(1, "lobar", "left")])
    assert boston_distribution([_finding(1, "lobar", "left"), _finding(2, "lobar", "right")]) == "strictly_lobar"
    assert boston_distribution([_finding(1, "deep", "left"), _finding(2, "infratentorial", "right")]) == "deep"
    assert boston_distribution([_finding(1, "lobar", "left"), _finding(2, UNKNOWN, UNKNOWN)]) == UNKNOWN
    assert boston_distribution([]) == "none"


def test_segment_with_parcellation_fills_findings_run_and_report(tmp_path, iso_scan, scene, model_dir):
    grid = Geometry((90, 100, 80), (1.2, 1.2, 1.2), (54.0, 60.0, -48.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    k, j, i = np.indices(grid.array_shape)
    x = grid.index_to_ras(np.stack([i, j, k], axis=-1).astype(float))[..., 0]
    parcellation = tmp_path / "aseg.nii.gz"
    sitk.WriteImage(grid.with_image(np.where(x < 0, 2, 41).astype(np.uint8)), str(parcellation))
    result = segment(iso_scan, tmp_path / "out", SegmentOptions(model=str(model_dir), parcellation=parcellation))
    rows = read_tsv(result.output_dir / "findings.tsv")
    assert len(rows) == len(scene.spheres)
    for row in rows:
        assert math.copysign(1, row.r) == (1 if row.side == "right" else -1)
        assert (row.region, row.mars_area) == ("deep_white_matter", "deep")
    run = json.loads((result.output_dir / "run.json").read_text())
    assert run["location"]["source"] == "parcellation" and run["location"]["boston"] == "deep"
    assert sum(run["location"]["by_area_side"]["deep"].values()) == len(rows)
    assert "location" in run["timings_s"]
    assert "Location (MARS)" in (result.output_dir / "report.html").read_text()


def test_segment_refuses_a_parcellation_of_another_space_before_inference(tmp_path, iso_scan, model_dir, monkeypatch):
    grid = Geometry((60, 60, 60), (1.0, 1.0, 1.0), (30.0, 30.0, 400.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))  # far above
    parcellation = tmp_path / "aseg.nii.gz"
    sitk.WriteImage(grid.with_image(np.full(grid.array_shape, 41, np.uint8)), str(parcellation))
    monkeypatch.setattr(pipeline, "get_ensemble", lambda *a, **k: pytest.fail("inference ran"))
    with pytest.raises(InputError, match="aseg.nii.gz: parcellation does not overlap the scan"):
        segment(iso_scan, tmp_path / "out", SegmentOptions(model=str(model_dir), parcellation=parcellation))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
