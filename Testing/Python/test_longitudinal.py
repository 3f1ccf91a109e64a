"""Follow-up against baseline: registration, matching, new/persistent/not-seen CMBs, ARIA-H grade, outputs."""

import base64
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk

import pair_phantoms
import phantoms
from helpers import files_under, run_cli
from SHIVACMBLib import longitudinal
from SHIVACMBLib.errors import InputError
from SHIVACMBLib.findings import Finding, read_tsv, write_tsv
from SHIVACMBLib.geometry import Geometry
from SHIVACMBLib.longitudinal import (NEW, NOT_SEEN, OUTSIDE, PERSISTENT, CompareOptions, Registration,
                                      aria_h_grade, compare, match_findings, register, tolerance_for)
from SHIVACMBLib.pipeline import SegmentOptions
from SHIVACMBLib.preprocess import compute_brain_mask
from SHIVACMBLib.segfile import read_seg_nrrd


def test_fifty_random_pairs_are_classified_right():
    """Random motion (up to 15 degrees, 20 mm), follow-up grid (spacing, LPS/RAS/permuted axes, oblique)
    and contrast; CMBs from the truth, so only registration and matching are tested."""
    failures = []
    for seed in range(50):
        result = pair_phantoms.compare_truth(pair_phantoms.random_pair(seed))
        if result.found != result.expected or result.registration.mask_dice < longitudinal.MIN_MASK_DICE:
            failures.append((seed, result.found, result.expected, round(result.registration.mask_dice, 3)))
        persistent = [m.distance_mm for m in result.rows if m.status == PERSISTENT]
        assert max(persistent, default=0.0) < 1.5, (seed, persistent)  # registration error at the CMBs
    assert not failures, failures


@pytest.mark.parametrize("new, grade", [(0, "none"), (1, "mild"), (4, "mild"), (5, "moderate"), (9, "moderate"),
                                        (10, "severe"), (31, "severe")])
def test_aria_h_grade_boundaries(new, grade):
    assert aria_h_grade(new) == grade


def test_aria_h_grade_refuses_a_negative_count():
    with pytest.raises(ValueError):
        aria_h_grade(-1)


def _write_truth(pair, folder):
    paths = pair_phantoms.write_pair(pair, folder)
    tables = []
    for cmbs, image, name in ((pair.baseline_cmbs, pair.baseline, "b"), (pair.followup_cmbs, pair.followup, "f")):
        findings, _ = pair_phantoms.truth_findings(cmbs, image)
        write_tsv(findings, folder / f"{name}.tsv")
        tables.append(folder / f"{name}.tsv")
    return paths, tables


@pytest.mark.parametrize("n_new, grade", [(4, "mild"), (5, "moderate"), (9, "moderate"), (10, "severe")])
def test_grade_boundaries_end_to_end(tmp_path, n_new, grade):
    pair = pair_phantoms.make_pair(7, n_baseline=2, n_removed=0, n_new=n_new)
    (b, f), (bt, ft) = _write_truth(pair, tmp_path)
    result = compare(b, f, tmp_path / "out", CompareOptions(baseline_findings=bt, followup_findings=ft, report=False))
    assert result.summary["counts"][NEW] == n_new
    assert result.summary["counts"][PERSISTENT] == 2
    assert json.loads((tmp_path / "out" / "comparison.json").read_text())["aria_h"]["grade"] == grade


