"""Training code (optional ``train`` extra): ONNX export parity, patch sampling, loss, resume. Trains nothing real."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from SHIVACMBLib.devtools import selection, train  # noqa: E402
from SHIVACMBLib.devtools.unet import ResidualUNet3D, widen  # noqa: E402


def _tiny_cache(folder, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    volume = rng.random((40, 44, 36)).astype(np.float16)
    cmb = np.zeros(volume.shape, np.uint8)
    cmb[20:23, 20:23, 18:21] = 1
    mimic = np.zeros_like(cmb)
    mimic[5:30, 10, 10] = 1  # a vein: 25 voxels
    mimic[30, 30, 30] = 2  # a calcification: 1 voxel
    brain = np.ones_like(cmb)
    np.savez(folder / "scan-a.npz", volume=volume, cmb=cmb, mimic=mimic, brain=brain)


def _trained_looking(model: ResidualUNet3D) -> ResidualUNet3D:
    with torch.no_grad():  # non-trivial batch-norm statistics and affine parameters, as after training
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_onnx_export_matches_torch_on_any_size(tmp_path) -> None:
    torch.manual_seed(0)
    model = ResidualUNet3D()
    with torch.no_grad():  # non-trivial batch-norm statistics, as after training
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "fold0.onnx"
    train.export_onnx(model, path)
    for shape in [(37, 45, 29), (16, 16, 16), (33, 20, 41)]:  # odd sizes: pooling rounds up, upsampling matches
        assert train.parity(model, path, shape) < 1e-4

    import onnx

    graph = onnx.load(str(path)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == [1, 1] and all(isinstance(d, str) for d in dims[2:])  # dynamic spatial axes
    assert onnx.load(str(path)).opset_import[0].version >= 17
    assert onnx.load(str(path)).ir_version == train.IR_VERSION  # what every onnxruntime build loads (OpenVINO's: <= 13)


def test_prepare_keeps_mimic_classes_when_some_mimics_leave_the_model_box(tmp_path) -> None:
    from SHIVACMBLib.devtools import synthetic

    phantom = synthetic.make_phantom(5, "swi", (2.0, 2.0, 2.0), n_cmb=2)
    paths = synthetic.write_phantom(phantom, tmp_path / "phantoms", "scan")
    last = max(o.label for o in phantom.objects if o.kind == "mimic")
    with open(paths["objects"], "a", encoding="utf-8") as table:  # a calcification the box does not hold
        table.write(f"{last + 7}\tmimic\tcalcification\tpineal\t0\t0\t300\t2.0\tmidline\n")
    train.prepare(tmp_path / "phantoms", tmp_path / "cache")
    data = np.load(tmp_path / "cache" / "scan.npz")
    assert data["volume"].shape == train.BOX and data["cmb"].any()
    present = {train.MIMIC_CLASSES[c - 1] for c in np.unique(data["mimic"]) if c}
    assert "vein" in present and present <= set(train.MIMIC_CLASSES)


def test_patch_sampler_centres_on_cmbs_and_mimics(tmp_path) -> None:
    _tiny_cache(tmp_path)
    sampler = train.PatchSampler(sorted(tmp_path.glob("*.npz")), np.random.default_rng(0), patch=16,
                                 mix=(1.0, 0.0, 0.0))
    images, targets, weights = sampler.batch(8)
    assert images.shape == (8, 1, 16, 16, 16) and images.dtype == torch.float32 and weights is None
    assert all(t.sum() > 0 for t in targets)  # every CMB-centred patch holds CMB voxels
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    # the sampled centres own their memory: a view would keep every voxel of every brain alive
    assert all(points.base is None for entries in sampler.sites.values() for _, points in entries)


def test_strong_augmentation_degrades_patches_but_keeps_targets(tmp_path) -> None:
    _tiny_cache(tmp_path)
    files = sorted(tmp_path.glob("*.npz"))
    changes = []
    for seed in range(8):  # a batch's first patch: same centre and mirror, so the same target
        plain = train.PatchSampler(files, np.random.default_rng(seed), patch=16, mix=(1.0, 0.0, 0.0))
        strong = train.PatchSampler(files, np.random.default_rng(seed), patch=16, mix=(1.0, 0.0, 0.0), strong=True)
        (a, ta, _), (b, tb, _) = plain.batch(1), strong.batch(1)
        assert torch.equal(ta, tb)
        assert 0 <= float(b.min()) and float(b.max()) <= 1 and b.dtype == torch.float32
        changes.append(float((a - b).abs().mean()))
    assert max(changes) > 0.01
    rng = np.random.default_rng(0)
    edge = np.zeros((16, 16, 16), np.float32)
    edge[:, :, 8:] = 1.0
    sharpness = [np.abs(np.diff(train.degrade(rng, edge), axis=2)).max() for _ in range(40)]
    assert min(sharpness) < 0.6 < max(sharpness)  # some patches are blurred or thick-sliced, others not


def test_csf_pockets_brighten_near_the_centre_and_never_touch_objects() -> None:
    rng = np.random.default_rng(3)
    image = np.full((24, 24, 24), 0.5, np.float32)
    objects = np.zeros(image.shape, bool)
    objects[10:14, 10:14, 10:14] = True  # a CMB at the centre
    image[objects] = 0.1
    changed = []
    for _ in range(20):
        out = train.add_csf_pockets(rng, image, objects)
        assert out.dtype == np.float32 and float(out.max()) <= 1.0 and (out >= image).all()
        assert np.array_equal(out[8:16, 8:16, 8:16][objects[8:16, 8:16, 8:16]], image[objects])
        near = np.zeros(image.shape, bool)
        near[9:15, 9:15, 9:15] = True  # the CMB and the two voxels around it stay as they were
        assert np.array_equal(out[near], image[near])
        changed.append(np.argwhere(out > image + 0.05))
    assert all(len(c) for c in changed)
    distance = np.linalg.norm(np.concatenate(changed) - 11.5, axis=1)
    assert distance.max() < 11.5 + 4 + 2  # within the pockets' reach of the centre


def test_small_cmbs_weigh_more_in_the_loss(tmp_path) -> None:
    cmb = np.zeros((20, 20, 20), bool)
    cmb[2:4, 2:4, 2] = True  # 4 voxels
    cmb[10:15, 10:15, 10:15] = True  # 125 voxels
    weights = train.small_cmb_weights(cmb, 5.0)
    assert weights[2, 2, 2] == 5.0 and weights[12, 12, 12] == 1.0 and weights[0, 19, 19] == 1.0
    assert train.small_cmb_weights(cmb, 10.0)[2, 2, 2] == train.SMALL_CMB_VOXELS / 4
    _tiny_cache(tmp_path)  # its CMB: 27 voxels, the vein 25, the calcification 1
    files = sorted(tmp_path.glob("*.npz"))
    sampler = train.PatchSampler(files, np.random.default_rng(0), patch=16, mix=(1.0, 0.0, 0.0),
                                 mimic_loss_weight=3.0, small_cmb_weight=4.0)
    images, targets, weights = sampler.batch(2)
    assert weights is not None
    assert np.allclose(weights[targets > 0].numpy(), train.SMALL_CMB_VOXELS / 27)
    assert set(np.unique(weights[targets == 0].numpy()).tolist()) <= {1.0, 3.0}
    with pytest.raises(ValueError, match="small-CMB"):
        train.PatchSampler(files, np.random.default_rng(0), patch=16, small_cmb_weight=0.5)


def test_faded_cmbs_keep_part_of_their_darkness_and_nothing_else_changes() -> None:
    rng = np.random.default_rng(5)
    image = np.full((20, 20, 20), 0.6, np.float32)
    cmb = np.zeros(image.shape, bool)
    cmb[9:12, 9:12, 9:12] = True
    image[cmb] = 0.1
    mimics = np.zeros(image.shape, bool)
    mimics[2, 2:18, 2] = True  # a vein far from the CMB
    image[mimics] = 0.05
    kept = []
    for _ in range(30):
        out = train.fade_cmbs(rng, image, cmb, mimics)
        assert out.dtype == np.float32 and (out >= image).all() and out.max() <= image.max()
        rim = np.zeros(image.shape, bool)
        rim[8:13, 8:13, 8:13] = True
        assert np.array_equal(out[~rim], image[~rim])  # the vein and the tissue stay as they were
        darkness = np.float32(0.6) - out[cmb]
        assert np.allclose(darkness, darkness[0])
        kept.append(float(darkness[0]) / 0.5)
    assert 0.4 - 1e-6 <= min(kept) < 0.55 and 0.85 < max(kept) <= 1.0 + 1e-6


def test_context_augmentation_keeps_targets(tmp_path) -> None:
    _tiny_cache(tmp_path)
    files = sorted(tmp_path.glob("*.npz"))
    for seed in range(4):  # the mimic arrays are loaded for the pockets, without making loss weights
        for faint in (False, True):
            context = train.PatchSampler(files, np.random.default_rng(seed), patch=16, mix=(1.0, 0.0, 0.0),
                                         strong=True, context=True, faint=faint)
            images, targets, weights = context.batch(4)
            assert weights is None and all(t.sum() > 0 for t in targets)
            assert 0 <= float(images.min()) and float(images.max()) <= 1


def test_mimic_classes_are_sampled_equally_often(tmp_path) -> None:
    _tiny_cache(tmp_path)
    files = sorted(tmp_path.glob("*.npz"))
    balanced = train.PatchSampler(files, np.random.default_rng(0), patch=16, mix=(0.0, 1.0, 0.0))
    assert balanced.kinds == ["brain", "cmb", "mimic:calcification", "mimic:vein"]
    assert balanced.weights.tolist() == [0.0, 0.0, 0.5, 0.5]  # one calcification voxel weighs as 25 vein voxels
    by_voxel = train.PatchSampler(files, np.random.default_rng(0), patch=16, mix=(0.0, 1.0, 0.0), by_class=False)
    assert by_voxel.kinds == ["brain", "cmb", "mimic:any"] and len(by_voxel.sites["mimic:any"][0][1]) == 26
    tilted = train.PatchSampler(files, np.random.default_rng(0), patch=16, mix=(0.2, 0.8, 0.0),
                                class_weights={"calcification": 3.0})
    assert np.allclose(tilted.weights, [0.0, 0.2, 0.6, 0.2])  # calcifications three times as often as veins
    with pytest.raises(ValueError, match="mimic class weights"):
        train.PatchSampler(files, np.random.default_rng(0), patch=16, class_weights={"calcifications": 2.0})
    with pytest.raises(ValueError, match="voxel sampling"):
        train.PatchSampler(files, np.random.default_rng(0), patch=16, by_class=False, class_weights={"vein": 2.0})


def test_cmb_patches_by_lesion_draw_small_cmbs_as_often_as_large_ones(tmp_path) -> None:
    volume = np.random.default_rng(0).random((64, 64, 64)).astype(np.float16)
    cmb = np.zeros(volume.shape, np.uint8)
    cmb[10:17, 10:17, 10:17] = 1  # an 8 mm CMB: 343 voxels
    cmb[50, 50, 50] = 1  # a 2 mm one: 1 voxel
    zeros = np.zeros_like(cmb)
    np.savez(tmp_path / "scan-a.npz", volume=volume, cmb=cmb, mimic=zeros, brain=np.ones_like(cmb))
    np.savez(tmp_path / "scan-b.npz", volume=volume, cmb=zeros, mimic=zeros, brain=np.ones_like(cmb))
    files = sorted(tmp_path.glob("*.npz"))

    def small_share(sampler: train.PatchSampler) -> float:
        centres = [sampler._centre() for _ in range(2000)]  # jitter: -6 to 5 voxels for a 16-voxel patch
        return float(np.mean([np.abs(c - 50).max() <= 6 for _, c in centres]))

    by_lesion = train.PatchSampler(files, np.random.default_rng(0), patch=16, mix=(1.0, 0.0, 0.0), cmb_by_lesion=True)
    assert sorted(len(points) for _, points in by_lesion.sites["cmb"]) == [1, 343]  # one entry per CMB
    assert 0.45 < small_share(by_lesion) < 0.55
    by_voxel = train.PatchSampler(files, np.random.default_rng(0), patch=16, mix=(1.0, 0.0, 0.0))
    assert small_share(by_voxel) < 0.01  # 1 voxel in 344
    assert train.lesion_voxels(zeros > 0) == []


def test_mimic_voxels_weigh_more_in_the_loss(tmp_path) -> None:
    _tiny_cache(tmp_path)
    files = sorted(tmp_path.glob("*.npz"))
    sampler = train.PatchSampler(files, np.random.default_rng(0), patch=16, mix=(0.0, 1.0, 0.0), mimic_loss_weight=5.0)
    images, targets, weights = sampler.batch(6)
    assert weights.shape == targets.shape and set(torch.unique(weights).tolist()) == {1.0, 5.0}
    assert all(w.max() == 5.0 for w in weights)  # every mimic-centred patch holds mimic voxels, weighted
    # the weights follow their voxels through the left-right mirror: in a scan whose image is bright
    # exactly on the mimics, the weighted voxels are the bright ones
    with np.load(files[0]) as data:
        arrays = dict(data)
    arrays["volume"] = (arrays["mimic"] > 0).astype(np.float16)
    np.savez(files[0], **arrays)
    images, _, weights = train.PatchSampler(files, np.random.default_rng(1), patch=16, mix=(0.0, 1.0, 0.0),
                                            mimic_loss_weight=5.0).batch(8)
    assert torch.equal(images > 0, weights == 5.0)
    target = torch.zeros(1, 1, 8, 8, 8)
    weight = torch.ones_like(target)
    weight[0, 0, 0, 0, :2] = 5.0  # two mimic voxels
    calls_the_mimic_a_cmb = torch.full_like(target, -10.0)
    calls_the_mimic_a_cmb[0, 0, 0, 0, :2] = 10.0
    plain = float(train.loss_fn(calls_the_mimic_a_cmb, target))
    weighted = float(train.loss_fn(calls_the_mimic_a_cmb, target, weight))
    assert weighted - plain == pytest.approx(4 * 2 * 10.0 / 512, rel=1e-3)  # 4 more times the BCE of 2 wrong voxels
    for bad in ({"mimic_loss_weight": 0.0}, {"class_weights": {"vein": 0.0}}):
        with pytest.raises(ValueError, match="above 0"):
            train.PatchSampler(files, np.random.default_rng(0), patch=16, **bad)


@pytest.mark.parametrize("args, message", [(["--mimic-weight", "vein=0"], "above 0"),
                                           (["--mimic-weight", "veins=2"], "mimic class weights"),
                                           (["--mix", "0.5", "0", "0", "0.5"], "--hard"),
                                           (["--widths", "8"], "--widths 8: two or more levels"),
                                           (["--widths", "8", "16", "32", "64", "128"],
                                            "--patch 16: a multiple of 16")])
def test_fit_refusals_are_one_line_usage_errors(tmp_path, capsys, args, message) -> None:
    _tiny_cache(tmp_path)
    with pytest.raises(SystemExit) as stop:
        train.main(["fit", "--cache", str(tmp_path), "--run", str(tmp_path / "run"), "--patch", "16", *args])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_hard_negatives_get_the_fourth_share(tmp_path) -> None:
    _tiny_cache(tmp_path)
    files = sorted(tmp_path.glob("*.npz"))
    with pytest.raises(ValueError, match="--hard"):
        train.PatchSampler(files, np.random.default_rng(0), patch=16, mix=(0.5, 0.0, 0.0, 0.5))
    hard = tmp_path / "hard"
    hard.mkdir()
    np.save(hard / "scan-a.npy", np.array([[8, 9, 10]], np.int16))
    sampler = train.PatchSampler(files, np.random.default_rng(0), patch=16, mix=(0.0, 0.0, 0.0, 1.0), hard=hard)
    assert sampler.kinds[sampler.weights.argmax()] == "hard" and sampler.weights.max() == 1.0
    for _ in range(20):  # every patch holds the mined voxel, however it was jittered
        scan, centre = sampler._centre()
        offset = np.array([8, 9, 10]) - centre  # the patch spans centre - 8 .. centre + 7
        assert scan == 0 and np.all((-8 <= offset) & (offset <= 7))


def test_mine_keeps_the_voxels_of_false_positive_components_only(tmp_path, model_dir) -> None:
    from helpers import SMALL_BOX

    x, y, z = np.indices(SMALL_BOX)
    volume = np.full(SMALL_BOX, 0.8, np.float32)
    cmb = ((x - 30) ** 2 + (y - 40) ** 2 + (z - 40) ** 2 <= 9).astype(np.uint8)
    false = (x - 55) ** 2 + (y - 50) ** 2 + (z - 40) ** 2 <= 9
    volume[(cmb > 0) | false] = 0.1
    cache = tmp_path / "cache"
    cache.mkdir()
    zeros = np.zeros(SMALL_BOX, np.uint8)
    np.savez(cache / "scan-a.npz", volume=volume.astype(np.float16), cmb=cmb, mimic=zeros, brain=zeros + 1)
    counts = train.mine(cache, model_dir, tmp_path / "hard")
    assert counts == {"scan-a": 1}
    mined = np.load(tmp_path / "hard" / "scan-a.npy")
    assert len(mined) and false[tuple(mined.T)].all()  # only voxels of the dark blob that is no CMB


def test_fine_tuning_from_an_onnx_fold_starts_where_the_fold_is(tmp_path) -> None:
    torch.manual_seed(1)
    model = _trained_looking(ResidualUNet3D())
    fold = tmp_path / "fold0.onnx"
    train.export_onnx(model, fold)
    restored = train.model_from_onnx(fold)
    assert train.parity(restored, fold, (21, 30, 17)) < 1e-5

    _tiny_cache(tmp_path)
    run = tmp_path / "run"
    train.fit(tmp_path, run, steps=2, seed=4, init=fold, patch=16)
    tuned = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    start = restored.state_dict()
    running = [name for name in start if name.endswith(("running_mean", "running_var"))]
    assert running and all(torch.equal(tuned[name], start[name]) for name in running)  # norms stay frozen
    assert not torch.equal(tuned["encoders.0.conv1.weight"], start["encoders.0.conv1.weight"])  # weights train
    phases = train.training_phases(run)
    assert phases[0]["onnx"] == "fold0.onnx" and len(phases[0]["sha256"]) == 64 and phases[1]["frozen_norms"]


def test_widening_keeps_the_output_and_the_new_channels_learn() -> None:
    torch.manual_seed(2)
    model = _trained_looking(ResidualUNet3D())
    wide = widen(model, (12, 16, 48, 96)).eval()
    image = torch.randn(1, 1, 21, 30, 17)
    assert wide.widths == (12, 16, 48, 96) and sum(p.numel() for p in wide.parameters()) > 2 * 372_265 - 1
    with torch.no_grad():
        assert float((wide.logits(image) - model.logits(image)).abs().max()) < 1e-5  # the same function
    wide.logits(image).sum().backward()
    new_into_old = wide.decoders[2].conv1.weight.grad[:32, 32:48]  # the new channels of level 2 into old ones
    assert float(new_into_old.abs().max()) > 0  # silent at first, yet they get a gradient
    assert float(wide.head.weight.grad[0, 8:].abs().max()) > 0  # the new channels of level 0 reach the output
    for widths in [(8, 16, 32), (8, 8, 32, 64)]:  # other levels, a narrower level
        with pytest.raises(ValueError, match="none narrower"):
            widen(model, widths)


def test_fit_widens_an_onnx_fold_and_exports_the_wider_network(tmp_path) -> None:
    torch.manual_seed(3)
    fold = tmp_path / "fold0.onnx"
    train.export_onnx(_trained_looking(ResidualUNet3D()), fold)
    widths = (8, 16, 48, 96)
    start = train.start_model(tmp_path / "no-checkpoint.pt", fold, widths)
    assert start.widths == widths and train.parity(start, fold, (21, 30, 17)) < 1e-5  # starts where the fold is

    _tiny_cache(tmp_path)
    run = tmp_path / "run"
    train.main(["fit", "--cache", str(tmp_path), "--run", str(run), "--init", str(fold), "--widths", "8", "16", "48",
                "96", "--steps", "3", "--until", "2", "--patch", "16", "--seed", "5"])
    train.fit(tmp_path, run, steps=3, seed=5, init=fold, patch=16)  # resumes the wider network without --widths
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 3
    assert train.training_phases(run)[-1]["widths"] == [8, 16, 48, 96]
    folder = train.write_model_folder([run, fold], tmp_path / "model")
    assert train.model_from_onnx(folder / "fold0.onnx").widths == widths
    assert train.parity(train.load_checkpoint(run / "checkpoint.pt"), folder / "fold0.onnx", (19, 24, 33)) < 1e-4
    architecture = json.loads((folder / "model.json").read_text(encoding="utf-8"))["training"]["architecture"]
    assert architecture == ("ResidualUNet3D(widths=8-16-48-96), batch norm, sigmoid output; "
                            "ResidualUNet3D(widths=8-16-32-64), batch norm, sigmoid output")


def test_loss_is_small_for_a_right_answer_and_large_for_a_wrong_one() -> None:
    target = torch.zeros(1, 1, 8, 8, 8)
    target[0, 0, 3:5, 3:5, 3:5] = 1
    right = train.loss_fn(torch.where(target > 0, 10.0, -10.0), target)
    wrong = train.loss_fn(torch.where(target > 0, -10.0, 10.0), target)
    assert float(right) < 0.01 and float(wrong) > 1.5


def test_fit_checkpoints_and_resumes(tmp_path) -> None:
    _tiny_cache(tmp_path)
    run = tmp_path / "run"
    train.fit(tmp_path, run, steps=4, seed=3, checkpoint_every=1, until=2, patch=16)  # as if killed after step 2
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 2
    train.fit(tmp_path, run, steps=4, seed=3, checkpoint_every=1, patch=16)  # resumes at step 2
    resumed = torch.load(run / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == 4
    assert json.loads((run / "config.json").read_text(encoding="utf-8"))["patch"] == 16
    straight = tmp_path / "straight"
    train.fit(tmp_path, straight, steps=4, seed=3, checkpoint_every=1, patch=16)
    reference = torch.load(straight / "checkpoint.pt", weights_only=False)["model"]
    for name, value in reference.items():  # an interrupted run ends where an uninterrupted one does
        assert torch.allclose(value.float(), resumed["model"][name].float(), atol=1e-6), name


@pytest.mark.parametrize("patch", ["20", "8", "136"])
def test_fit_refuses_a_patch_the_network_cannot_pool(tmp_path, capsys, patch) -> None:
    with pytest.raises(SystemExit) as stop:
        train.main(["fit", "--cache", str(tmp_path), "--run", str(tmp_path / "run"), "--patch", patch])
    assert stop.value.code == 2 and f"--patch {patch}: a multiple of 8" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extent", ["0.995", "0", "-0.1"])
def test_export_refuses_an_extent_threshold_outside_0_to_the_threshold(tmp_path, capsys, extent) -> None:
    with pytest.raises(SystemExit) as stop:
        train.main(["export", "--run", str(tmp_path / "run"), "--model-dir", str(tmp_path / "model"),
                    "--threshold", "0.99", "--extent-threshold", extent])
    assert stop.value.code == 2 and f"--extent-threshold {float(extent)}: above 0" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_export_writes_one_verified_fold_per_run(tmp_path) -> None:
    _tiny_cache(tmp_path)
    runs = [tmp_path / "run-a", tmp_path / "run-b"]
    train.fit(tmp_path, runs[0], steps=1, seed=1, patch=16)
    train.fit(tmp_path, runs[1], steps=1, seed=2, init=runs[0] / "checkpoint.pt", patch=16)
    folder = train.write_model_folder(runs, tmp_path / "demo-model", {"precision": 0.5}, threshold=0.8, version="2.1",
                                      extent_threshold=0.5)

    from SHIVACMBLib.modelstore.models import load_model

    model = load_model(str(folder))  # checks every fold's sha256
    assert [f.file for f in model.folds] == ["fold0.onnx", "fold1.onnx"] and model.threshold == 0.8
    assert model.extent_threshold == 0.5
    assert model.version == "2.1"
    training = json.loads((folder / "model.json").read_text(encoding="utf-8"))["training"]["folds"]
    assert [len(fold["phases"]) for fold in training] == [1, 2]  # run-b started from run-a's weights
    assert [fold["phases"][-1]["seed"] for fold in training] == [1, 2]
    assert all(fold["parity_max_abs_difference"] < 1e-4 for fold in training)

    # an ensemble that keeps an exported fold: copied byte for byte, with the provenance it records
    ensemble = train.write_model_folder([folder / "fold1.onnx", runs[0]], tmp_path / "ensemble")
    assert (ensemble / "fold0.onnx").read_bytes() == (folder / "fold1.onnx").read_bytes()
    kept = json.loads((ensemble / "model.json").read_text(encoding="utf-8"))["training"]["folds"]
    assert kept[0]["onnx"] == "fold1.onnx" and kept[0]["phases"] == training[1]["phases"]
    assert kept[1]["phases"] == training[0]["phases"]
    assert len(load_model(str(ensemble)).folds) == 2 and load_model(str(ensemble)).extent_threshold is None
    with pytest.raises(ValueError, match="another folder"):
        train.write_model_folder([folder / "fold0.onnx"], folder)


def test_calibrate_counts_per_threshold(tmp_path, model_dir) -> None:
    """Six dark spheres: four are CMBs in the truth, one a calcification and one a vein."""
    import phantoms
    from helpers import SMALL_FOV
    from SHIVACMBLib.findings import read_tsv

    scene = phantoms.default_scene()
    grid = phantoms.grid_around((0.0, 0.0, 0.0), SMALL_FOV, (1, 1, 1))
    root = tmp_path / "validation"
    phantoms.write(phantoms.render(scene, grid, seed=2), root / "val-1.nii.gz")
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in grid.size], indexing="ij"), -1).reshape(-1, 3)
    nearest = np.linalg.norm(grid.index_to_ras(ijk)[:, None] - scene.centres[None], axis=2)
    inside = nearest <= np.array([s.radius for s in scene.spheres])
    for name, labels in (("cmb", [1, 2, 3, 4, 0, 0]), ("mimics", [0, 0, 0, 0, 1, 2])):
        volume = np.zeros(len(ijk), np.uint8)
        for sphere, label in enumerate(labels):
            volume[inside[:, sphere] & (label > 0)] = label
        phantoms.write(grid.with_image(volume.reshape(grid.size).transpose(2, 1, 0)),
                       root / "truth" / f"val-1_{name}.nii.gz")
    (root / "truth" / "val-1_objects.tsv").write_text(
        "label\tkind\tclass\n1\tcmb\tcmb\n2\tcmb\tcmb\n3\tcmb\tcmb\n4\tcmb\tcmb\n"
        "1\tmimic\tcalcification\n2\tmimic\tvein\n", encoding="utf-8")

    low = selection.calibrate(model_dir, root, tmp_path / "work", [0.5])[0]
    assert (low["tp"], low["fn"], low["fp"]) == (4, 0, 2)
    assert low["mimics"]["calcification"]["detected"] == 1 and low["mimics"]["vein"]["detected"] == 1
    # a threshold just above the weakest finding drops exactly that finding: which sphere it is
    # decides the expected counts
    findings = read_tsv(tmp_path / "work" / "val-1" / "findings.tsv")
    weakest, runner_up = sorted(findings, key=lambda f: f.max_prob)[:2]
    assert runner_up.max_prob - weakest.max_prob > 2e-4  # the TSV rounds probabilities to 6 digits
    sphere = int(np.argmin(np.linalg.norm(scene.centres - np.asarray(weakest.ras), axis=1)))
    rows = selection.calibrate(model_dir, root, tmp_path / "work2", [0.5, weakest.max_prob + 1e-4])
    high = rows[1]
    assert high["threshold"] > 0.5 and high["tp"] + high["fp"] == 5
    assert (high["tp"], high["fp"]) == ((3, 2) if sphere < 4 else (4, 1))
    table = selection.calibration_table(rows).splitlines()
    assert len(table) == 3 and table[0].split()[:4] == ["threshold", "TP", "FN", "FP"]


def _onnx_fold(path, op: str, constant: float) -> None:
    """A one-node fold: ``constant - image`` (Sub) or ``image * constant`` (Mul)."""
    import onnx
    from onnx import TensorProto, helper

    dims = [1, 1, "x", "y", "z"]
    inputs = ["c", "image"] if op == "Sub" else ["image", "c"]
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["probability"])], "fold",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, dims)],
        [helper.make_tensor("c", TensorProto.FLOAT, [], [constant])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = train.IR_VERSION  # onnx writes its newest, which onnxruntime-openvino 1.24 does not load
    onnx.save(model, str(path))


def _candidate_scans(folder, peaks_per_scan) -> None:
    """``train candidates`` tables of scans with two truth CMBs: one fold candidate per (peak, truth) given."""
    folder.mkdir()
    for number, candidates in enumerate(peaks_per_scan):
        peak = np.array([p for p, _ in candidates] + [0.0, 0.0], np.float32)  # and the two planted CMBs
        truth = np.array([t for _, t in candidates] + [1, 2])
        np.savez(folder / f"val-{number}.npz", peak=peak, truth=truth, label=(truth > 0).astype(int),
                 kind=np.array([0] * len(candidates) + [1, 1]), cls=np.zeros(len(peak), int), n_truth=np.asarray(2))


def test_compare_tells_a_real_difference_from_the_spread_of_the_scans(tmp_path, capsys) -> None:
    """Fold B finds what fold A finds plus a false positive at 0.995 on every scan: worse at 0.99, equal at 0.999.
    Folds C and D score the same in all but on different scans (each finds both CMBs with a false positive where
    the other finds one): the interval spans zero."""
    found = [(0.999, 1), (0.999, 2)]
    _candidate_scans(tmp_path / "a", [found] * 12)
    _candidate_scans(tmp_path / "b", [found + [(0.995, 0)]] * 12)
    worse = selection.compare(tmp_path / "a", tmp_path / "b", (0.99, 0.99), resamples=500)
    assert [(f["tp"], f["fn"], f["fp"]) for f in worse["folds"]] == [(24, 0, 0), (24, 0, 12)]
    assert worse["difference"] == pytest.approx(48 / 60 - 1) and worse["interval"][1] < 0 and worse["second_ahead"] == 0
    same = selection.compare(tmp_path / "a", tmp_path / "b", (0.99, 0.999), resamples=500)
    assert same["difference"] == 0 and same["interval"] == [0, 0]
    _candidate_scans(tmp_path / "c", [found + [(0.995, 0)], [(0.999, 1)]] * 6)
    _candidate_scans(tmp_path / "d", [[(0.999, 1)], found + [(0.995, 0)]] * 6)
    mixed = selection.compare(tmp_path / "c", tmp_path / "d", (0.99, 0.99), resamples=500)
    assert mixed["difference"] == 0 and mixed["interval"][0] < 0 < mixed["interval"][1]
    assert 0.2 < mixed["second_ahead"] < 0.8
    filtertrain = pytest.importorskip("SHIVACMBLib.devtools.filtertrain")
    row = filtertrain.screen_filter(tmp_path / "d", None, [0.99], [0.0])[0]  # the same counting as screen-filter's
    assert (row["tp"], row["fn"], row["fp"]) == tuple(mixed["folds"][1][k] for k in ("tp", "fn", "fp"))
    assert train.main(["screen-filter", "--candidates", str(tmp_path / "b"), "--fold-thresholds", "0.99", "0.995",
                       "0.999", "--filter-thresholds", "0"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]  # thresholds as given, not rounded to two places
    assert [line.split()[:5] for line in rows] == [["0.99", "0", "24", "0", "12"], ["0.995", "0", "24", "0", "12"],
                                                   ["0.999", "0", "24", "0", "0"]]

    assert train.main(["compare", "--candidates", str(tmp_path / "a"), str(tmp_path / "b"), "--thresholds", "0.99",
                       "0.99", "--resamples", "200", "--out", str(tmp_path / "c.json")]) == 0
    assert "second minus first: F1 -0.2000" in capsys.readouterr().out
    assert json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))["folds"][1]["fp"] == 12
    with pytest.raises(SystemExit, match="--resamples 0: at least one resample"):
        train.main(["compare", "--candidates", str(tmp_path / "a"), str(tmp_path / "b"), "--thresholds", "0.9", "0.9",
                    "--resamples", "0"])
    (tmp_path / "a" / "val-0.npz").unlink()
    with pytest.raises(SystemExit, match="same scans .11 and 12 files, 1 in one only"):
        train.main(["compare", "--candidates", str(tmp_path / "a"), str(tmp_path / "b"), "--thresholds", "0.9", "0.9"])


def test_screen_scores_every_ensemble_per_threshold(tmp_path) -> None:
    """A CMB, a calcification and a vein, all dark; fold A sees darkness, fold B sees nothing."""
    volume = np.ones((30, 30, 30), np.float16)
    cmb, mimic, brain = np.zeros((3, 30, 30, 30), np.uint8)
    brain[2:28, 2:28, 2:28] = 1
    volume[5:8, 5:8, 5:8], cmb[5:8, 5:8, 5:8] = 0.0, 1  # found by A at both thresholds
    volume[20:22, 20:22, 20:22], mimic[20:22, 20:22, 20:22] = 0.0, 2  # a calcification: dark as a CMB
    volume[10:25, 15, 15], mimic[10:25, 15, 15] = 0.4, 1  # a vein: probability 0.6 with A
    volume[0:2, 0:2, 0:2] = 0.0  # dark, but outside the brain: never counted
    np.savez(tmp_path / "val-1.npz", volume=volume, cmb=cmb, mimic=mimic, brain=brain)
    _onnx_fold(tmp_path / "a.onnx", "Sub", 1.0)
    _onnx_fold(tmp_path / "b.onnx", "Mul", 0.0)

    screened = selection.screen(tmp_path, [tmp_path / "a.onnx", tmp_path / "b.onnx"], [0.5, 0.7])
    json.loads(json.dumps(screened))  # plain numbers, for --out
    rows = {(tuple(r["folds"]), r["threshold"]): r for r in screened}
    assert set(rows) == {(f, t) for f in [("a.onnx",), ("b.onnx",), ("a.onnx", "b.onnx")] for t in (0.5, 0.7)}
    a_low = rows[(("a.onnx",), 0.5)]  # CMB found, calcification and vein false positives
    assert (a_low["tp"], a_low["fn"], a_low["fp"], a_low["fp_avg"]) == (1, 0, 2, 2.0)
    assert a_low["mimics"]["calcification"] == {"detected": 1, "instances": 1}
    assert a_low["mimics"]["vein"] == {"detected": 1, "instances": 1} and "iron" not in a_low["mimics"]
    a_high = rows[(("a.onnx",), 0.7)]  # the vein (peak 0.6) drops out
    assert (a_high["tp"], a_high["fp"], a_high["mimics"]["vein"]["detected"]) == (1, 1, 0)
    both = rows[(("a.onnx", "b.onnx"), 0.5)]  # mean probability: 0.5 at the CMB and calcification, 0.3 vein
    assert (both["tp"], both["fp"], both["precision"]) == (1, 1, 0.5)
    assert (rows[(("a.onnx", "b.onnx"), 0.7)]["tp"], rows[(("b.onnx",), 0.5)]["fn"]) == (0, 1)


def test_sizes_counts_the_cmbs_found_by_size(tmp_path, capsys) -> None:
    """Three CMBs of 2, 4 and 7 mm in a prepared scan; candidates from a probability that peaks at 0.999 on the first
    two and 0.9 on the third: at 0.99 the 7 mm one is missed, at 0.5 all are found."""
    filtertrain = pytest.importorskip("SHIVACMBLib.devtools.filtertrain")
    shape = (40, 40, 40)
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    cmb = np.zeros(shape, np.uint8)
    probability = np.zeros(shape, np.float32)
    for centre, diameter, peak in [((10, 10, 10), 2.0, 0.999), ((25, 12, 20), 4.0, 0.999), ((20, 28, 24), 7.0, 0.9)]:
        inside = np.linalg.norm(grid - np.array(centre), axis=-1) <= diameter / 2
        cmb[inside] = 1
        probability[inside] = peak
    (tmp_path / "cache").mkdir()
    np.savez(tmp_path / "cache" / "val-1.npz", volume=1 - probability, cmb=cmb, mimic=np.zeros(shape, np.uint8),
             brain=np.ones(shape, np.uint8))
    table = filtertrain.scan_candidates(1 - probability, probability, cmb, np.zeros(shape, np.uint8),
                                        np.ones(shape, np.uint8), 0.1)
    (tmp_path / "cand").mkdir()
    np.savez(tmp_path / "cand" / "val-1.npz", **table)
    assert selection.found_by_size(tmp_path / "cand", tmp_path / "cache", 0.99) == {
        "<= 3 mm": [1, 1], "3-5 mm": [1, 1], "> 5 mm": [0, 1]}
    assert selection.found_by_size(tmp_path / "cand", tmp_path / "cache", 0.5)["> 5 mm"] == [1, 1]
    assert train.main(["sizes", "--candidates", str(tmp_path / "cand"), "--cache", str(tmp_path / "cache"),
                       "--threshold", "0.99"]) == 0
    assert "CMBs <= 3 mm 1/1 = 1.000, CMBs 3-5 mm 1/1 = 1.000, CMBs > 5 mm 0/1 = 0.000" in capsys.readouterr().out
    np.savez(tmp_path / "cache" / "val-1.npz", volume=probability, cmb=np.zeros(shape, np.uint8),
             mimic=np.zeros(shape, np.uint8), brain=np.ones(shape, np.uint8))
    with pytest.raises(SystemExit, match="val-1.npz: 3 CMBs, but .* holds 0"):
        train.main(["sizes", "--candidates", str(tmp_path / "cand"), "--cache", str(tmp_path / "cache"),
                    "--threshold", "0.99"])
    with pytest.raises(SystemExit, match="no prepared scan"):
        train.main(["sizes", "--candidates", str(tmp_path / "cand"), "--cache", str(tmp_path / "none"),
                    "--threshold", "0.99"])
