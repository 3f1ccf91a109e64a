"""Realistic phantoms: atlas anatomy, truth where the objects are, the two families, the command."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from SHIVACMBLib.devtools import anatomy, headphantom, synthetic

from SHIVACMBLib import cli
from SHIVACMBLib.geometry import Geometry
from SHIVACMBLib.location import AREA_OF, SUBREGIONS, load_atlas


@pytest.fixture(scope="module")
def atlas_phantom() -> synthetic.Phantom:
    """An oblique, thick-slice, whole-head atlas phantom with many CMBs."""
    for seed in range(100, 200):
        rng = np.random.default_rng(seed)
        headphantom.random_subject(rng, headphantom.ATLAS)
        acq = headphantom.random_acquisition(rng, headphantom.ATLAS, "t2s", (0.9, 0.9, 2.5))
        if np.degrees(np.arccos(min(1.0, np.abs(acq.direction).max(axis=0).min()))) > 5:
            return headphantom.make_head_phantom(seed, "atlas", "t2s", (0.9, 0.9, 2.5), n_cmb=12,
                                                 skull_stripped=False)
    raise AssertionError("no oblique acquisition in 100 seeds")


@pytest.fixture(scope="module")
def ood_phantom() -> synthetic.Phantom:
    return headphantom.make_head_phantom(7, "ood", "swi", (1.2, 1.2, 1.2), n_cmb=8, skull_stripped=True)


def test_tissue_map_follows_the_mars_atlas() -> None:
    atlas = anatomy.head_atlas()
    brain = np.isin(atlas.codes, anatomy.BRAIN_TISSUES)
    assert 1600 < brain.sum() / 1000 < 1900  # mL of tissue in the MNI template
    mars = sitk.GetArrayFromImage(load_atlas()[1]).transpose(2, 1, 0)
    pad = [(int(a), int(b)) for a, b in zip(anatomy.PAD_LOW, anatomy.PAD_HIGH)]
    mars = np.pad(mars, pad)
    for tissue, region in (("thalamus", "thalamus"), ("brainstem", "brainstem"), ("striatum", "basal_ganglia"),
                           ("cerebellar_cortex", "cerebellum")):
        codes = mars[atlas.codes == anatomy.CODE[tissue]]
        code = next(n for n, (name, _a) in enumerate(SUBREGIONS, start=1) if name == region)
        assert np.mean(codes == code) > 0.95, tissue
    # ventricles are CSF deep in the brain, sulci the rest
    assert 10 < np.sum(atlas.codes == anatomy.CODE["ventricle"]) / 1000 < 40


def test_heads_have_layers_and_atrophy() -> None:
    atlas = anatomy.head_atlas()
    plain = anatomy.make_head(np.random.default_rng(0), anatomy.HeadShape())
    old = anatomy.make_head(np.random.default_rng(0), anatomy.HeadShape(ventricle_growth_mm=4.0,
                                                                        sulcal_widening_mm=2.0))
    for name in ("skull", "marrow", "scalp", "muscle", "eye", "air"):
        assert np.any(plain == anatomy.CODE[name]), name
    assert np.sum(old == anatomy.CODE["ventricle"]) > 2 * np.sum(plain == anatomy.CODE["ventricle"])
    assert np.sum(old == anatomy.CODE["csf"]) > np.sum(plain == anatomy.CODE["csf"])
    # nothing outside the brain becomes brain, and the skull surrounds the brain at its top
    assert not np.any(np.isin(plain, anatomy.BRAIN_TISSUES) & (atlas.codes == 0))
    top = atlas.index((0.0, -20.0, 40.0))
    column = plain[top[0], top[1], top[2]:].tolist()  # upwards from inside the brain
    layers = [column.index(anatomy.CODE[name]) for name in ("skull", "scalp")]
    assert column.index(anatomy.CODE["csf"], 0) < layers[0] < layers[1] and column[-1] == 0


def test_brain_volumes_are_human() -> None:
    rng = np.random.default_rng(1)
    volumes = [headphantom.brain_volume_ml(headphantom.random_subject(rng, headphantom.ATLAS)) for _ in range(300)]
    assert 1000 < min(volumes) and max(volumes) < 1750
    assert max(volumes) - min(volumes) > 400


def test_cmb_truth_is_where_the_cmb_was_planted(atlas_phantom: synthetic.Phantom) -> None:
    grid = Geometry.of(atlas_phantom.image)
    assert grid.obliquity_degrees() > 5
    labels = sitk.GetArrayFromImage(atlas_phantom.cmb_labels)
    image = sitk.GetArrayFromImage(atlas_phantom.image).astype(float)
    cmbs = [o for o in atlas_phantom.objects if o.kind == "cmb"]
    assert len(cmbs) >= 10 and set(np.unique(labels)) == {0, *(c.label for c in cmbs)}
    k, j, i = np.indices(image.shape)
    voxels = grid.index_to_ras(np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(float)).reshape(*image.shape, 3)
    for cmb in cmbs:
        kji = np.argwhere(labels == cmb.label)
        centroid = grid.index_to_ras(kji.mean(axis=0)[::-1])
        assert np.linalg.norm(centroid - np.asarray(cmb.centre)) < 0.5 * max(grid.spacing) + 0.5
        # darker than the tissue around it (a shell of 2-4 diameters, away from its blooming)
        distance = np.linalg.norm(voxels - np.asarray(cmb.centre), axis=-1)
        around = (distance > 2 * cmb.diameter_mm) & (distance < 4 * cmb.diameter_mm + 3) & (labels == 0)
        assert image[labels == cmb.label].min() < 0.8 * np.median(image[around])
        assert cmb.area in synthetic.AREAS and cmb.side in ("left", "right", "midline")


def test_cmbs_sit_in_their_mars_area() -> None:
    """The recorded area is the MARS atlas's at the CMB's MNI site (before the subject's transform)."""
    rng = np.random.default_rng(3)
    subject = headphantom.random_subject(rng, headphantom.ATLAS)
    head = anatomy.make_head(rng, anatomy.HeadShape())
    cmbs = headphantom.place_cmbs(rng, subject, head, 30, [], "swi", headphantom.ATLAS)
    labels = load_atlas()[1]
    grid = Geometry.of(labels)
    array = sitk.GetArrayViewFromImage(labels)
    agree = 0
    for cmb in cmbs:
        # back to MNI through the subject's own map (scanner RAS -> head)
        x = np.asarray(cmb.centre)
        mni = subject.matrix @ (x - subject.position + subject.warp(x[None])[0])
        i, j, k = np.rint(grid.ras_to_index(mni)).astype(int)
        region = SUBREGIONS[int(array[k, j, i]) - 1][0] if array[k, j, i] else None
        agree += region is not None and AREA_OF[region] == cmb.area
        assert cmb.side == ("midline" if abs(mni[0]) <= 2 else "right" if mni[0] > 0 else "left")
    assert len(cmbs) >= 25 and agree >= len(cmbs) - 1


def test_mimics_cover_every_class_apart_from_cmbs(atlas_phantom: synthetic.Phantom) -> None:
    cmb = sitk.GetArrayFromImage(atlas_phantom.cmb_labels)
    mimic = sitk.GetArrayFromImage(atlas_phantom.mimic_labels)
    assert not np.any((cmb > 0) & (mimic > 0))
    mimics = [o for o in atlas_phantom.objects if o.kind == "mimic"]
    present = set(np.unique(mimic)) - {0}
    assert present <= {m.label for m in mimics}
    classes = {m.cls for m in mimics if m.label in present}
    for seed in range(4):
        rng = np.random.default_rng(seed)
        subject = headphantom.random_subject(rng, headphantom.ATLAS)
        classes |= {m.cls for m in headphantom.place_mimics(rng, subject, "swi", [], headphantom.ATLAS)}
    assert classes == set(synthetic.MIMIC_CLASSES)
    veins = [m for m in mimics if m.cls == "vein" and m.label in present]
    assert len(veins) >= 8


def test_ood_family_changes_mechanisms(ood_phantom: synthetic.Phantom) -> None:
    assert ood_phantom.info["family"] == "ood" and ood_phantom.info["skull_stripped"]
    cmbs = [o for o in ood_phantom.objects if o.kind == "cmb"]
    assert cmbs and all(len(c.parts) == 1 and len(c.parts[0]) == 9 for c in cmbs)  # ellipsoid axes
    rng = np.random.default_rng(0)
    atlas_lut = headphantom.tissue_intensities(rng, headphantom.ATLAS, "t2s", 25.0)
    ood_lut = headphantom.tissue_intensities(rng, headphantom.OOD, "t2s", 25.0)
    code = anatomy.CODE
    for lut in (atlas_lut, ood_lut):  # T2*: CSF brightest, grey above white, iron nuclei darker
        assert lut[code["csf"]] > lut[code["cortex"]] > lut[code["white_matter"]] > lut[code["pallidum"]]
    # skull stripped: zero outside the brain, brain intact
    image = sitk.GetArrayFromImage(ood_phantom.image)
    assert 0.05 < np.mean(image > 0) < 0.5
    labels = sitk.GetArrayFromImage(ood_phantom.cmb_labels)
    assert np.all(image[labels > 0] > 0) or np.mean(image[labels > 0] > 0) > 0.9


def test_same_seed_same_phantom(ood_phantom: synthetic.Phantom) -> None:
    again = headphantom.make_head_phantom(7, "ood", "swi", (1.2, 1.2, 1.2), n_cmb=8, skull_stripped=True)
    assert np.array_equal(sitk.GetArrayFromImage(again.image), sitk.GetArrayFromImage(ood_phantom.image))
    assert again.info == ood_phantom.info


def test_phantom_command_family(tmp_path) -> None:
    args = ["phantom", "--out", str(tmp_path), "--n", "1", "--seed", "5", "--spacing", "2", "--family", "atlas"]
    assert cli.main(args) == 0
    paths = synthetic.truth_paths(tmp_path, "phantom-000005")
    rows = synthetic.read_objects(paths["objects"])
    assert rows and all(r["side"] in ("left", "right", "midline") for r in rows if r["kind"] == "cmb")
    assert '"family": "atlas"' in (tmp_path / "truth" / "phantom-000005_info.json").read_text(encoding="utf-8")


def test_wide_family_softens_cmb_edges() -> None:
    """The training-only wide family: soft-edged CMBs (edge width recorded), labelled where planted; a softer
    edge spreads the CMB's fall-off over more voxels."""
    phantom = headphantom.make_head_phantom(11, "wide", "swi", (1.0, 1.0, 1.0), n_cmb=6, skull_stripped=False)
    cmbs = [o for o in phantom.objects if o.kind == "cmb"]
    assert cmbs and all(len(c.parts[0]) == 10 and 1.0 <= c.parts[0][9] <= 3.0 for c in cmbs)
    labels = sitk.GetArrayFromImage(phantom.cmb_labels)
    for cmb in cmbs:
        i, j, k = np.rint(Geometry.of(phantom.cmb_labels).ras_to_index(np.asarray(cmb.centre))).astype(int)
        assert labels[k, j, i] == cmb.label
    grid = Geometry.from_matrix((40, 40, 40), np.diag([1.0, 1.0, 1.0, 1.0]))
    fall_off = []
    for edge in (1.0, 3.0):
        cmb = synthetic.PhantomObject(label=1, kind="cmb", cls="cmb", area="lobar", centre=(-20.0, -20.0, 20.0),
                                      diameter_mm=6.0, darkness=0.1, parts=[(1, 0, 0, 0, 1, 0, 0, 0, 1, edge)])
        signal = np.ones((40, 40, 40), np.float32)
        headphantom.render_ellipsoid_cmb(grid, signal, np.zeros(signal.shape, np.uint16), cmb, bloom=0.0)
        assert signal.min() == pytest.approx(0.1)
        fall_off.append(int(np.sum((signal > 0.2) & (signal < 0.9))))
    assert fall_off[1] > 1.5 * fall_off[0]


@pytest.mark.parametrize("family", [headphantom.ATLAS, headphantom.WIDE, headphantom.BROAD, headphantom.OOD])
def test_ghost_mechanism_belongs_to_the_family(family: headphantom.Family) -> None:
    """Only the ood family's scans get periodic-motion ghosts (at 1/3 or 1/4 of the field of view); every
    training family gets the single half-field ghost."""
    signal = np.zeros((12, 12, 12), np.float32)
    signal[0, 0, 0] = 1.0
    for seed in range(6):
        out = headphantom.add_ghosts(np.random.default_rng(seed), family, signal)
        offsets = {int(i) for i in np.argwhere(out > 0)[:, 1:].ravel()} - {0}
        assert offsets in ([{4, 8}, {3, 6}] if family.name == "ood" else [{6}])


def test_broad_family_randomises_beyond_both_modalities() -> None:
    """The training-only broad family: tissue intensities from the union of the SWI and T2*-GRE ranges
    (white matter the reference), noise whose level varies across the scan, CMBs near CSF."""
    code = anatomy.CODE
    cortex = [headphantom.tissue_intensities(np.random.default_rng(s), headphantom.BROAD, "t2s", 25.0)
              for s in range(40)]
    assert all(lut[code["white_matter"]] == 1.0 for lut in cortex)
    brain = list(anatomy.BRAIN_TISSUES)
    assert all(lut[code["csf"]] >= 1.05 * lut[brain].max() for lut in cortex)  # sulci stay bright
    cortex = np.array([lut[code["cortex"]] for lut in cortex])
    assert cortex.min() < 0.95 and cortex.max() > 1.03  # below the T2*-GRE range, above the SWI range
    grid = Geometry.from_matrix((40, 40, 40), np.diag([2.0, 2.0, 2.0, 1.0]))
    zero = np.zeros(grid.array_shape, np.float32)
    for family, varies in ((headphantom.ATLAS, False), (headphantom.BROAD, True)):
        noise = headphantom.add_noise(np.random.default_rng(5), family, zero, 20.0, grid)
        means = noise.reshape(5, 8, 5, 8, 5, 8).mean(axis=(1, 3, 5))  # noise level in blocks of 8 voxels
        assert (means.max() / means.min() > 1.2) == varies, (family.name, means.max() / means.min())
    sites = anatomy.cmb_sites(near_csf=True)
    atlas = anatomy.head_atlas()
    for area in (1, 2, 3):
        depth = atlas.sulcus_mm[tuple(atlas.index(sites[area]).T)]
        assert len(depth) > 100 and depth.min() >= 1.0 and depth.max() <= 3.5
