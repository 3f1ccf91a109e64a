"""Bring-your-own SHIVA-CMB weights: install, convert and parity, with stand-in weights built here.

Needs the `convert` extra (tensorflow, tf_keras, tf2onnx); marked `convert` (CI installs the
extra and runs them). Each model is a tiny SHIVA-kind residual U-Net (shivaweights.py) on a
48x56x40 box, packaged as the official zips are.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest

if not os.environ.get("SHIVACMB_REQUIRE_CONVERT"):  # CI sets it: there these tests must run, never skip
    pytest.importorskip("tensorflow", reason="needs the convert extra: pip install 'shivacmb[convert]'")
    pytest.importorskip("tf2onnx", reason="needs the convert extra: pip install 'shivacmb[convert]'")

import shivaweights  # noqa: E402
from helpers import run_cli  # noqa: E402
from SHIVACMBLib.modelstore import blobmodel, official  # noqa: E402
from SHIVACMBLib import cli  # noqa: E402
from SHIVACMBLib.errors import ModelError  # noqa: E402
from SHIVACMBLib.inference import CPU, FoldEnsemble, model_layout, to_probability  # noqa: E402
from SHIVACMBLib.modelstore.ensemblegraph import boxed_graph  # noqa: E402
from SHIVACMBLib.modelstore.models import read_descriptor  # noqa: E402
from SHIVACMBLib.modelstore.parity import compare, parity_input  # noqa: E402
from SHIVACMBLib.pipeline import SegmentOptions, segment  # noqa: E402
from SHIVACMBLib.devtools.synthetic import make_phantom, write_phantom  # noqa: E402
from SHIVACMBLib.modelstore.tfconvert import load_fold, tf_predict  # noqa: E402

pytestmark = pytest.mark.convert
BOX = (48, 56, 40)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    """The phantom's normalised box, on which the stand-ins are calibrated to detect something."""
    model = read_descriptor(blobmodel.write_model(tmp_path_factory.mktemp("blob"), shape=BOX))
    return model_layout(parity_input(model), "NDHWC")


@pytest.fixture(scope="module")
def folds(tmp_path_factory, calibration):
    """Fold 0: mixed_float16 .h5 (v1 kind); folds 1, 2: SavedModel folders (v2 kind)."""
    folder = tmp_path_factory.mktemp("weights")
    shivaweights.shiva_unet(BOX, mixed=True, seed=1, calibrate=calibration).save(folder / "fold_0.h5")
    for seed in (2, 3):
        shivaweights.save_savedmodel(shivaweights.shiva_unet(BOX, seed=seed, calibrate=calibration),
                                     folder / f"fold_{seed - 1}")
    return [folder / "fold_0.h5", folder / "fold_1", folder / "fold_2"]


@pytest.fixture
def models_home(tmp_path, monkeypatch):
    home = tmp_path / "models"
    monkeypatch.setenv("SHIVACMB_MODELS", str(home))
    return home


@pytest.fixture(scope="module")
def installed(tmp_path_factory, folds):
    """The three folds zipped as downloaded and installed by the command."""
    home = tmp_path_factory.mktemp("home")
    archive = shivaweights.official_zip(home / "SWI-CMB.zip", folds)
    sha = official.checksum([archive])
    old = os.environ.get("SHIVACMB_MODELS")
    os.environ["SHIVACMB_MODELS"] = str(home / "models")
    try:
        assert cli.main(["models", "install", str(archive), "--name", "shiva-test", "--sha256", sha]) == 0
    finally:
        os.environ.pop("SHIVACMB_MODELS") if old is None else os.environ.__setitem__("SHIVACMB_MODELS", old)
    return read_descriptor(home / "models" / "shiva-test")


def test_official_zip_installs_with_parity_recorded(installed, folds):
    data = json.loads((installed.path / "model.json").read_text())
    assert installed.target == "CMB" and installed.layout == "NDHWC" and installed.shape == BOX
    assert installed.activation == "none" and installed.license == "CC-BY-NC-SA-4.0"
    assert [f.file for f in installed.folds] == ["fold0.onnx", "fold1.onnx", "fold2.onnx"]
    records = data["conversion"]["folds"]
    assert [r["kind"] for r in records] == ["h5", "savedmodel", "savedmodel"]
    assert records[0]["mixed_precision"] and not records[1]["mixed_precision"]
    assert (installed.path / data["conversion"]["source_descriptor"]).is_file()
    parity = data["conversion"]["parity"]["folds"]
    assert all(p["passed"] for p in parity)
    assert parity[1]["max_abs_diff"] < 1e-5 and parity[0]["max_abs_diff"] < 5e-3
    assert all(p["above_threshold"] > 0 for p in parity)  # the stand-ins do detect something
    assert not [p for p in installed.path.parent.iterdir() if p.name.startswith(".")]  # no leftovers


