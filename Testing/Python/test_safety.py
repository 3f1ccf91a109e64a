"""Hostile input (issue 23): no identifier escapes its folder, no output replaces what it did not make,
and every wrong answer becomes a warning or a one-line refusal with the README's exit code."""

from __future__ import annotations

import json
import os
import random
import stat
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

import phantoms
from helpers import REPO, SMALL_FOV, run_cli
from SHIVACMBLib import cli
from SHIVACMBLib.modelstore import official
from SHIVACMBLib.rating import review
from SHIVACMBLib.errors import InputError, RuntimeFailure
from SHIVACMBLib.files import safe_name
from SHIVACMBLib.findings import read_findings
from SHIVACMBLib.pipeline import SegmentOptions, segment
from SHIVACMBLib.rating.review import RatingSession
from SHIVACMBLib.scan import read_scan

HOSTILE = ["", ".", "..", "../victim", "/tmp/abs", "a/b", "a\\b", "x" * 300, "CON", "nul.txt", "-rf", ".hidden",
           "é", "a b", "a\nb", "~", "$HOME", "\u202eevil"]


def snapshot(root: Path) -> Dict[str, Tuple[str, int, int]]:
    """Every entry below ``root``: kind, size and modification time (what a run must not touch)."""
    entries = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        kind = "link" if stat.S_ISLNK(info.st_mode) else "dir" if stat.S_ISDIR(info.st_mode) else "file"
        entries[str(path.relative_to(root))] = (kind, 0 if kind == "dir" else info.st_size,
                                                0 if kind == "dir" else info.st_mtime_ns)
    return entries


def changed_outside(before: Dict, after: Dict, allowed: str) -> List[str]:
    """Entries created, changed or removed anywhere but inside ``allowed`` (relative folder)."""
    keys = set(before) | set(after)
    return sorted(k for k in keys if before.get(k) != after.get(k)
                  and not (k == allowed or k.startswith(allowed + os.sep)))


def one_line_error(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shivacmb: error:"), text
    return lines[0]


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A folder with a user's own files around the output folder."""
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "thesis.txt").write_text("years of work")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("mine")
    return tmp_path


# --- the name rule ----------------------------------------------------------------------------


def test_safe_names_are_plain_names_and_everything_else_is_refused_naming_it():
    for good in ("sub-01_ses-1_swi", "scan.v2", "a+b", "A", "x" * 128):
        assert safe_name(good, "id") == good
    for bad in HOSTILE:
        with pytest.raises(InputError) as caught:
            safe_name(bad, "--scan-id")
        message = str(caught.value)
        assert "\n" not in message and "--scan-id" in message and repr(bad[:20])[1:-1][:10] in message


def test_slicer_result_folders_follow_the_rule_whatever_the_node_name():
    from SHIVACMBLib.slicerside.slicerbridge import scan_id_for

    for node in ("3: T2* axial", "x" * 300, "CON", "...", "é"):
        assert safe_name(scan_id_for(node), "id") == scan_id_for(node)


# --- segment ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scan_id", ["", ".", "..", "../victim", "/tmp/abs-victim", "results/.."])
def test_scan_id_that_is_no_plain_name_is_refused_before_any_work(sandbox, iso_scan, model_dir, scan_id):
    before = snapshot(sandbox)
    result = run_cli(["segment", iso_scan, "--model", model_dir, "--out", sandbox / "results", "--scan-id", scan_id])
    assert result.returncode == 2
    assert "--scan-id" in one_line_error(result.stderr)
    assert snapshot(sandbox) == before


def test_scan_file_named_only_by_its_extension_is_refused(sandbox, iso_scan, model_dir):
    nameless = sandbox / ".nii.gz"
    nameless.write_bytes(iso_scan.read_bytes())
    before = snapshot(sandbox)
    result = run_cli(["segment", nameless, "--model", model_dir, "--out", sandbox / "results"])
    assert result.returncode == 2 and "give --scan-id" in one_line_error(result.stderr)
    assert snapshot(sandbox) == before


