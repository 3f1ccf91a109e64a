"""The candidate filter: patches, descriptor checks, the pipeline's use of it, and its training data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

import phantoms  # noqa: E402
from helpers import SMALL_FOV  # noqa: E402
from SHIVACMBLib import fpfilter  # noqa: E402
from SHIVACMBLib.errors import InputError  # noqa: E402
from SHIVACMBLib.files import checksum  # noqa: E402
from SHIVACMBLib.pipeline import SegmentOptions, segment  # noqa: E402

P = 16


def write_filter(folder: Path, bias: float = 0.0, centre_weight: float = 0.0, clip: float = 1.3) -> Path:
    """A filter whose probability is sigmoid(bias + centre_weight * (0.5 - the patch's centre voxel)): dark
    centres score high when ``centre_weight`` > 0; a large |bias| keeps or rejects everything."""
    half = P // 2
    nodes = [
        helper.make_node("Slice", ["patch", "starts", "ends", "axes"], ["centre"]),
        helper.make_node("Reshape", ["centre", "shape"], ["value"]),
        helper.make_node("Sub", ["half", "value"], ["darkness"]),
        helper.make_node("Mul", ["darkness", "weight"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["probability"]),
    ]
    init = [helper.make_tensor("starts", TensorProto.INT64, [3], [half] * 3),
            helper.make_tensor("ends", TensorProto.INT64, [3], [half + 1] * 3),
            helper.make_tensor("axes", TensorProto.INT64, [3], [2, 3, 4]),
            helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 1]),
            helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
            helper.make_tensor("weight", TensorProto.FLOAT, [], [centre_weight]),
            helper.make_tensor("bias", TensorProto.FLOAT, [], [bias])]
    graph = helper.make_graph(nodes, "filter", [helper.make_tensor_value_info("patch", TensorProto.FLOAT,
                                                                              ["n", 1, P, P, P])],
                              [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["n", 1])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnx writes its newest IR version, which onnxruntime-openvino 1.24 does not load
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "filter.onnx"))
    descriptor = {"name": "test-filter", "version": "0.1", "target": fpfilter.TARGET, "description": "test",
                  "patch": P, "threshold": 0.5, "file": "filter.onnx", "sha256": checksum([folder / "filter.onnx"]),
                  "normalization": {"method": "percentile", "percentile": 99, "clip": clip}}
    (folder / fpfilter.DESCRIPTOR).write_text(json.dumps(descriptor), encoding="utf-8")
    return folder


def test_patches_are_centred_and_zero_outside() -> None:
    volume = np.arange(10 * 12 * 14, dtype=np.float32).reshape(10, 12, 14)
    cubes = fpfilter.patches(volume, np.array([[5, 6, 7], [0, 0, 0]]), 4)
    assert cubes.shape == (2, 1, 4, 4, 4)
    assert np.array_equal(cubes[0, 0], volume[3:7, 4:8, 5:9])
    assert np.all(cubes[1, 0, :2]) == 0 and np.array_equal(cubes[1, 0, 2:, 2:, 2:], volume[:2, :2, :2])


def test_descriptor_checks(tmp_path) -> None:
    assert fpfilter.load_filter("none") is None
    folder = write_filter(tmp_path / "f")
    loaded = fpfilter.load_filter(str(folder))
    assert loaded.patch == P and loaded.threshold == 0.5 and loaded.summary()["name"] == "test-filter"
    (folder / "filter.onnx").write_bytes((folder / "filter.onnx").read_bytes() + b"x")
    with pytest.raises(InputError, match="sha256"):
        fpfilter.load_filter(str(folder))
    with pytest.raises(InputError, match="no filter.json"):
        fpfilter.load_filter(str(tmp_path))
    wrong = write_filter(tmp_path / "g")
    data = json.loads((wrong / fpfilter.DESCRIPTOR).read_text(encoding="utf-8"))
    (wrong / fpfilter.DESCRIPTOR).write_text(json.dumps({**data, "target": "CMB"}), encoding="utf-8")
    with pytest.raises(InputError, match="target"):
        fpfilter.load_filter(str(wrong))


@pytest.fixture(scope="module")
def oblique_scan(tmp_path_factory, scene) -> Path:
    grid = phantoms.grid_around((1.3, -2.1, 0.7), SMALL_FOV, (0.8, 0.8, 2.0), phantoms.rotation((1, 0, 1), 25))
    return phantoms.write(phantoms.render(scene, grid, seed=2), tmp_path_factory.mktemp("scan") / "oblique.nii.gz")


@pytest.mark.parametrize("clip", [1.3, 1.5])  # 1.5: the model's box does not fit the filter, which makes its own
def test_filter_reads_each_candidate_at_its_place(tmp_path, oblique_scan, model_dir, clip) -> None:
    plain = segment(oblique_scan, tmp_path / "plain", SegmentOptions(model=str(model_dir), fp_filter="none"))
    assert len(plain.findings) >= 5 and plain.run.fp_filter is None
    # dark centres kept: a filter reading its patches at the wrong place would see tissue and reject them
    dark = write_filter(tmp_path / "dark", centre_weight=40.0, clip=clip)
    kept = segment(oblique_scan, tmp_path / "dark-run", SegmentOptions(model=str(model_dir), fp_filter=str(dark)))
    assert [f.ras for f in kept.findings] == [f.ras for f in plain.findings]
    record = kept.run.fp_filter
    assert record["name"] == "test-filter" and record["candidates"] == len(plain.findings) and not record["rejected"]
    assert kept.run.results["dropped"]["fp_filter"] == 0


def test_filter_rejections_are_recorded_and_can_be_switched_off(tmp_path, oblique_scan, model_dir) -> None:
    reject = write_filter(tmp_path / "reject", bias=-10.0)
    result = segment(oblique_scan, tmp_path / "run", SegmentOptions(model=str(model_dir), fp_filter=str(reject)))
    assert result.findings == []
    record = result.run.fp_filter
    assert record["candidates"] >= 5 and len(record["rejected"]) == record["candidates"]
    assert all(len(r["ras"]) == 3 and r["score"] < 0.5 for r in record["rejected"])
    assert result.run.results["dropped"]["fp_filter"] == record["candidates"]


def test_fp_filter_option_of_the_command(tmp_path, iso_scan, model_dir) -> None:
    from SHIVACMBLib import cli

    reject = write_filter(tmp_path / "reject", bias=-10.0)
    assert cli.main(["segment", str(iso_scan), "--model", str(model_dir), "--out", str(tmp_path / "a"),
                     "--fp-filter", str(reject), "--no-report", "--no-location", "--progress", "none"]) == 0
    run = json.loads(next((tmp_path / "a").glob("*/run.json")).read_text(encoding="utf-8"))
    assert run["results"]["cmb_count"] == 0 and run["fp_filter"]["name"] == "test-filter"
    assert cli.main(["segment", str(iso_scan), "--model", str(model_dir), "--out", str(tmp_path / "b"),
                     "--fp-filter", str(tmp_path), "--progress", "none"]) == 2  # not a filter folder


def test_training_candidates_label_folds_and_planted_objects() -> None:
    filtertrain = pytest.importorskip("SHIVACMBLib.devtools.filtertrain")
    shape = (30, 30, 30)
    volume = np.ones(shape, np.float32)
    cmb, mimic, brain = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8), np.ones(shape, np.uint8)
    cmb[5:8, 5:8, 5:8] = 1
    cmb[20:22, 20:22, 20:22] = 1  # a CMB the folds miss
    mimic[10:25, 12, 12] = 1  # a vein
    probability = np.zeros(shape, np.float32)
    probability[5:8, 5:8, 5:8] = 0.9  # found
    probability[14:17, 12, 12] = 0.7  # a false positive on the vein
    probability[25:27, 3:5, 3:5] = 0.5  # a false positive on anatomy
    table = filtertrain.scan_candidates(volume, probability, cmb, mimic, brain)
    folds = table["kind"] == 0
    assert sorted(zip(table["label"][folds], table["cls"][folds])) == [(0, 0), (0, 1), (1, 0)]
    assert int(table["n_truth"]) == 2 and set(table["truth"][folds & (table["label"] == 1)]) == {1}
    assert np.sum(table["kind"] == 1) == 2 and np.sum(table["kind"] == 2) == 1
    peaks = table["peak"][folds]
    assert sorted(np.round(peaks, 2).tolist()) == [0.5, 0.7, 0.9]


def test_filter_trains_resumes_exports_and_loads(tmp_path) -> None:
    filtertrain = pytest.importorskip("SHIVACMBLib.devtools.filtertrain")
    rng = np.random.default_rng(0)
    side = filtertrain.PATCH + 2 * filtertrain.MARGIN
    cubes = rng.random((6, side, side, side)).astype(np.float16)
    (tmp_path / "cand").mkdir()
    np.savez(tmp_path / "cand" / "scan.npz", patches=cubes, label=np.array([1, 1, 0, 0, 0, 0]),
             kind=np.array([0, 1, 0, 0, 2, 2]))
    run = tmp_path / "run"
    filtertrain.fit_filter([tmp_path / "cand"], run, steps=4, seed=1, batch=2, until=2, checkpoint_every=1, width=4)
    filtertrain.fit_filter([tmp_path / "cand"], run, steps=4, seed=1, batch=2, checkpoint_every=1, width=4)
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert config["patches"] == 6 and config["groups"] == [2, 2, 2]  # CMBs, fold false positives, mimics
    assert filtertrain.load_filter_checkpoint(run).features[0].out_channels == 4
    import torch

    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 4
    folder = filtertrain.export_filter(run, tmp_path / "filter", 0.4, "trained", "0.1")
    loaded = fpfilter.load_filter(str(folder))
    assert loaded.patch == filtertrain.PATCH and loaded.threshold == 0.4
    assert json.loads((folder / fpfilter.DESCRIPTOR).read_text(encoding="utf-8"))["training"]["width"] == 4
    scores = fpfilter.FilterSession(loaded).score(rng.random((40, 40, 40)).astype(np.float32), np.array([[20, 20, 20]]))
    assert scores.shape == (1,) and 0 <= scores[0] <= 1
