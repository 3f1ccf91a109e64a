"""The `shivacmb` command as a user runs it: exit codes, one-line errors, no partial output, progress, cancel."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from SHIVACMBLib.modelstore import blobmodel
import phantoms
from helpers import REPO, cpu_provider, files_under, run_cli


def test_help_is_enough_to_use_it():
    result = run_cli(["segment", "--help"])
    assert result.returncode == 0
    for option in ("--mask", "--model", "--out", "--device", "--threshold", "--save-probability", "--progress"):
        assert option in result.stdout
    assert "exit codes" in result.stdout


def test_segment_prints_a_summary_and_writes_results(tmp_path, iso_scan, model_dir):
    result = run_cli(["segment", iso_scan, "--model", model_dir, "--out", tmp_path / "out", "--progress", "none"])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"6 CMBs found in iso ({cpu_provider()}")
    assert (tmp_path / "out" / "iso" / "findings.tsv").is_file()


def test_progress_json_lines_for_front_ends(tmp_path, iso_scan, model_dir):
    result = run_cli(["segment", iso_scan, "--model", model_dir, "--out", tmp_path, "--progress", "json"])
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    stages = [r["stage"] for r in records]
    assert stages[0] == "read" and stages[-1] == "done"
    assert [s for s in dict.fromkeys(stages)] == ["read", "mask", "preprocess", "inference", "postprocess",
                                                  "location", "write", "done"]
    fractions = [r["fraction"] for r in records]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert records[-1]["cmb_count"] == 6 and records[-1]["output"] == str(tmp_path / "iso")
    assert records[-1]["provider"] == cpu_provider()


def bad_inputs(folder):
    """Each bad input with a fragment its error line must contain."""
    garbage = folder / "garbage.nii.gz"
    garbage.write_bytes(b"not an image at all")
    four = folder / "four.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([sitk.Image(8, 8, 8, sitk.sitkFloat32)] * 2), str(four))
    two = folder / "two.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(8, 8).astype(np.float32)), str(two))
    empty = folder / "empty.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8, 8), np.float32)), str(empty))
    nan = folder / "nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((8, 8, 8), np.nan, np.float32)), str(nan))
    full = folder / "full.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(20, 20, 20).astype(np.float32)), str(full))
    truncated = folder / "truncated.nii"
    truncated.write_bytes(full.read_bytes()[:20000])
    return [(garbage, "not an image file"), (four, "4D image with 2 volumes"), (two, "2D image"),
            (empty, "empty image"), (nan, "NaN"), (truncated, "truncated"),
            (folder / "missing.nii.gz", "no such file"), (folder, "no DICOM series")]


def test_every_refusal_is_one_line_exit_2_and_no_output(tmp_path, model_dir):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for path, fragment in bad_inputs(inputs):
        out = tmp_path / "out"
        result = run_cli(["segment", path, "--model", model_dir, "--out", out, "--progress", "json"])
        assert result.returncode == 2, (path, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1, (path, result.stderr)
        assert lines[0].startswith("shivacmb: error: ") and str(path) in lines[0] and fragment in lines[0]
        assert files_under(out) == [], path


def test_mask_that_misses_the_scan_is_refused(tmp_path, iso_scan, model_dir):
    far = phantoms.grid_around((500, 0, 0), (10, 10, 10), (1, 1, 1))
    mask = phantoms.write(far.with_image(np.ones(far.array_shape, np.uint8)), tmp_path / "mask.nii.gz")
    result = run_cli(["segment", iso_scan, "--mask", mask, "--model", model_dir, "--out", tmp_path / "out"])
    assert result.returncode == 2
    assert str(mask) in result.stderr and "does not overlap" in result.stderr
    assert files_under(tmp_path / "out") == []


def test_model_problems_exit_3(tmp_path, iso_scan):
    result = run_cli(["segment", iso_scan, "--model", "no-such-model", "--out", tmp_path / "out"])
    assert result.returncode == 3 and "no model named 'no-such-model'" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    broken = blobmodel.write_model(tmp_path / "broken", shape=(80, 96, 80))
    (broken / "fold0.onnx").write_bytes(b"tampered")
    result = run_cli(["segment", iso_scan, "--model", broken, "--out", tmp_path / "out"])
    assert result.returncode == 3 and str(broken / "fold0.onnx") in result.stderr and "sha256" in result.stderr
    assert files_under(tmp_path / "out") == []


def test_usage_errors_exit_2(tmp_path, iso_scan):
    assert run_cli([]).returncode == 2
    result = run_cli(["segment", iso_scan, "--threshold", "1.5"])
    assert result.returncode == 2 and "between 0 and 1" in result.stderr
    assert run_cli(["segment", iso_scan, "--device", "tpu"]).returncode == 2


def test_models_list_and_verify(tmp_path, monkeypatch):
    user = tmp_path / "models"
    blobmodel.write_model(user / "good", name="good-model", folds=2)
    monkeypatch.setenv("SHIVACMB_MODELS", str(user))
    listing = run_cli(["models", "list", "--json"])
    assert listing.returncode == 0
    data = json.loads(listing.stdout)
    names = [m["name"] for m in data["models"]]
    assert "good-model" in names and data["search_path"][0] == str(user)
    good = next(m for m in data["models"] if m["name"] == "good-model")
    assert good["folds"] == 2 and good["modalities"] == ["swi", "t2s"] and good["license"] == "Apache-2.0"
    table = run_cli(["models", "list"])
    assert table.returncode == 0 and "good-model" in table.stdout
    assert run_cli(["models", "verify", "good-model"]).returncode == 0
    fold = user / "good" / "fold1.onnx"
    fold.write_bytes(fold.read_bytes()[:-1])
    failed = run_cli(["models", "verify"])
    assert failed.returncode == 3 and "FAILED" in failed.stdout and "fold1.onnx" in failed.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_cancels_cleanly(tmp_path, iso_scan):
    """Slicer's Cancel sends SIGTERM: the run stops with exit 130 and leaves no output."""
    slow = blobmodel.write_model(tmp_path / "slow", shape=(256, 256, 256), folds=12)
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "SHIVACMBLib.cli", "segment", str(iso_scan), "--model", str(slow), "--out",
         str(out), "--progress", "json"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in process.stdout:
        if json.loads(line)["stage"] == "inference":
            break
    time.sleep(1.0)  # inside a fold's onnxruntime run
    sent = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert time.perf_counter() - sent < 2.0  # onnxruntime's run is terminated, not waited for
    assert process.returncode == 130
    assert stderr.strip().splitlines() == ["shivacmb: error: cancelled"]
    assert files_under(out) == []