@pytest.mark.parametrize("own", ["file", "folder"])
def test_result_folder_that_is_a_users_own_is_never_moved(sandbox, iso_scan, model_dir, own):
    target = sandbox / "results" / "iso"
    if own == "file":
        target.write_text("my own file")
    else:
        target.mkdir()
        (target / "data.csv").write_text("1,2")
    before = snapshot(sandbox)
    result = run_cli(["segment", iso_scan, "--model", model_dir, "--out", sandbox / "results"])
    assert result.returncode == 2
    assert "exists and is not an earlier result" in one_line_error(result.stderr)
    assert snapshot(sandbox) == before


def test_an_earlier_result_is_still_replaced_whole(sandbox, iso_scan, model_dir):
    options = SegmentOptions(model=str(model_dir), location=False, report=False)
    first = segment(iso_scan, sandbox / "results", options)
    (first.output_dir / "stale.txt").write_text("from the first run")
    second = segment(iso_scan, sandbox / "results", options)
    assert second.output_dir == first.output_dir and not (second.output_dir / "stale.txt").exists()
    assert (sandbox / "results" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (sandbox / "results").iterdir()) == ["iso", "notes.txt"]


# --- scans that give wrong answers --------------------------------------------------------------


def _image(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def test_nifti_nan_and_inf_voxels_are_reported_like_other_formats(tmp_path):
    values = np.random.default_rng(0).random((12, 12, 12)).astype(np.float32)
    values[0, 0, :3] = [np.nan, np.inf, -np.inf]
    for name in ("scan.nii.gz", "scan.nii", "scan.nrrd"):
        assert "3 non-finite voxels set to 0" in read_scan(_image(tmp_path / name, values)).warnings


@pytest.mark.parametrize("shape, problem", [((1, 1, 1), "a single voxel"), ((20, 1, 1), "a line of voxels"),
                                            ((1, 20, 20), "2D image"), ((3, 20, 20), "image too small")])
def test_tiny_images_are_refused_by_what_they_are(tmp_path, shape, problem):
    result = run_cli(["segment", _image(tmp_path / "tiny.nii.gz", np.random.rand(*shape).astype(np.float32)),
                      "--out", tmp_path / "out"])
    assert result.returncode == 2 and problem in one_line_error(result.stderr)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sparse file and RLIMIT_AS")
def test_complete_image_larger_than_memory_is_not_called_truncated(tmp_path):
    path = _image(tmp_path / "big.nii", np.ones((4, 4, 4), np.float32))
    header = bytearray(path.read_bytes()[:352])
    header[40:56] = struct.pack("<8h", 3, 1024, 1024, 512, 1, 1, 1, 1)  # 2 GiB of float32, sparse on disk
    with open(path, "wb") as stream:
        stream.write(header)
        stream.truncate(352 + 1024 * 1024 * 512 * 4)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29)); "
            "from SHIVACMBLib.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "segment", str(path), "--out", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 4 and "not enough memory" in one_line_error(result.stderr), result.stderr


