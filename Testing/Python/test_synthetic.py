"""The phantom generator: truth where the objects are, mimics apart from CMBs, determinism, the command."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from SHIVACMBLib import cli

from SHIVACMBLib.devtools import synthetic
from SHIVACMBLib.geometry import Geometry


@pytest.fixture(scope="module")
def oblique_phantom() -> synthetic.Phantom:
    """An anisotropic phantom with many CMBs (seed chosen to give an oblique grid)."""
    for seed in range(100, 200):
        rng = np.random.default_rng(seed)
        synthetic.random_subject(rng)
        acq = synthetic.random_acquisition(rng, "t2s", (0.9, 0.9, 2.5))
        if np.degrees(np.arccos(min(1.0, np.abs(acq.direction).max(axis=0).min()))) > 5:
            return synthetic.make_phantom(seed, "t2s", (0.9, 0.9, 2.5), n_cmb=12)
    raise AssertionError("no oblique acquisition in 100 seeds")


def test_cmb_truth_is_where_the_cmb_was_planted(oblique_phantom: synthetic.Phantom) -> None:
    grid = Geometry.of(oblique_phantom.image)
    assert grid.obliquity_degrees() > 5
    labels = sitk.GetArrayFromImage(oblique_phantom.cmb_labels)
    image = sitk.GetArrayFromImage(oblique_phantom.image).astype(float)
    cmbs = [o for o in oblique_phantom.objects if o.kind == "cmb"]
    assert len(cmbs) >= 10 and set(np.unique(labels)) == {0, *(c.label for c in cmbs)}
    brain_level = np.percentile(image[image > 0], 75)
    for cmb in cmbs:
        kji = np.argwhere(labels == cmb.label)
        centroid = grid.index_to_ras(kji.mean(axis=0)[::-1])
        # the visible region (core + symmetric blooming) is centred on the CMB, within one slice
        assert np.linalg.norm(centroid - np.asarray(cmb.centre)) < 0.5 * max(grid.spacing) + 0.5
        assert image[labels == cmb.label].mean() < 0.7 * brain_level  # dark
        assert 2.0 <= cmb.diameter_mm <= 10.0 and cmb.area in synthetic.AREAS


def test_mimics_are_labelled_apart_from_cmbs(oblique_phantom: synthetic.Phantom) -> None:
    cmb = sitk.GetArrayFromImage(oblique_phantom.cmb_labels)
    mimic = sitk.GetArrayFromImage(oblique_phantom.mimic_labels)
    assert not np.any((cmb > 0) & (mimic > 0))
    mimics = [o for o in oblique_phantom.objects if o.kind == "mimic"]
    assert {m.cls for m in mimics} >= {"vein", "iron"}
    assert all(m.cls in synthetic.MIMIC_CLASSES for m in mimics)
    present = set(np.unique(mimic)) - {0}
    assert present <= {m.label for m in mimics}
    veins = [m for m in mimics if m.cls == "vein" and m.label in present]
    assert len(veins) >= 5  # veins are drawn, not only listed


def test_every_mimic_class_occurs() -> None:
    classes = set()
    for seed in range(6):
        rng = np.random.default_rng(seed)
        subject = synthetic.random_subject(rng)
        classes |= {m.cls for m in synthetic.place_mimics(rng, subject, "swi", [])}
    classes |= {"iron", "air_bone"}  # drawn in the template: checked in the rendering test below
    assert classes == set(synthetic.MIMIC_CLASSES)


def test_template_mimics_and_areas() -> None:
    image, mimics, names = synthetic._template_image("swi", np.random.default_rng(0))
    assert {n.split(":")[0] for n in names} == {"iron", "air_bone"}
    assert set(np.unique(sitk.GetArrayFromImage(mimics))) - {0} == set(range(1, len(names) + 1))
    tpl = synthetic.template()
    areas = synthetic.area_of(tpl.code_at(np.array([[0.0, -26.0, -30.0], [24.0, 2.0, 2.0], [0.0, -5.0, 60.0]])),
                              tpl.depth_at(np.array([[0.0, -26.0, -30.0], [24.0, 2.0, 2.0], [0.0, -5.0, 60.0]])))
    assert [synthetic.AREAS[a] for a in areas] == ["infratentorial", "deep", "lobar"]


def test_same_seed_same_phantom() -> None:
    a = synthetic.make_phantom(3, spacing=(1.5, 1.5, 1.5))
    b = synthetic.make_phantom(3, spacing=(1.5, 1.5, 1.5))
    c = synthetic.make_phantom(4, spacing=(1.5, 1.5, 1.5))
    assert np.array_equal(sitk.GetArrayFromImage(a.image), sitk.GetArrayFromImage(b.image))
    assert a.info == b.info
    assert a.info != c.info


def test_cohort_like_counts_and_sizes() -> None:
    rng = np.random.default_rng(0)
    counts = np.array([synthetic.cmb_count(rng) for _ in range(4000)])
    assert counts.min() == 0 and counts.max() <= 30 and (counts >= 16).mean() > 0.02
    assert 0.55 < (counts <= 2).mean() < 0.75
    diameters = np.array([synthetic.cmb_diameter(rng) for _ in range(4000)])
    assert diameters.min() >= 2 and diameters.max() <= 10
    assert np.median(diameters) < 4 and (diameters > 6).mean() > 0.02


def test_phantom_command_writes_scans_truth_and_index(tmp_path) -> None:
    args = ["phantom", "--out", str(tmp_path), "--n", "2", "--seed", "11", "--spacing", "1.5", "--modality", "swi"]
    assert cli.main(args) == 0
    index = (tmp_path / "phantoms.tsv").read_text(encoding="utf-8").splitlines()
    assert len(index) == 3 and index[1].startswith("phantom-000011\t11\tswi")
    for scan_id in ("phantom-000011", "phantom-000012"):
        paths = synthetic.truth_paths(tmp_path, scan_id)
        assert all(p.exists() for p in paths.values())
        image, truth = sitk.ReadImage(str(paths["image"])), sitk.ReadImage(str(paths["cmb"]))
        assert Geometry.of(image) == Geometry.of(truth) and image.GetSpacing() == pytest.approx((1.5,) * 3)
        rows = synthetic.read_objects(paths["objects"])
        assert sum(r["kind"] == "cmb" for r in rows) == int(index[1 + ("12" in scan_id)].split("\t")[9])
    before = paths["image"].stat().st_mtime_ns
    assert cli.main(args) == 0  # a rerun keeps finished scans
    assert paths["image"].stat().st_mtime_ns == before


def test_phantom_command_refuses_bad_spacing(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["phantom", "--out", "x", "--spacing", "1,2"])
    assert exit_info.value.code == 2
    assert "three voxel sizes" in capsys.readouterr().err