def test_command_writes_every_output(tmp_path):
    pair = pair_phantoms.make_pair(11, n_baseline=5, n_removed=2, n_new=3, followup_spacing=(0.9, 0.9, 2.5),
                                   followup_orientation="PIL")
    (b, f), (bt, ft) = _write_truth(pair, tmp_path)
    out = tmp_path / "cmp"
    done = run_cli(["compare", b, f, "--out", out, "--baseline-findings", bt, "--followup-findings", ft,
                    "--progress", "json"])
    assert done.returncode == 0, done.stderr
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["stage"] == "done" and last["grade"] == "mild"
    assert last["counts"] == {NEW: 3, PERSISTENT: 3, NOT_SEEN: 2, OUTSIDE: 0}
    assert files_under(out) == sorted(["comparison.json", "comparison.seg.nrrd", "comparison.tsv", "report.html"])

    rows = longitudinal.read_tsv(out / "comparison.tsv")
    assert list(rows[0]) == list(longitudinal.COLUMNS)
    follow_findings = {x.cmb_id: x for x in read_tsv(ft)}
    base_findings = {x.cmb_id: x for x in read_tsv(bt)}
    for row in rows:
        if row["followup_id"] != "n/a":  # the follow-up's own RAS position and volume
            own = follow_findings[int(row["followup_id"])]
            assert np.allclose([float(row[f"followup_{c}"]) for c in "ras"], own.ras, atol=0.01)
            assert float(row["followup_volume_mm3"]) == pytest.approx(own.volume_mm3, abs=0.01)
        if row["baseline_id"] != "n/a":
            own = base_findings[int(row["baseline_id"])]
            assert np.allclose([float(row[f"baseline_{c}"]) for c in "ras"], own.ras, atol=0.01)
            assert float(row["baseline_volume_mm3"]) == pytest.approx(own.volume_mm3, abs=0.01)
        assert (row["distance_mm"] != "n/a") == (row["status"] == PERSISTENT)

    labels, grid, segments = read_seg_nrrd(out / "comparison.seg.nrrd")
    assert grid.size == Geometry.of(pair.followup).size
    new_ids = {int(r["followup_id"]) for r in rows if r["status"] == NEW}
    names = {int(s["labelValue"]): s["name"] for s in segments}
    assert {k for k, name in names.items() if name.startswith("new CMB")} == new_ids
    assert all(names[k] == f"new CMB {k}" for k in new_ids)
    colours = {int(s["labelValue"]): tuple(s["color"]) for s in segments}
    assert all(np.allclose(colours[k], longitudinal.NEW_COLOUR) for k in new_ids)
    assert not any(np.allclose(colours[k], longitudinal.NEW_COLOUR) for k in set(names) - new_ids)
    assert set(np.unique(labels)) - {0} == set(names)

    report = (out / "report.html").read_text(encoding="utf-8")
    thumbnails = _thumbnails(report, tmp_path)
    assert len(thumbnails) == report.count('alt="new CMB') == 6 * len(new_ids)  # 3 views at baseline, 3 at follow-up
    for (cmb_id, when, view), rgb in thumbnails.items():
        red = np.argwhere(np.all(rgb == (255, 40, 40), axis=2))
        centre = (np.asarray(rgb.shape[:2]) - 1) / 2
        if when == "follow-up":  # the new CMB outlined, in the middle
            assert len(red) and np.linalg.norm(red.mean(axis=0) - centre) < 4.0, (cmb_id, view)
        else:  # the same place at baseline: no CMB there
            grey = rgb[..., 1].astype(float)
            middle = grey[int(centre[0]) - 2:int(centre[0]) + 3, int(centre[1]) - 2:int(centre[1]) + 3]
            assert not len(red) and middle.mean() > 0.6 * np.median(grey[grey > 0]), (cmb_id, view)
    assert "ARIA-H microhemorrhage" in report and "a radiologist confirms" in report
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["registration"]["mask_dice"] >= longitudinal.MIN_MASK_DICE
    assert summary["matching"]["tolerance_mm"] == 5.0  # twice the 2.5 mm slices


def _thumbnails(report, folder):
    """The report's thumbnails of new CMBs as RGB arrays, by (cmb_id, baseline or follow-up, view)."""
    found = {}
    for cmb_id, when, view, data in re.findall(r'alt="new CMB (\d+) at (baseline|follow-up) (\w+)"[^>]*'
                                               r'src="data:image/png;base64,([^"]+)"', report):
        path = folder / "thumbnail.png"
        path.write_bytes(base64.b64decode(data))
        found[(int(cmb_id), when, view)] = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return found