def test_tiny_scan_and_tiny_mask_give_warnings_in_run_json_and_report(tmp_path, iso_scan, model_dir):
    mask = sitk.Image(sitk.ReadImage(str(iso_scan)))
    array = np.zeros(sitk.GetArrayViewFromImage(mask).shape, np.uint8)
    centre = tuple(s // 2 for s in array.shape)
    array[centre[0] - 1:centre[0] + 1, centre[1] - 1:centre[1] + 1, centre[2] - 1:centre[2] + 1] = 1  # 0.008 mL
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(mask)
    sitk.WriteImage(labels, str(tmp_path / "mask.nii.gz"))
    options = SegmentOptions(model=str(model_dir), mask=tmp_path / "mask.nii.gz", location=False)
    result = segment(iso_scan, tmp_path / "out", options)
    assert any("brain mask is only 0.008 mL" in w for w in result.run.warnings), result.run.warnings
    assert "brain mask is only" in (result.output_dir / "report.html").read_text(encoding="utf-8")
    small = _image(tmp_path / "small.nii.gz", np.random.default_rng(1).random((5, 5, 5)).astype(np.float32) + 1,
                   spacing=(8.0, 8.0, 8.0))
    whole = _image(tmp_path / "whole.nii.gz", np.ones((5, 5, 5), np.uint8), spacing=(8.0, 8.0, 8.0))
    run = segment(small, tmp_path / "out", SegmentOptions(model=str(model_dir), mask=whole, location=False)).run
    assert any("the scan covers only 64 mL" in w for w in run.warnings), run.warnings


# --- compare ---------------------------------------------------------------------------------------


def _other_scan(tmp_path: Path) -> Path:
    grid = phantoms.grid_around((4.0, 1.0, -2.0), SMALL_FOV, (1, 1, 1.5))
    return phantoms.write(phantoms.render(phantoms.default_scene(), grid, seed=5), tmp_path / "followup.nii.gz")


def test_compare_refuses_swapped_findings_tables_quickly(tmp_path, iso_scan, model_dir):
    followup = _other_scan(tmp_path)
    options = SegmentOptions(model=str(model_dir), location=False, report=False)
    found = {name: segment(scan, tmp_path / "found", replace_id(options, name)).output_dir
             for name, scan in (("baseline", iso_scan), ("followup", followup))}
    result = run_cli(["compare", iso_scan, followup, "--out", tmp_path / "cmp", "--baseline-findings",
                      found["followup"], "--followup-findings", found["baseline"], "--progress", "none"])
    assert result.returncode == 2 and "swapped" in one_line_error(result.stderr)
    assert not (tmp_path / "cmp").exists()


def replace_id(options: SegmentOptions, scan_id: str) -> SegmentOptions:
    from dataclasses import replace

    return replace(options, scan_id=scan_id)


def test_json_findings_with_a_word_for_a_number_are_refused_naming_the_field(tmp_path, iso_scan):
    row = {"cmb_id": 1, "r": "left", "a": 0.0, "s": 0.0, "i": 1, "j": 1, "k": 1, "volume_mm3": 1.0, "voxels": 1}
    path = tmp_path / "findings.json"
    path.write_text(json.dumps({"findings": [row]}))
    with pytest.raises(InputError, match="finding 1: r is 'left', not a number"):
        read_findings(path)
    result = run_cli(["compare", iso_scan, iso_scan, "--out", tmp_path / "cmp", "--baseline-findings", path,
                      "--followup-findings", path, "--progress", "none"])
    assert result.returncode == 2 and "not a number" in one_line_error(result.stderr)


# --- phantom ----------------------------------------------------------------------------------------


def test_phantom_out_a_file_or_a_path_prefix_is_refused(sandbox):
    blocker = sandbox / "file.txt"
    blocker.write_text("x")
    before = snapshot(sandbox)
    refused = run_cli(["phantom", "--out", blocker])
    assert refused.returncode == 2 and "not a folder" in one_line_error(refused.stderr)
    prefixed = run_cli(["phantom", "--out", sandbox / "ph", "--prefix", "../victim/x"])
    assert prefixed.returncode == 2 and "--prefix" in one_line_error(prefixed.stderr)
    assert snapshot(sandbox) == before


# --- review ------------------------------------------------------------------------------------------


@pytest.fixture
def scan_files(tmp_path: Path) -> Path:
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("s1", "s2"):
        (folder / f"{name}.nii.gz").write_bytes(b"stand-in")
    return folder


def test_review_scan_list_ids_and_paths_are_checked_before_writing(sandbox, scan_files):
    victim_tsv = sandbox / "victim" / "x.tsv"
    victim_tsv.write_text("precious")
    listing = sandbox / "list.tsv"
    listing.write_text(f"scan_id\tpath\n../victim/x\t{scan_files / 's1.nii.gz'}\n")
    ai = sandbox / "ai"
    ai.mkdir()
    before = snapshot(sandbox)
    result = run_cli(["review", "new", sandbox / "session", "--scans", listing, "--ai", ai])
    assert result.returncode == 2 and "'../victim/x'" in one_line_error(result.stderr)
    listing.write_text(f"path\n{scan_files / 'missing.nii.gz'}\n")
    before = snapshot(sandbox)
    result = run_cli(["review", "new", sandbox / "session", "--scans", listing])
    assert result.returncode == 2 and "no such scan file" in one_line_error(result.stderr)
    assert snapshot(sandbox) == before and victim_tsv.read_text() == "precious"


@pytest.mark.parametrize("rater", ["", ".", "..", "x" * 300, "../..", "王"])
def test_rater_names_that_cannot_name_a_folder_are_one_line_refusals(tmp_path, scan_files, rater):
    review.create_session(tmp_path / "session", review.scans_from(scan_files), "assisted")
    before = snapshot(tmp_path)
    with pytest.raises(InputError, match="rater") as caught:
        RatingSession(tmp_path / "session", rater)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300
    assert snapshot(tmp_path) == before


def _rated_session(tmp_path: Path, scan_files: Path) -> Path:
    session = review.create_session(tmp_path / "session", review.scans_from(scan_files), "blind").folder
    for rater in ("ann", "bob"):
        with RatingSession(session, rater) as rating:
            rating.open_scan("s1")
            rating.add("s1", (1.0, 2.0, 3.0), "definite")
            rating.submit("s1")
    return session


def test_damaged_state_is_rebuilt_from_an_intact_log(tmp_path, scan_files):
    session = _rated_session(tmp_path, scan_files)
    state = session / "raters" / "ann" / "state.json"
    expected = state.read_text()
    state.write_text(expected[: len(expected) // 2])
    status = run_cli(["review", "status", session, "--json"])
    assert status.returncode == 0, status.stderr
    ann = next(r for r in json.loads(status.stdout)["raters"] if r["rater"] == "ann")
    assert ann["submitted"] == 1 and "rebuilt from log.jsonl" in ann["problems"][0]
    with RatingSession(session, "ann") as rating:
        assert rating.rating("s1").state == "submitted"
    assert json.loads(state.read_text()) == json.loads(expected)


def test_rater_whose_log_is_missing_is_flagged_never_hidden(tmp_path, scan_files):
    session = _rated_session(tmp_path, scan_files)
    (session / "raters" / "bob" / "log.jsonl").unlink()
    status = run_cli(["review", "status", session])
    assert status.returncode == 0 and "2 rater(s)" in status.stdout
    assert "warning: bob:" in status.stdout and "log.jsonl is missing" in status.stdout
    exported = run_cli(["review", "export", session, "--out", tmp_path / "export"])
    assert exported.returncode == 0 and "log.jsonl is missing" in exported.stdout
    rows = (tmp_path / "export" / "ratings_scans.tsv").read_text().splitlines()
    assert sum("\tbob\t" in row for row in rows) == 2  # bob's ratings, from his state file
    with pytest.raises(InputError, match="is missing"):
        RatingSession(session, "bob")


# --- batch -------------------------------------------------------------------------------------------


def test_batch_never_takes_its_own_outputs_or_unsafe_ids_for_scans(tmp_path):
    from SHIVACMBLib.cohort.batch import discover

    source = tmp_path / "cohort"
    (source / "out" / "scan1").mkdir(parents=True)
    for path in (source / "scan1.nii.gz", source / "out" / "scan1" / "cmb_labels.nii.gz",
                 source / "elsewhere" / "cmb.seg.nrrd", source / "elsewhere" / "cmb_probability.nrrd"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"stand-in")
    assert [job.scan_id for job in discover(source, out=source / "out").jobs] == ["scan1"]
    (source / "my scan.nii.gz").write_bytes(b"stand-in")
    with pytest.raises(InputError, match="'my scan'"):
        discover(source, out=source / "out")
    listing = tmp_path / "list.csv"
    listing.write_text("scan_id,image\n..,cohort/scan1.nii.gz\n")
    with pytest.raises(InputError, match="line 2: scan_id '..'"):
        discover(listing)


def test_batch_twice_into_its_own_input_folder_with_json_progress(tmp_path, iso_scan, model_dir):
    pytest.importorskip("distributed")
    source = tmp_path / "cohort"
    source.mkdir()
    (source / "scan1.nii.gz").write_bytes(iso_scan.read_bytes())
    command = ["batch", source, "--out", source / "out", "--model", model_dir, "--no-location", "--no-report",
               "--workers", "1", "--threads", "1", "--progress", "json"]
    for expected in ("done", "skipped"):
        result = run_cli(command)
        assert result.returncode == 0, result.stderr
        lines = [json.loads(line) for line in result.stdout.splitlines()]  # every line is JSON
        assert [line["status"] for line in lines[:-1]] == [expected]
        assert lines[-1]["stage"] == "done" and lines[-1]["total"] == 1 and lines[-1]["failed"] == []


# --- models install ------------------------------------------------------------------------------------


def _zip(path: Path, members: List[Tuple[zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for info, data in members:
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return path


def _member(name: str, mode: int = stat.S_IFREG | 0o644) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    info.create_system = 3
    return info


@pytest.mark.parametrize("kind", ["bomb", "symlink", "device", "fifo", "outside"])
def test_zip_is_checked_before_anything_is_written_and_errors_name_the_member(tmp_path, kind):
    members = [(_member("SWI-CMB/model_info.json"), b"{}")]
    if kind == "bomb":
        members.append((_member("SWI-CMB/fold.h5"), bytes(20 << 20)))  # 20 MB of zeros: ~1000 times
    elif kind == "symlink":
        members.append((_member("SWI-CMB/link", stat.S_IFLNK | 0o777), b"/etc"))
    elif kind == "device":
        members.append((_member("SWI-CMB/dev", stat.S_IFCHR | 0o600), b""))
    elif kind == "fifo":
        members.append((_member("SWI-CMB/pipe", stat.S_IFIFO | 0o600), b""))
    else:
        members.append((_member("../evil.h5"), b"x"))
    archive = _zip(tmp_path / "w.zip", members)
    with pytest.raises(InputError) as caught:
        official.unpack(archive, tmp_path / "unpacked")
    assert "zip member 'SWI-CMB/" in str(caught.value) or "'../evil.h5'" in str(caught.value)
    assert not (tmp_path / "unpacked").exists() and not (tmp_path / "evil.h5").exists()


def test_zip_limits_on_members_size_and_free_space(tmp_path, monkeypatch):
    archive = _zip(tmp_path / "w.zip", [(_member(f"m/{n}.bin"), os.urandom(1000)) for n in range(5)])
    monkeypatch.setattr(official, "MAX_MEMBERS", 4)
    with pytest.raises(InputError, match="5 members"):
        official.unpack(archive, tmp_path / "a")
    monkeypatch.setattr(official, "MAX_MEMBERS", 10)
    monkeypatch.setattr(official, "MAX_UNPACKED", 4000)
    with pytest.raises(InputError, match="expands to"):
        official.unpack(archive, tmp_path / "b")
    monkeypatch.setattr(official, "MAX_UNPACKED", 10 ** 9)
    monkeypatch.setattr(official.shutil, "disk_usage", lambda path: SimpleNamespace(free=100))
    with pytest.raises(RuntimeFailure, match="needs 0 MB"):
        official.unpack(archive, tmp_path / "c")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_full_disk_while_unpacking_names_the_member(tmp_path, monkeypatch):
    archive = _zip(tmp_path / "w.zip", [(_member("m/fold0.h5"), os.urandom(1000))])

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(official.shutil, "copyfileobj", full)
    with pytest.raises(RuntimeFailure, match="cannot unpack 'm/fold0.h5': No space left on device"):
        official.unpack(archive, tmp_path / "unpacked")


def test_install_refusals_import_no_tensorflow_and_name_no_hidden_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("SHIVACMBLib.modelstore.tfconvert.check_converter", lambda: None)
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # importing it would fail the test
    not_zip = tmp_path / "weights.zip"
    not_zip.write_text("not a zip")
    assert cli.main(["models", "install", str(not_zip)]) == 2
    assert one_line_error(capsys.readouterr().err).startswith(f"shivacmb: error: {not_zip}: not a zip file")
    empty = _zip(tmp_path / "empty.zip", [(_member("readme.txt"), b"hello")])
    assert cli.main(["models", "install", str(empty)]) == 3
    line = one_line_error(capsys.readouterr().err)
    assert str(empty) in line and ".unpack-" not in line
    assert cli.main(["models", "install", str(empty), "--name", "../x"]) == 2
    assert "--name '../x'" in one_line_error(capsys.readouterr().err)


# --- property: random identifiers into every path-making option ----------------------------------------


def test_random_identifiers_never_touch_anything_outside_their_folder(tmp_path, iso_scan, model_dir, scan_files,
                                                                      capsys, monkeypatch):
    """Every path-making option gets dots, slashes, unicode, 300 characters, empty: each run is refused in one
    line (exit 2) or succeeds, and nothing outside its output folder is created, moved or deleted."""
    monkeypatch.setattr("SHIVACMBLib.modelstore.tfconvert.check_converter", lambda: None)
    sandbox = tmp_path / "box"
    (sandbox / "victim").mkdir(parents=True)
    (sandbox / "victim" / "keep.txt").write_text("keep")
    session = review.create_session(sandbox / "session", review.scans_from(scan_files), "assisted").folder
    not_zip = tmp_path / "weights.zip"
    not_zip.write_text("not a zip")
    listing, review_list = tmp_path / "list.csv", tmp_path / "review.tsv"
    ids = _random_identifiers(2323, 40)
    accepted = [i for i in ids if _plain(i)]
    assert 3 <= len(accepted) <= 6, accepted  # both outcomes are exercised, and the test stays short
    for index, ident in enumerate(ids):
        listing.write_text("scan_id,image\n" + json.dumps(ident) + f",{iso_scan}\n", encoding="utf-8")
        review_list.write_text("scan_id\tpath\n" + json.dumps(ident) + f"\t{scan_files / 's1.nii.gz'}\n",
                               encoding="utf-8")
        runs = [(["segment", str(iso_scan), "--model", str(model_dir), "--out", str(sandbox / "results"),
                  f"--scan-id={ident}", "--no-location", "--no-report", "--progress", "none"], "results"),
                (["phantom", "--out", str(sandbox / "phantoms"), f"--prefix={ident}", "--spacing", "3"], "phantoms"),
                (["review", "new", str(sandbox / f"new{index}"), "--scans", str(review_list)], f"new{index}"),
                (["models", "install", str(not_zip), f"--name={ident}"], "models"),
                (["batch", str(listing), "--out", str(sandbox / "batch"), "--model", str(model_dir), "--no-location",
                  "--no-report", "--workers", "1", "--threads", "1", "--progress", "none"], "batch")]
        for argv, allowed in runs:
            before = snapshot(sandbox)
            code = cli.main(argv)
            captured = capsys.readouterr()
            assert code in (0, 2), (argv, code, captured.err)
            if code == 2:
                one_line_error(captured.err)
            assert changed_outside(before, snapshot(sandbox), allowed) == [], (argv, captured.err)
        before = snapshot(sandbox)
        try:
            RatingSession(session, ident).close()
        except InputError as err:
            assert "\n" not in str(err)
        assert changed_outside(before, snapshot(sandbox), os.path.join("session", "raters")) == []
    assert (sandbox / "victim" / "keep.txt").read_text() == "keep"


def _random_identifiers(seed: int, n: int) -> List[str]:
    rng = random.Random(seed)
    pieces = ["a", "Z", "0", "_", "-", "+", ".", "..", "/", "\\", " ", "é", "王", "\u202e", "\n", "~", ":", "*",
              "sub-01", "CON", "%2e", "\t"]
    ids = list(HOSTILE) + ["sub-01_ses-2", "scan.v2"]
    while len(ids) < n:
        ids.append("".join(rng.choice(pieces) for _ in range(rng.choice([1, 2, 3, 5, 8, 150]))))
    return ids


def _plain(ident: str) -> bool:
    try:
        safe_name(ident, "id")
    except InputError:
        return False
    return True