def test_converted_folds_compute_what_tensorflow_computes(installed, calibration):
    outputs = FoldEnsemble(installed, "cpu").raw_outputs(calibration)
    for record, raw in zip(json.loads((installed.path / "model.json").read_text())["conversion"]["folds"], outputs):
        fold = load_fold(installed.path / record["source"])
        reference = to_probability(tf_predict(fold, calibration), installed)
        result = compare(reference, to_probability(raw, installed), 0.5, 5e-3 if fold.mixed_precision else 1e-3)
        assert result.passed, result.text()


def test_verify_parity_command(installed, capsys):
    assert cli.main(["models", "verify", str(installed.path), "--parity"]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok  max abs diff") == 3


def test_the_graph_openvino_runs_has_each_keras_upsampling_as_one_resize(installed, calibration):
    graph = boxed_graph(installed)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("Resize") == 3 * 2  # 2 levels of 3 folds (.h5 and SavedModel conversions alike)
    assert not {"Tile", "Unsqueeze", "Transpose", "Shape"} & set(ops)  # nor transposes around them
    merged = ort.InferenceSession(graph.SerializeToString(), providers=[CPU]).run(None, {
        graph.graph.input[0].name: calibration})
    for fold, raw in zip(installed.folds, merged):
        session = ort.InferenceSession(str(fold.path), providers=[CPU])
        assert np.abs(session.run(None, {session.get_inputs()[0].name: calibration})[0] - raw).max() <= 1e-6


class TensorFlowEnsemble(FoldEnsemble):
    """The same ensemble (fold floor, mean), with the TF original computing each fold instead of its ONNX session
    (one session per fold: onnxruntime's own kernels)."""

    def __init__(self, model):
        super().__init__(model, "cpu", providers=[CPU])
        records = json.loads((model.path / "model.json").read_text())["conversion"]["folds"]
        self.tf_folds = [load_fold(model.path / r["source"]) for r in records]
        self.tf_runs = 0

    def _run_session(self, index, feed):
        self.tf_runs += 1
        return [tf_predict(self.tf_folds[index], feed)]


def test_segment_with_the_converted_model_equals_tensorflow(installed, tmp_path):
    scan = write_phantom(make_phantom(424242, "swi", (1.0, 1.0, 1.0), n_cmb=8), tmp_path / "phantom", "p")["image"]
    options = SegmentOptions(report=False, threshold=0.3)  # random folds disagree: their mean rarely reaches 0.5
    onnx_run = segment(scan, tmp_path / "onnx", options, model=installed)
    tensorflow = TensorFlowEnsemble(installed)
    tf_run = segment(scan, tmp_path / "tf", options, model=installed, ensemble=tensorflow)
    assert tensorflow.tf_runs == 3  # every fold was computed by TensorFlow
    assert len(onnx_run.findings) > 0
    assert len(onnx_run.findings) == len(tf_run.findings)
    for a, b in zip(onnx_run.findings, tf_run.findings):
        assert np.allclose([a.r, a.a, a.s], [b.r, b.a, b.s], atol=0.05) and a.voxels == b.voxels


def test_segment_command_runs_the_installed_model(installed, tmp_path):
    scan = write_phantom(make_phantom(7, "swi", (1.0, 1.0, 1.0), n_cmb=3), tmp_path / "phantom", "p")["image"]
    env = {**os.environ, "SHIVACMB_MODELS": str(installed.path.parent)}
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "SHIVACMBLib.cli", "segment", str(scan), "--model", "shiva-test",
                           "--out", str(tmp_path / "out"), "--no-report", "--progress", "none"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    run = json.loads((tmp_path / "out" / "p" / "run.json").read_text())
    assert run["model"]["name"] == "shiva-test" and len(run["model"]["folds"]) == 3


def test_convert_single_savedmodel(folds, tmp_path, capsys):
    assert cli.main(["models", "convert", str(folds[1]), "--out", str(tmp_path / "one")]) == 0
    model = read_descriptor(tmp_path / "one")
    assert len(model.folds) == 1 and "--model" in capsys.readouterr().out


def test_keras2_h5_that_keras3_refuses_loads_with_tf_keras(tmp_path, calibration, monkeypatch):
    import keras
    import tf_keras

    path = tmp_path / "keras2.h5"
    shivaweights.shiva_unet(BOX, seed=4, keras=tf_keras, calibrate=calibration).save(path)

    def keras3_refuses(*args, **kwargs):
        raise ValueError("Unknown layer: 'Functional'")  # as Keras 3 says of many Keras 2 files

    monkeypatch.setattr(keras.models, "load_model", keras3_refuses)
    fold = load_fold(path)
    assert fold.kind == "h5" and fold.loader == "tf_keras"
    result = official.convert(path, tmp_path / "m", say=lambda line: None)
    assert result.parity[0].passed and result.parity[0].above_threshold > 0
    assert json.loads((tmp_path / "m" / "model.json").read_text())["conversion"]["folds"][0]["loader"] == "tf_keras"


# --- refusals: one clear line, exit 3, nothing installed ---------------------------------------


def refused(archive, home, capsys, *extra):
    assert cli.main(["models", "install", str(archive), *extra]) == ModelError.exit_code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("shivacmb: error:")
    assert not home.exists() or not any(home.iterdir())
    return err


def test_corrupt_md5_is_refused(folds, tmp_path, models_home, capsys):
    archive = shivaweights.official_zip(tmp_path / "w.zip", folds[1:2], md5_override={0: "0" * 32})
    assert "md5 mismatch for SWI-CMB/fold_1" in refused(archive, models_home, capsys)


def test_wrong_zip_sha256_is_refused(folds, tmp_path, models_home, capsys):
    archive = shivaweights.official_zip(tmp_path / "w.zip", folds[1:2])
    assert "sha256 mismatch" in refused(archive, models_home, capsys, "--sha256", "1" * 64)


def test_missing_fold_is_refused(folds, tmp_path, models_home, capsys):
    files = [{"name": "SWI-CMB/fold_1", "md5": shivaweights.md5_of(folds[1])}, {"name": "SWI-CMB/fold_9", "md5": "0" * 32}]
    archive = shivaweights.official_zip(tmp_path / "w.zip", folds[1:2], extra={"files": files})
    assert "fold(s) missing: SWI-CMB/fold_9" in refused(archive, models_home, capsys)


def test_non_cmb_target_is_refused(folds, tmp_path, models_home, capsys):
    archive = shivaweights.official_zip(tmp_path / "w.zip", folds[1:2], target="PVS")
    assert "target is 'PVS'" in refused(archive, models_home, capsys)


def test_zip_not_laid_out_as_the_downloads_is_refused(folds, tmp_path, models_home, capsys):
    import zipfile

    archive = tmp_path / "w.zip"
    with zipfile.ZipFile(archive, "w") as out:  # the folds without their descriptor JSON
        out.write(folds[0], "SWI-CMB/fold_0.h5")
    assert "no model descriptor" in refused(archive, models_home, capsys)


def test_wrong_layout_is_refused(tmp_path, models_home, capsys):
    import keras

    inputs = keras.Input((1, 16, 16, 16))  # channels first
    model = keras.Model(inputs, keras.layers.Conv3D(1, 1, activation="sigmoid", data_format="channels_first")(inputs))
    model.save(tmp_path / "fold_0.h5")
    archive = shivaweights.official_zip(tmp_path / "w.zip", [tmp_path / "fold_0.h5"])
    result = run_cli(["models", "install", archive])  # a subprocess: what TensorFlow prints would show
    assert result.returncode == 3 and result.stderr.count("\n") == 1, result.stderr  # one line, no TF log
    assert "is not channels-last 3D with one channel" in result.stderr
    assert f"{archive}/SWI-CMB/fold_0.h5" in result.stderr and ".partial-" not in result.stderr
    assert not models_home.exists() or not any(models_home.iterdir())


def test_missing_converter_is_explained(monkeypatch, tmp_path, models_home, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *more: None if name == "tf2onnx" else real_find_spec(name, *more))
    assert cli.main(["models", "install", str(tmp_path / "x.zip")]) == 4
    err = capsys.readouterr().err
    assert "tf2onnx is missing" in err and "pip install 'shivacmb[convert]'" in err


def test_converted_official_weights_get_an_int8_copy_and_its_check(installed, calibration, monkeypatch, capsys):
    """int8 works for any installed model: the converted folds (a mixed_float16 one among them) share one quantized
    graph, which computes every fold, and `models verify --precision int8` checks and records it."""
    from SHIVACMBLib.modelstore import precisions, quantize

    box = calibration[0, ..., 0].transpose(2, 1, 0)  # back to [z, y, x]
    monkeypatch.setattr(quantize, "calibration_boxes", lambda model, n=1: iter([box]))
    code = cli.main(["models", "verify", str(installed.path), "--precision", "int8", "--device", "cpu",
                     "--scan", str(write_phantom(make_phantom(424242, "swi", (1.0, 1.0, 1.0), n_cmb=8),
                                                 installed.path.parent.parent / "scan", "p")["image"])])
    out = capsys.readouterr().out
    assert "int8: quantizing 'shiva-test' (3 fold(s), one graph)" in out and "recorded:" in out
    assert code == (0 if "the same detections in 1 of 1" in out else 3)
    int8 = FoldEnsemble(installed, "cpu", precision="int8", unverified=True)
    assert int8.running_precision == "int8" and len(int8.sessions) == 1
    mean, folds = int8.predict(box)
    exact, exact_folds = FoldEnsemble(installed, "cpu").predict(box)
    assert len(folds) == 3 and all(np.abs(a - b).mean() < 0.01 for a, b in zip(folds, exact_folds))
    assert precisions.read_record(installed, "int8", int8.provider) is not None