def test_output_path_that_is_a_file_is_refused_before_work(tmp_path, iso_scan, model_dir):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    result = run_cli(["segment", iso_scan, "--model", model_dir, "--out", blocker / "sub"])
    assert result.returncode == 2
    assert result.stderr.strip() == f"shivacmb: error: {blocker}: output path is not a folder"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_output_folder_is_refused(tmp_path, iso_scan, model_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    result = run_cli(["segment", iso_scan, "--model", model_dir, "--out", locked])
    locked.chmod(0o700)
    assert result.returncode == 2 and "not writable" in result.stderr


def test_demo_runs_the_embedded_model_and_scores_it(tmp_path):
    """`shivacmb demo`: the README's main job, offline, with the embedded default model."""
    result = run_cli(["demo", "--out", tmp_path / "demo"])
    assert result.returncode == 0, result.stderr
    out = tmp_path / "demo" / "results" / "demo-swi"
    for name in ("cmb.seg.nrrd", "findings.tsv", "report.html", "run.json", "cmb_labels.nii.gz"):
        assert (out / name).is_file(), name
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["model"]["name"] == "shivacmb-demo-swi" and "DEMONSTRATION" in run["model"]["description"]
    assert "overlap" in result.stdout and "centroid5mm" in result.stdout
    scored = run_cli(["evaluate", "--pred", tmp_path / "demo" / "results", "--truth", tmp_path / "demo" / "phantom",
                      "--rule", "overlap", "--out", tmp_path / "m.json"])
    assert scored.returncode == 0, scored.stderr
    pooled = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["rules"]["overlap"]["pooled"]
    assert pooled["n_true"] == 8 and pooled["tp"] >= 7 and pooled["fp"] <= 1, pooled


def test_embedded_model_is_listed_and_verifies():
    listing = json.loads(run_cli(["models", "list", "--json"]).stdout)
    demo = next(m for m in listing["models"] if m["name"] == "shivacmb-demo-swi")
    assert demo["license"] == "Apache-2.0" and demo["modalities"] == ["swi", "t2s"]
    assert run_cli(["models", "verify", "shivacmb-demo-swi"]).returncode == 0
