"""Training code (optional ``train`` extra): ONNX export parity, patch sampling, loss, resume. Trains nothing real."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from SHIVACMBLib import train  # noqa: E402
from SHIVACMBLib.unet import ResidualUNet3D  # noqa: E402


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


def test_patch_sampler_centres_on_cmbs_and_mimics(tmp_path) -> None:
    _tiny_cache(tmp_path)
    sampler = train.PatchSampler(sorted(tmp_path.glob("*.npz")), np.random.default_rng(0), patch=16,
                                 mix=(1.0, 0.0, 0.0))
    images, targets = sampler.batch(8)
    assert images.shape == (8, 1, 16, 16, 16) and images.dtype == torch.float32
    assert all(t.sum() > 0 for t in targets)  # every CMB-centred patch holds CMB voxels
    assert 0 <= float(images.min()) and float(images.max()) <= 1


def test_mimic_classes_are_sampled_equally_often(tmp_path) -> None:
    _tiny_cache(tmp_path)
    files = sorted(tmp_path.glob("*.npz"))
    balanced = train.PatchSampler(files, np.random.default_rng(0), patch=16, mix=(0.0, 1.0, 0.0))
    assert balanced.kinds == ["brain", "cmb", "mimic:calcification", "mimic:vein"]
    assert balanced.weights.tolist() == [0.0, 0.0, 0.5, 0.5]  # one calcification voxel weighs as 25 vein voxels
    by_voxel = train.PatchSampler(files, np.random.default_rng(0), patch=16, mix=(0.0, 1.0, 0.0), by_class=False)
    assert by_voxel.kinds == ["brain", "cmb", "mimic:any"] and len(by_voxel.sites["mimic:any"][0][1]) == 26


def test_loss_is_small_for_a_right_answer_and_large_for_a_wrong_one() -> None:
    target = torch.zeros(1, 1, 8, 8, 8)
    target[0, 0, 3:5, 3:5, 3:5] = 1
    right = train.loss_fn(torch.where(target > 0, 10.0, -10.0), target)
    wrong = train.loss_fn(torch.where(target > 0, -10.0, 10.0), target)
    assert float(right) < 0.01 and float(wrong) > 1.5


def test_fit_checkpoints_and_resumes(tmp_path, monkeypatch) -> None:
    _tiny_cache(tmp_path)
    monkeypatch.setattr(train, "PATCH", 16)
    monkeypatch.setattr(train.PatchSampler.__init__, "__defaults__", (16, None, True))
    run = tmp_path / "run"
    train.fit(tmp_path, run, steps=4, seed=3, checkpoint_every=1, until=2)  # as if killed after step 2
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 2
    train.fit(tmp_path, run, steps=4, seed=3, checkpoint_every=1)  # resumes at step 2
    resumed = torch.load(run / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == 4
    straight = tmp_path / "straight"
    train.fit(tmp_path, straight, steps=4, seed=3, checkpoint_every=1)
    reference = torch.load(straight / "checkpoint.pt", weights_only=False)["model"]
    for name, value in reference.items():  # an interrupted run ends where an uninterrupted one does
        assert torch.allclose(value.float(), resumed["model"][name].float(), atol=1e-6), name
