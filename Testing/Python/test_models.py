"""Model folders: descriptor validation, sha256 verification, the installed-model registry."""

import json
import os
import shutil

import pytest

from SHIVACMBLib.modelstore import blobmodel
from helpers import SHIPPED_MODEL
from SHIVACMBLib.errors import ModelError
from SHIVACMBLib.modelstore.models import (DEFAULT_MODEL, find_model, installed_models, load_model, model_search_dirs,
                                read_descriptor, user_model_dirs, verify_model)


@pytest.fixture
def model(tmp_path):
    return blobmodel.write_model(tmp_path / "m", name="my-model", folds=2)


def edit(folder, change):
    path = folder / "model.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data))


def test_descriptor_fields(model):
    d = read_descriptor(model)
    assert (d.name, d.target, d.layout, d.activation, d.threshold, d.fold_floor) == \
        ("my-model", "CMB", "NDHWC", "none", 0.5, 0.001)
    assert d.shape == (80, 96, 80) and d.spacing_mm == (1.0, 1.0, 1.0)
    assert d.normalization.method == "percentile" and d.normalization.clip == 1.3
    assert [f.file for f in d.folds] == ["fold0.onnx", "fold1.onnx"]
    assert d.extent_threshold is None  # optional: components reach down to the threshold itself


def test_extent_threshold_is_read(model):
    edit(model, lambda d: d.update(threshold=0.99, extent_threshold=0.5))
    assert (read_descriptor(model).threshold, read_descriptor(model).extent_threshold) == (0.99, 0.5)


def test_a_run_threshold_is_the_option_else_the_model_own_and_the_extent_never_above_it(model):
    edit(model, lambda d: d.update(threshold=0.99, extent_threshold=0.5))
    d = read_descriptor(model)
    assert (d.threshold_for(None), d.threshold_for(0.3)) == (0.99, 0.3)
    assert (d.extent_for(d.threshold_for(None)), d.extent_for(0.3)) == (0.5, 0.3)


def test_verification_names_the_corrupt_fold(model):
    fold = model / "fold1.onnx"
    fold.write_bytes(fold.read_bytes() + b"x")
    with pytest.raises(ModelError) as err:
        load_model(str(model))
    assert str(fold) in str(err.value) and "sha256 mismatch" in str(err.value)


def test_verification_names_the_missing_fold(model):
    (model / "fold0.onnx").unlink()
    with pytest.raises(ModelError, match="fold0.onnx: fold file missing"):
        verify_model(read_descriptor(model))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("name"), "'name' is missing"),
    (lambda d: d.update(target="WMH"), "not a cerebral microbleed"),
    (lambda d: d["input"].update(layout="NHWC"), "'input.layout' is 'NHWC'"),
    (lambda d: d["input"].update(shape=[160, 214]), "three numbers"),
    (lambda d: d["input"].update(shape=[160.5, 214, 176]), "positive integers"),
    (lambda d: d["input"].update(orientation="LPS"), "only RAS"),
    (lambda d: d["output"].update(activation="relu"), "'output.activation' is 'relu'"),
    (lambda d: d.update(threshold=1.5), "between 0 and 1"),
    (lambda d: d.update(threshold=0.9, extent_threshold=0.95), "'extent_threshold' is 0.95, expected a value above 0"),
    (lambda d: d.update(extent_threshold="low"), "'extent_threshold' must be float"),
    (lambda d: d.update(folds=[]), "at least one fold"),
    (lambda d: d["folds"][0].update(file="../elsewhere.onnx"), "inside the model folder"),
    (lambda d: d["folds"][0].update(sha256="abc"), "64-character"),
    (lambda d: d["input"]["normalization"].update(method="zscore"), "'input.normalization.method' is 'zscore'"),
])
def test_descriptor_errors_name_file_and_key(model, change, message):
    edit(model, change)
    with pytest.raises(ModelError) as err:
        read_descriptor(model)
    assert str(model / "model.json") in str(err.value) and message in str(err.value)


def test_not_json(model):
    (model / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        read_descriptor(model)


def test_registry_finds_models_by_name_in_the_user_folder(tmp_path, monkeypatch):
    user = tmp_path / "user"
    blobmodel.write_model(user / "folder-a", name="alpha")
    monkeypatch.setenv("SHIVACMB_MODELS", str(user))
    assert user_model_dirs() == [user]
    assert find_model("alpha") == user / "folder-a"
    assert find_model("folder-a") == user / "folder-a"
    names = [m.name for m in installed_models() if not isinstance(m, tuple)]
    assert "alpha" in names


def test_an_interrupted_install_is_not_a_model(tmp_path, monkeypatch):
    user = tmp_path / "user"
    blobmodel.write_model(user / ".alpha.partial-1234", name="alpha", threshold=0.3)  # staged, never renamed
    blobmodel.write_model(user / "alpha", name="alpha", threshold=0.7)
    monkeypatch.setenv("SHIVACMB_MODELS", str(user))
    assert [m.path.name for m in installed_models() if m.path.parent == user] == ["alpha"]
    assert load_model("alpha").threshold == 0.7


def test_registry_path_list_and_priority(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    blobmodel.write_model(first / "x", name="same", threshold=0.3)
    blobmodel.write_model(second / "x", name="same", threshold=0.7)
    monkeypatch.setenv("SHIVACMB_MODELS", os.pathsep.join([str(first), str(second)]))
    assert model_search_dirs()[:2] == [first, second]
    assert load_model("same").threshold == 0.3


def test_broken_models_are_listed_with_their_problem(tmp_path, monkeypatch):
    user = tmp_path / "user"
    (user / "broken").mkdir(parents=True)
    (user / "broken" / "model.json").write_text("[]")
    monkeypatch.setenv("SHIVACMB_MODELS", str(user))
    entries = installed_models()
    assert any(isinstance(e, tuple) and "JSON object" in e[1] for e in entries)


def test_unknown_name_lists_what_is_installed(tmp_path, monkeypatch):
    blobmodel.write_model(tmp_path / "u" / "a", name="alpha")
    monkeypatch.setenv("SHIVACMB_MODELS", str(tmp_path / "u"))
    with pytest.raises(ModelError, match="no model named 'beta'.*installed: alpha"):
        find_model("beta")


def test_default_model_is_looked_up_when_none_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("SHIVACMB_MODELS", str(tmp_path / "nothing"))
    if any(not isinstance(m, tuple) and m.name == DEFAULT_MODEL for m in installed_models()):
        assert find_model(None).is_dir()
    else:
        with pytest.raises(ModelError, match="default model"):
            find_model(None)


def test_model_folder_without_descriptor(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a model folder"):
        find_model(str(tmp_path / "empty"))


def test_shipped_test_model_is_what_the_builder_makes(tmp_path):
    """Testing/models/dark-blob-detector is reproducible from Testing/Python/blobmodel.py."""
    rebuilt = blobmodel.write_model(tmp_path / "rebuilt", **blobmodel.SHIPPED)
    for name in ("model.json", "fold0.onnx", "fold1.onnx"):
        assert (rebuilt / name).read_bytes() == (SHIPPED_MODEL / name).read_bytes(), name
    verify_model(read_descriptor(SHIPPED_MODEL))


def test_copied_model_folder_still_verifies(tmp_path):
    shutil.copytree(SHIPPED_MODEL, tmp_path / "copy")
    assert load_model(str(tmp_path / "copy")).name == "test-dark-blob-detector"