def test_affine_stage_follows_a_head_scaled_by_the_scanner():
    """Gradient scaling (-4 % to +5 % per axis) on top of a rigid motion: the affine stage halves the error."""
    motion = np.eye(4)
    motion[:3, :3] = phantoms.rotation((1.0, 0.2, 0.1), 8.0) @ np.diag([1.05, 0.96, 1.04])
    motion[:3, 3] = (5.0, -8.0, 4.0)
    pair = pair_phantoms.make_pair(12, n_baseline=7, n_removed=0, n_new=0, motion=motion)
    baseline, followup = pair_phantoms.scans(pair)
    masks = compute_brain_mask(baseline), compute_brain_mask(followup)
    truth = np.array([p for p, _ in pair.baseline_cmbs.values()])
    errors = {}
    for affine in (False, True):
        registration = register(baseline, followup, *masks, affine=affine)
        assert registration.kind == ("affine" if affine else "rigid")
        moved = truth @ motion[:3, :3].T + motion[:3, 3]
        errors[affine] = np.linalg.norm(registration.to_followup_ras(truth) - moved, axis=1)
    assert errors[True].max() < 1.0 and errors[True].mean() < 0.8 * errors[False].mean(), errors


def test_poor_registration_is_refused_with_one_line(tmp_path):
    pair = pair_phantoms.make_pair(3)
    other = pair_phantoms.make_pair(4)
    shrunk = Geometry.of(other.followup)
    squeezed = Geometry(shrunk.size, tuple(s * f for s, f in zip(shrunk.spacing, (0.6, 1.3, 0.6))), shrunk.origin,
                        shrunk.direction)  # another head: narrower, longer
    image = sitk.Image(other.followup)
    squeezed.stamp(image)
    b, f = pair_phantoms.write_pair(pair_phantoms.Pair(pair.baseline, image, np.eye(4), {}, {}), tmp_path)
    write_tsv([], tmp_path / "none.tsv")
    out = tmp_path / "cmp"
    done = run_cli(["compare", b, f, "--out", out, "--baseline-findings", tmp_path / "none.tsv",
                    "--followup-findings", tmp_path / "none.tsv"])
    assert done.returncode == 4, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "brain-mask Dice" in done.stderr and "not graded" in done.stderr
    assert not out.exists()


def test_findings_of_another_scan_are_refused(tmp_path):
    pair = pair_phantoms.make_pair(5)
    (b, f), (bt, ft) = _write_truth(pair, tmp_path)
    far = [Finding(1, 300.0, 0.0, 0.0, 0, 0, 0, 10.0, 10)]
    write_tsv(far, tmp_path / "far.tsv")
    with pytest.raises(InputError, match="outside the field of view"):
        compare(b, f, tmp_path / "out", CompareOptions(baseline_findings=tmp_path / "far.tsv", followup_findings=ft))
    assert not (tmp_path / "out").exists()


def test_rejected_findings_are_left_out(tmp_path):
    pair = pair_phantoms.make_pair(6, n_baseline=4, n_removed=0, n_new=2)
    (b, f), (bt, ft) = _write_truth(pair, tmp_path)
    followup = read_tsv(ft)
    new_ids = [x.cmb_id for x in followup][-2:]  # truth ids of new CMBs are the highest
    followup[-1].status = "rejected"
    write_tsv(followup, ft)
    result = compare(b, f, tmp_path / "out", CompareOptions(baseline_findings=bt, followup_findings=ft, report=False))
    assert [m.followup.cmb_id for m in result.rows if m.status == NEW] == new_ids[:1]


def _identity():
    return Registration(sitk.Euler3DTransform(), "rigid", 0.0, 1.0, 0.0)


def _finding(cmb_id, ras, volume=20.0):
    return Finding(cmb_id, *ras, 0, 0, 0, volume, 5)


def _grid(fov=(100, 100, 100), spacing=(1.0, 1.0, 1.0)):
    return phantoms.grid_around((0, 0, 0), fov, spacing)


def test_matching_is_one_to_one_optimal_within_the_tolerance():
    grid = _grid()
    baseline = [_finding(1, (0, 0, 0)), _finding(2, (3.5, 0, 0)), _finding(3, (20, 0, 0))]
    # greedy nearest-first would pair follow-up 1 (at 2.0) with baseline 2 and leave baseline 1 alone
    followup = [_finding(1, (2.0, 0, 0)), _finding(2, (6.0, 0, 0)), _finding(3, (24.1, 0, 0))]
    rows = match_findings(baseline, followup, _identity(), grid, grid, 4.0)
    pairs = {(m.baseline.cmb_id, m.followup.cmb_id) for m in rows if m.status == PERSISTENT}
    assert pairs == {(1, 1), (2, 2)}
    assert {m.baseline.cmb_id for m in rows if m.status == NOT_SEEN} == {3}  # 4.1 mm away
    assert {m.followup.cmb_id for m in rows if m.status == NEW} == {3}
    new = next(m for m in rows if m.status == NEW)
    assert new.baseline_ras == pytest.approx((24.1, 0, 0))  # where it would be at baseline


