"""Reading an official SHIVA-CMB download before any conversion: layout, descriptor, md5, zip safety.

No TensorFlow here: the folds are stand-in files (conversion itself: test_convert.py, marker convert).
"""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

import shivaweights
from SHIVACMBLib.modelstore import official
from SHIVACMBLib.errors import InputError, ModelError


@pytest.fixture
def folds(tmp_path):
    """A v1-style .h5 file and a v2-style SavedModel folder (bytes only)."""
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "fold_0.h5").write_bytes(b"HDF-fold-0")
    saved = weights / "fold_1"
    (saved / "variables").mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(b"graph")
    (saved / "variables" / "variables.index").write_bytes(b"index")
    return [weights / "fold_0.h5", saved]


def unpacked(archive, tmp_path):
    return official.read_source(official.find_descriptor(official.unpack(archive, tmp_path / "unpacked")))


def test_folder_md5_is_every_file_in_sorted_path_order(folds):
    assert official.md5_of(folds[1]) == hashlib.md5(b"graph" + b"index").hexdigest()
    assert official.md5_of(folds[0]) == hashlib.md5(b"HDF-fold-0").hexdigest()


def test_official_layout_is_read_with_its_md5(folds, tmp_path):
    model = unpacked(shivaweights.official_zip(tmp_path / "w.zip", folds), tmp_path)
    assert [p.name for p in model.folds] == ["fold_0.h5", "fold_1"]
    assert model.descriptor.relative_to(tmp_path / "unpacked").as_posix() == "SWI-CMB/model_info.json"
    assert official.md5_summary(model) == "md5 verified"


def test_names_relative_to_the_descriptor_folder_resolve_too(folds, tmp_path):
    files = [{"name": p.name, "md5": official.md5_of(p)} for p in folds]
    model = unpacked(shivaweights.official_zip(tmp_path / "w.zip", folds, extra={"files": files}), tmp_path)
    assert [p.name for p in model.folds] == ["fold_0.h5", "fold_1"]


def test_a_fold_without_md5_is_reported_unchecked(folds, tmp_path):
    files = [{"name": "SWI-CMB/fold_0.h5", "md5": official.md5_of(folds[0])}, {"name": "SWI-CMB/fold_1"}]
    model = unpacked(shivaweights.official_zip(tmp_path / "w.zip", folds, extra={"files": files}), tmp_path)
    assert official.md5_summary(model) == "md5 verified for 1, NOT checked (no md5 given) for fold_1"


def test_changed_saved_model_file_fails_its_md5(folds, tmp_path):
    archive = shivaweights.official_zip(tmp_path / "w.zip", folds)
    root = official.unpack(archive, tmp_path / "unpacked")
    (root / "SWI-CMB" / "fold_1" / "variables" / "variables.index").write_bytes(b"indeX")
    with pytest.raises(ModelError, match="md5 mismatch for SWI-CMB/fold_1;"):
        official.read_source(official.find_descriptor(root))


def test_zip_without_descriptor_is_refused(folds, tmp_path):
    archive = tmp_path / "w.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.write(folds[0], "SWI-CMB/fold_0.h5")
        out.writestr("SWI-CMB/notes.json", json.dumps({"target": "CMB"}))  # JSON, but not a descriptor
    with pytest.raises(ModelError, match="no model descriptor"):
        official.find_descriptor(official.unpack(archive, tmp_path / "unpacked"))


def test_two_descriptors_are_refused(folds, tmp_path):
    archive = shivaweights.official_zip(tmp_path / "w.zip", folds)
    with zipfile.ZipFile(archive, "a") as out:
        out.writestr("other/model_info.json", json.dumps({"target": "CMB", "files": []}))
    with pytest.raises(ModelError, match=r"several model descriptors \(SWI-CMB/model_info.json, other/model_info"):
        official.find_descriptor(official.unpack(archive, tmp_path / "unpacked"))


def test_model_defined_by_a_script_is_refused(folds, tmp_path):
    archive = shivaweights.official_zip(tmp_path / "w.zip", folds, extra={"script": {"name": "build.py"}})
    with pytest.raises(ModelError, match=r"needs its Python script \(build.py\)"):
        unpacked(archive, tmp_path)


@pytest.mark.parametrize("member", ["../escape.h5", "/abs/fold.h5", "C:/fold.h5"])
def test_zip_member_leaving_the_folder_is_refused(tmp_path, member):
    archive = tmp_path / "w.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr(member, b"x")
    with pytest.raises(InputError, match="would land outside the model folder"):
        official.unpack(archive, tmp_path / "unpacked")
    assert not (tmp_path / "escape.h5").exists()


def test_file_that_is_not_a_zip_is_refused(tmp_path):
    (tmp_path / "w.zip").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a zip file or a folder of SHIVA-CMB weights"):
        official.unpack(tmp_path / "w.zip", tmp_path / "unpacked")


def test_sha256_of_a_folder_is_refused_before_copying(folds, tmp_path):
    with pytest.raises(InputError, match="--sha256 checks a downloaded zip"):
        official.unpack(folds[1].parent, tmp_path / "unpacked", sha256="0" * 64)
    assert not (tmp_path / "unpacked").exists()


def test_default_name_from_the_descriptor():
    assert official.default_name({"modalities": ["SWI"], "version": "v2"}) == "shiva-cmb-swi-v2"
    assert official.default_name({}) == "shiva-cmb-swi"