def test_cmbs_outside_the_other_field_of_view_are_not_new_or_gone():
    baseline_grid, followup_grid = _grid(fov=(100, 100, 30)), _grid(fov=(100, 100, 40))  # S -15..15, -20..20
    baseline = [_finding(1, (0, 0, 10)), _finding(2, (10, 0, -12))]
    followup = [_finding(1, (0, 0, 0)), _finding(2, (0, 0, 18))]
    rows = match_findings(baseline, followup, _identity(), baseline_grid, followup_grid, 4.0)
    assert {(m.status, m.baseline and m.baseline.cmb_id, m.followup and m.followup.cmb_id) for m in rows} == {
        (NOT_SEEN, 1, None), (NOT_SEEN, 2, None), (NEW, None, 1), (OUTSIDE, None, 2)}
    rows = match_findings(followup, baseline, _identity(), followup_grid, baseline_grid, 4.0)
    assert {(m.status, m.baseline and m.baseline.cmb_id) for m in rows if m.baseline} == {
        (NOT_SEEN, 1), (OUTSIDE, 2)}


def test_tolerance_scales_with_the_coarsest_voxel():
    iso = _grid()
    assert tolerance_for(iso, iso) == 4.0
    assert tolerance_for(iso, _grid(spacing=(0.5, 0.5, 2.0))) == 4.0
    assert tolerance_for(_grid(spacing=(1.0, 1.0, 3.0)), iso) == 6.0
    assert tolerance_for(iso, iso, minimum_mm=5.0) == 5.0


def test_lps_anisotropic_followup_gives_the_same_result_as_matching_geometry(tmp_path, model_dir):
    """Detection included: the follow-up stored LPS at 0.5x0.5x2 mm and the same follow-up on the baseline's
    RAS 1 mm grid give the same statuses, counts, grade and positions."""
    results = {}
    for name, spacing, orientation in (("matching", (1.0, 1.0, 1.0), "RAS"), ("lps-aniso", (0.5, 0.5, 2.0), "LPS")):
        pair = pair_phantoms.make_pair(21, n_baseline=4, n_removed=1, n_new=2, followup_spacing=spacing,
                                       followup_orientation=orientation, oblique_deg=0.0,
                                       cmb_radius=(2.2, 3.0))  # all within the test detector's reach
        folder = tmp_path / name
        b, f = pair_phantoms.write_pair(pair, folder, (".nii.gz", ".nrrd"))
        detection = SegmentOptions(model=str(model_dir), location=False)
        result = compare(b, f, folder / "out", CompareOptions(detection=detection))
        assert (folder / "out" / "followup" / "findings.tsv").is_file()
        truth = {}
        for cmbs, side in ((pair.baseline_cmbs, "baseline"), (pair.followup_cmbs, "followup")):
            found = [getattr(m, side) for m in result.rows if getattr(m, side) is not None]
            truth[side] = pair_phantoms.truth_ids(cmbs, found, limit_mm=1.0)
            assert len(truth[side]) == len(found), (name, side, found)  # every detection is a true CMB
        results[name] = (result, pair_phantoms.given_statuses(result.rows, truth["baseline"], truth["followup"]),
                         pair)
    (a, statuses_a, pair), (b_, statuses_b, _) = results["matching"], results["lps-aniso"]
    assert statuses_a == statuses_b == dict(pair.expected, **{OUTSIDE: set()})
    assert a.summary["counts"] == b_.summary["counts"] and a.summary["aria_h"] == b_.summary["aria_h"]
    key = lambda m: (m.status, m.baseline_ras)  # noqa: E731
    for ma, mb in zip(sorted(a.rows, key=key), sorted(b_.rows, key=key)):
        assert ma.status == mb.status
        assert np.allclose(ma.baseline_ras, mb.baseline_ras, atol=1.0)
        assert np.allclose(ma.followup_ras, mb.followup_ras, atol=1.0)
