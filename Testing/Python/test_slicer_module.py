"""The Slicer module without Slicer: slicerbridge (command lines, packages, models, table, output,
background process), and static checks of SHIVACMB.py, its .ui file and the module's CMakeLists."""

import ast
import importlib.util
import json
import math
import os
import re
import signal
import struct
import sys
import sysconfig
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SHIVACMBLib.modelstore import blobmodel

from SHIVACMBLib import cli, findings, inference, settings
from SHIVACMBLib.settings import ScanSettings, settings_from_args

from SHIVACMBLib.slicerside import slicerbridge
from SHIVACMBLib.findings import Finding, read_tsv
from SHIVACMBLib.slicerside.slicerbridge import (ChildProcess, ModelChoice, RunMonitor, RunSummary,
                                      TABLE_COLUMNS)
from helpers import REPO, cpu_provider, files_under

MODULE_DIR = REPO / "SHIVACMB"
MODULE_PY = MODULE_DIR / "SHIVACMB.py"
SECTIONS = sorted((MODULE_DIR / "SHIVACMBSlicer").glob("*.py"))
SLICER_FILES = [MODULE_PY, *SECTIONS]  # everything Slicer imports with slicer, qt and vtk
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SHIVACMB.ui"
ICON = MODULE_DIR / "Resources" / "Icons" / "SHIVACMB.png"
CMAKE = MODULE_DIR / "CMakeLists.txt"
POSIX_ONLY = pytest.mark.skipif(os.name != "posix", reason="POSIX process groups and signals")


def finding(cmb_id=1, **extra):
    values = dict(cmb_id=cmb_id, r=1.5, a=-2.25, s=3.0, i=10, j=20, k=5, volume_mm3=14.1, voxels=14)
    values.update(extra)
    return Finding(**values)


# --- command lines ---------------------------------------------------------------------------


def test_segment_command_is_what_the_cli_parses():
    settings = ScanSettings(model="shiva-cmb-swi", device="cuda", threshold=0.35, report=False)
    args = slicerbridge.segment_command("/slicer/bin/PythonSlicer", "/t/input.nrrd", "/t/output", settings, "my_scan",
                                        mask="/t/mask.nrrd")
    assert args[:3] == ["/slicer/bin/PythonSlicer", "-m", "SHIVACMBLib.cli"]
    parsed = cli.build_parser().parse_args(args[3:])
    assert (parsed.command, parsed.input, parsed.out, parsed.scan_id) == ("segment", "/t/input.nrrd", "/t/output",
                                                                          "my_scan")
    assert (parsed.model, parsed.device, parsed.threshold, parsed.mask) == ("shiva-cmb-swi", "cuda", 0.35,
                                                                            "/t/mask.nrrd")
    assert parsed.progress == "json" and not parsed.report
    assert settings_from_args(parsed) == settings


def test_segment_command_leaves_out_what_is_not_set():
    args = slicerbridge.segment_command("py", "in.nrrd", "out", ScanSettings(), "scan")
    assert args[3:] == ["segment", "in.nrrd", "--out", "out", "--scan-id", "scan", "--progress", "json"]
    parsed = cli.build_parser().parse_args(args[3:])
    assert parsed.model is None and parsed.threshold is None and parsed.mask is None
    assert parsed.device == "auto" and parsed.report


@pytest.mark.parametrize("bad", [dict(device="gpu"), dict(threshold=0.0), dict(threshold=1.0), dict(precision="int4"),
                                 dict(min_volume_mm3=-1.0)])
def test_scan_settings_refuse_what_the_command_would_refuse(bad):
    with pytest.raises(ValueError):
        ScanSettings(**bad)


def test_device_choices_are_defined_once():
    assert inference.DEVICES is settings.DEVICES and inference.PRECISIONS is settings.PRECISIONS


@pytest.mark.parametrize("name, expected", [
    ("T2* GRE (axial)", "T2_GRE_axial"), ("swi.nii", "swi.nii"), ("sujet-01_swi", "sujet-01_swi"),
    ("", "scan"), ("***", "scan"), ("é", "scan")])
def test_scan_id_for_node_names(name, expected):
    assert slicerbridge.scan_id_for(name) == expected


# --- Python packages -------------------------------------------------------------------------


def test_missing_requirements_lists_only_what_cannot_be_imported():
    installed = {"slicerio", "rich", "onnxruntime", "pynetdicom"}
    missing = slicerbridge.missing_requirements(installed.__contains__, ["onnxruntime-openvino>=1.23"])
    # a build is importable: none is added
    assert missing == ["pynrrd>=1.0", "platformdirs>=3", "highdicom>=0.22", "dicomweb-client>=0.59", "onnx>=1.14"]
    everything = {module for module, _ in slicerbridge.RUNTIME_REQUIREMENTS}
    assert slicerbridge.missing_requirements(everything.__contains__, ["onnxruntime-gpu>=1.16"]) == [
        "onnxruntime-gpu>=1.16"]


def pyproject_list(key):
    """The strings of a one-level list in pyproject.toml ("dependencies", or an extra such as "cpu")."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    return re.findall(r'"([^"]+)"', re.search(rf"^{key} = \[(.*?)\]", text, re.S | re.M).group(1))


def distribution(requirement):
    return re.split(r"[<>=!~ ;\[]", requirement)[0]


def test_requirements_are_the_packages():
    """What the module installs into Slicer is what pyproject.toml requires, less what Slicer ships."""
    dependencies = pyproject_list("dependencies")
    installed = {requirement for _, requirement in slicerbridge.RUNTIME_REQUIREMENTS}
    assert installed <= set(dependencies)
    shipped = {distribution(r) for r in dependencies} - {distribution(r) for r in installed}
    assert shipped == set(slicerbridge.SLICER_PACKAGES)
    assert pyproject_list("gpu") == slicerbridge.onnxruntime_requirements((3, 12), "linux", "x86_64", True)
    # the `cpu` extra, platform by platform: test_runtimes.py


def test_pip_constraints_pin_the_versions_found():
    text = slicerbridge.pip_constraints({"numpy": "2.0.2", "SimpleITK": None, "scipy": "1.13.1"})
    assert text == "numpy==2.0.2\nscipy==1.13.1\n"
    assert slicerbridge.pip_constraints({}) == ""


# --- models ----------------------------------------------------------------------------------


def models_json(*rows):
    return json.dumps({"search_path": ["/a", "/b"], "models": list(rows)})


def test_model_choices_from_the_models_list():
    text = models_json(
        {"name": "shiva-cmb-swi", "version": "2.0", "modalities": ["swi"], "license": "CC-BY-NC-SA-4.0",
         "path": "/a/swi", "folds": 6, "description": "SHIVA-CMB SWI"},
        {"name": "broken", "path": "/a/broken", "error": "/a/broken/model.json: 'target' is missing"},
        {"name": "shiva-cmb-swi", "version": "1.0", "modalities": ["swi"], "license": "x", "path": "/b/swi"},
        {"name": "plain", "version": "1", "modalities": [], "license": "", "path": "/b/plain"},
        {"name": "two", "version": "1", "modalities": ["swi", "t2s"], "license": "Apache-2.0", "path": "/b/two",
         "threshold": 0.3})
    choices, problems = slicerbridge.model_choices(text)
    assert [c.label for c in choices] == ["shiva-cmb-swi (swi, CC-BY-NC-SA-4.0)", "plain", "two (swi/t2s, Apache-2.0)"]
    assert [c.value for c in choices] == ["shiva-cmb-swi", "plain", "two"]
    assert "/a/swi" in choices[0].tooltip and "CC-BY-NC-SA-4.0" in choices[0].tooltip
    assert [c.threshold for c in choices] == [0.5, 0.5, 0.3]  # a row without one: the descriptor default
    assert problems == ["/a/broken/model.json: 'target' is missing"]
    _, problems = slicerbridge.model_choices(models_json({"name": "odd", "path": "/c/odd", "error": "no folds"}))
    assert problems == ["/c/odd: no folds"]


@pytest.mark.parametrize("text", ["", "not json", "[]", json.dumps({"search_path": []})])
def test_model_choices_refuse_unexpected_output(text):
    with pytest.raises(ValueError, match="models list"):
        slicerbridge.model_choices(text)


def test_model_folder_choice(tmp_path):
    folder = blobmodel.write_model(tmp_path / "my model", name="blob")
    choice = slicerbridge.model_folder_choice(folder)
    assert choice == ModelChoice("blob (swi/t2s, Apache-2.0)", str(folder), choice.tooltip, 0.5)
    assert str(folder) in choice.tooltip
    strict = slicerbridge.model_folder_choice(blobmodel.write_model(tmp_path / "strict", name="strict",
                                                                    threshold=0.995))
    assert strict.threshold == 0.995 and "Threshold: 0.995" in strict.tooltip  # the panel's threshold follows it
    with pytest.raises(ValueError, match="model.json: missing"):
        slicerbridge.model_folder_choice(tmp_path)
    (tmp_path / "model.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        slicerbridge.model_folder_choice(tmp_path)
    wmh = blobmodel.write_model(tmp_path / "wmh", name="wmh", extra={"target": "WMH"})
    with pytest.raises(ValueError, match="not a cerebral microbleed"):
        slicerbridge.model_folder_choice(wmh)


def test_models_list_of_the_real_command(tmp_path):
    user_models = Path(os.environ["SHIVACMB_MODELS"])
    blobmodel.write_model(user_models / "blob", name="blob")
    (user_models / "broken").mkdir()
    (user_models / "broken" / "model.json").write_text("{}", encoding="utf-8")
    completed = slicerbridge.run_command(slicerbridge.models_list_command(sys.executable), cwd=str(MODULE_DIR),
                                         env=slicerbridge.child_environment(os.environ))
    assert completed.returncode == 0, completed.stderr
    choices, problems = slicerbridge.model_choices(completed.stdout)
    assert [c.value for c in choices] == ["blob", "shivacmb-demo-swi"]  # user models, then the embedded one
    assert len(problems) == 1 and "broken" in problems[0]
    # The module reads the same list in its own process, without starting the command.
    assert slicerbridge.installed_model_choices() == (choices, problems)


def test_pip_install_command():
    args = slicerbridge.pip_install_command("/s/PythonSlicer", "/t/c.txt", ["rich>=12", "onnxruntime>=1.16,<1.20"])
    assert args == ["/s/PythonSlicer", "-m", "pip", "install", "-c", "/t/c.txt", "rich>=12", "onnxruntime>=1.16,<1.20"]


# --- saving ----------------------------------------------------------------------------------


def test_save_folders(tmp_path):
    scan = tmp_path / "data" / "sub-01_swi.nii.gz"
    assert slicerbridge.default_save_parent(str(scan)) == str(tmp_path / "data")
    assert slicerbridge.default_save_parent(str(scan), "/chosen/before") == "/chosen/before"
    assert slicerbridge.default_save_parent(None) == ""
    assert slicerbridge.result_folder(tmp_path, "sub-01 SWI (2)") == tmp_path / "sub-01_SWI_2"
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "findings.tsv").write_text("x")
    assert slicerbridge.existing_results(folder, ["cmb.seg.nrrd", "findings.tsv"]) == ["findings.tsv"]
    assert slicerbridge.existing_results(tmp_path / "missing", ["findings.tsv"]) == []


# --- findings table --------------------------------------------------------------------------


def test_table_has_every_findings_column_once_with_its_type():
    names = [column.name for column in TABLE_COLUMNS]
    assert sorted(names) == sorted(findings.COLUMNS) and len(names) == len(set(names))
    # id, location, volume, max probability and status come first, the review columns beside the status
    assert names[:9] == ["cmb_id", "r", "a", "s", "volume_mm3", "max_prob", "status", "note", "rater"]
    kinds = {int: "int", float: "double", str: "string"}
    for column in TABLE_COLUMNS:
        value = getattr(finding(max_prob=0.9, mean_prob=0.8, fold_agreement=1.0), column.name)
        assert kinds[type(value)] == column.kind, column.name
        assert column.title
    assert [slicerbridge.column_index(name) for name in ("cmb_id", "r", "a", "s")] == [0, 1, 2, 3]
    with pytest.raises(KeyError):
        slicerbridge.column_index("nothing")


def test_finding_row_types_and_unknown_values():
    row = slicerbridge.finding_row(finding(3, note="checked", status="definite"))
    assert len(row) == len(TABLE_COLUMNS)
    assert row[:4] == [3, 1.5, -2.25, 3.0] and type(row[0]) is int and type(row[1]) is float
    cells = dict(zip((column.name for column in TABLE_COLUMNS), row))
    assert all(math.isnan(cells[name]) for name in ("max_prob", "mean_prob", "fold_agreement"))
    assert (cells["region"], cells["status"], cells["note"]) == ("n/a", "definite", "checked")


# --- the command's output --------------------------------------------------------------------

DONE = json.dumps({"stage": "done", "fraction": 1.0, "message": "3 CMBs found", "output": "/t/out/scan",
                   "cmb_count": 3, "provider": "CUDAExecutionProvider", "warnings": ["brain larger than the box"]})


def test_summary_line():
    assert slicerbridge.parse_summary_line(DONE) == RunSummary("/t/out/scan", 3, "CUDAExecutionProvider",
                                                               ["brain larger than the box"], "3 CMBs found")
    assert slicerbridge.parse_summary_line('{"stage": "write", "fraction": 0.9, "message": ""}') is None
    assert slicerbridge.parse_summary_line('{"stage": "done", "fraction": 1.0}') is None
    assert slicerbridge.parse_summary_line("3 CMBs found") is None


def test_result_text_names_count_provider_review_and_warnings():
    text = slicerbridge.result_text(slicerbridge.parse_summary_line(DONE))
    assert text.startswith("3 microbleeds found (network run on CUDAExecutionProvider).")
    assert "review" in text and text.endswith("Warning: brain larger than the box")
    one = slicerbridge.result_text(RunSummary("/o", 1, "CPUExecutionProvider"))
    assert one.startswith("1 microbleed found") and "Warning" not in one


def test_error_line():
    progress = '{"stage": "read", "fraction": 0.05, "message": "reading"}'
    assert slicerbridge.error_line([progress, "shivacmb: error: first", "noise",
                                    "shivacmb: error: /t/in.nrrd: 4D image", progress]) == "/t/in.nrrd: 4D image"
    assert slicerbridge.error_line(["Traceback (most recent call last):", "ImportError: no onnxruntime", "",
                                    progress]) == "ImportError: no onnxruntime"
    assert slicerbridge.error_line([progress, "  "]) == ""


def test_failure_message_speaks_of_the_users_nodes():
    lines = ["shivacmb: error: /tmp/S-1/input.nrrd: scan holds only NaN values"]
    message = slicerbridge.failure_message(2, lines, {"/tmp/S-1/input.nrrd": "scan 'SWI'"})
    assert message == "The scan or the brain mask could not be used.\n\nscan 'SWI': scan holds only NaN values"
    assert slicerbridge.failure_message(3, [], {}) == "The model could not be used."
    assert "exit code 7" in slicerbridge.failure_message(7, ["boom"], {})
    assert "signal 9" in slicerbridge.failure_message(-9, [], {})


def test_run_monitor():
    monitor = RunMonitor(keep=3)
    assert monitor.feed("warming up") is None
    assert monitor.feed('{"stage": "inference", "fraction": 0.5, "message": "fold 1"}') == {
        "stage": "inference", "fraction": 0.5, "message": "fold 1"}
    assert monitor.outcome(0, False) == "failed"
    assert "without reporting" in monitor.failure_message(0, {})
    monitor.feed(DONE)
    assert monitor.summary.cmb_count == 3
    assert monitor.outcome(0, False) == "done"
    assert monitor.outcome(0, True) == "cancelled"
    assert monitor.outcome(130, False) == "cancelled"
    assert monitor.outcome(4, False) == "failed"
    monitor.feed("shivacmb: error: out of memory")
    assert len(monitor.lines) == 3
    assert monitor.failure_message(4, {}) == "The segmentation failed.\n\nout of memory"


# --- background process ----------------------------------------------------------------------


def python_child(code, grace_s=10.0):
    return ChildProcess([sys.executable, "-c", code], env=slicerbridge.child_environment(os.environ),
                        grace_s=grace_s)


def read_until(process, text, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while text not in process.read_lines(timeout=0.1):
        assert time.monotonic() < deadline and not process.finished, f"the child never printed {text!r}"


def lines_until_finished(process, timeout_s=60.0):
    lines = []
    deadline = time.monotonic() + timeout_s
    while not process.finished:
        assert time.monotonic() < deadline, "the child did not finish"
        lines += process.read_lines(timeout=0.1)
    return lines


def test_child_output_is_merged_in_order_and_the_exit_code_kept():
    process = python_child("import sys\nprint('one', flush=True)\nprint('two é', file=sys.stderr, flush=True)\n"
                           "print('three')\nsys.exit(3)")
    assert process.returncode is None
    lines = []
    assert process.wait(lines.append) == 3
    assert lines == ["one", "two é", "three"]
    assert process.finished and process.returncode == 3 and not process.cancel_requested


def test_read_lines_does_not_wait_without_timeout():
    process = python_child("import time\ntime.sleep(1)\nprint('late')")
    started = time.monotonic()
    assert process.read_lines() == []
    assert time.monotonic() - started < 0.5
    assert lines_until_finished(process) == ["late"]


@POSIX_ONLY
def test_cancel_reaches_the_launchers_child():
    """PythonSlicer is a launcher: Cancel must stop the Python process it starts, not only the launcher."""
    grandchild = "import time\nprint('started', flush=True)\ntime.sleep(60)"
    launcher = f"import subprocess, sys\nsys.exit(subprocess.call([sys.executable, '-c', {grandchild!r}]))"
    process = python_child(launcher)
    read_until(process, "started")
    started = time.monotonic()
    process.cancel()
    lines_until_finished(process)
    assert time.monotonic() - started < 5  # the pipe closes only when the grandchild has gone too
    assert process.cancel_requested and process.returncode == -signal.SIGTERM


@POSIX_ONLY
def test_cancel_kills_a_child_that_ignores_sigterm():
    process = python_child("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                           "print('ready', flush=True)\ntime.sleep(60)", grace_s=0.3)
    read_until(process, "ready")
    process.cancel()
    process.cancel()  # a second Cancel changes nothing
    lines_until_finished(process, timeout_s=10)
    assert process.returncode == -signal.SIGKILL


@POSIX_ONLY
def test_cancel_of_a_group_of_zombies_is_no_error(monkeypatch):
    """macOS answers killpg with EPERM (PermissionError) when the group holds only zombies: it has exited."""
    process = python_child("import time\nprint('ready', flush=True)\ntime.sleep(60)")
    read_until(process, "ready")

    def zombies(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    with monkeypatch.context() as patch:
        patch.setattr(os, "killpg", zombies)
        process.cancel()
    assert process.cancel_requested
    os.killpg(process.pid, signal.SIGKILL)
    lines_until_finished(process)


def test_cancel_after_the_end_does_nothing():
    process = python_child("print('done')")
    lines_until_finished(process)
    process.cancel()
    assert not process.cancel_requested and process.returncode == 0


# --- the module's path through the real command ----------------------------------------------


def run_module_command(input_path, out_dir, settings, scan_id="scan"):
    """Run `segment` as SHIVACMBLogic does: module folder as working directory, lines through a RunMonitor."""
    args = slicerbridge.segment_command(sys.executable, str(input_path), str(out_dir), settings, scan_id)
    process = ChildProcess(args, cwd=str(MODULE_DIR), env=slicerbridge.child_environment(os.environ))
    monitor = RunMonitor()
    progress = []

    def on_line(line):
        record = monitor.feed(line)
        if record is not None:
            progress.append(record)

    returncode = process.wait(on_line)
    return process, monitor, returncode, progress


def test_segment_through_the_module_path(tmp_path, iso_scan, model_dir):
    settings = ScanSettings(model=str(model_dir), device="cpu", threshold=0.5, report=False)
    _, monitor, returncode, progress = run_module_command(iso_scan, tmp_path / "output", settings, "iso_scan")
    assert monitor.outcome(returncode, False) == "done", list(monitor.lines)
    fractions = [p["fraction"] for p in progress]
    assert fractions == sorted(fractions) and progress[-1]["stage"] == "done"
    assert monitor.summary.cmb_count == 6 and monitor.summary.provider == cpu_provider()
    result = Path(monitor.summary.output)
    assert result == tmp_path / "output" / "iso_scan"
    assert not (result / "report.html").exists()
    rows = [slicerbridge.finding_row(f) for f in read_tsv(result / "findings.tsv")]
    assert len(rows) == 6 and all(len(row) == len(TABLE_COLUMNS) for row in rows)
    assert (result / "cmb.seg.nrrd").is_file()


def test_failure_through_the_module_path(tmp_path, model_dir):
    scan = tmp_path / "input.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((8, 8, 8), np.nan, np.float32)), str(scan))
    out = tmp_path / "output"
    _, monitor, returncode, _ = run_module_command(scan, out, ScanSettings(model=str(model_dir), report=False))
    assert returncode == 2 and monitor.outcome(returncode, False) == "failed"
    message = monitor.failure_message(returncode, {str(scan): "scan 'Phantom'"})
    assert message.startswith("The scan or the brain mask could not be used.\n\nscan 'Phantom': ")
    assert str(tmp_path) not in message
    assert files_under(out) == []


@POSIX_ONLY
def test_cancel_through_a_launcher_leaves_no_output(tmp_path, iso_scan):
    slow = blobmodel.write_model(tmp_path / "slow", shape=(256, 256, 256), folds=12)
    out = tmp_path / "output"
    command = slicerbridge.segment_command(sys.executable, str(iso_scan), str(out), ScanSettings(model=str(slow)),
                                           "iso")
    launcher = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))", *command]
    process = ChildProcess(launcher, cwd=str(MODULE_DIR), env=slicerbridge.child_environment(os.environ),
                           grace_s=120)
    monitor = RunMonitor()
    deadline = time.monotonic() + 300
    while not process.finished:
        assert time.monotonic() < deadline, "the cancelled run did not end"
        for line in process.read_lines(timeout=0.1):
            if (monitor.feed(line) or {}).get("stage") == "inference":
                process.cancel()
    assert monitor.outcome(process.returncode, process.cancel_requested) == "cancelled"
    assert "shivacmb: error: cancelled" in monitor.lines
    assert files_under(out) == []


# --- static checks of the Slicer files -------------------------------------------------------


def module_tree():
    """The module's Slicer-side code (SHIVACMB.py and SHIVACMBSlicer/) as one syntax tree."""
    body = []
    for path in SLICER_FILES:
        body += ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body
    return ast.Module(body=body, type_ignores=[])


def ui_tree():
    return ET.parse(UI_FILE).getroot()


def ui_widgets():
    """objectName -> class of every widget of the .ui file."""
    return {w.get("name"): w.get("class") for w in ui_tree().iter("widget")}


def ui_bindings():
    """SlicerParameterName -> widget class."""
    bindings = {}
    for widget in ui_tree().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bindings[prop.findtext("string")] = widget.get("class")
    return bindings


def parameter_fields():
    """Field name -> annotation source of the @parameterNodeWrapper class, the scan settings it shows included."""
    from SHIVACMBLib.settings import gui_fields

    for node in ast.parse(MODULE_PY.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef) and any(ast.unparse(d) == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
            assert "withScanSettings" in {ast.unparse(d) for d in node.decorator_list}
            fields = {item.target.id: ast.unparse(item.annotation) for item in node.body
                      if isinstance(item, ast.AnnAssign)}
            kinds = {"choice": "Choice(", "range": "WithinRange(", "str": "str", "bool": "bool"}
            return {**fields, **{name: kinds[gui.kind] for name, gui, _ in gui_fields()}}
    raise AssertionError("no @parameterNodeWrapper class in SHIVACMB.py")


def test_module_compiles_and_is_python_39_syntax():
    for path in SLICER_FILES + sorted((MODULE_DIR / "SHIVACMBLib" / "slicerside").glob("*.py")):
        source = path.read_text(encoding="utf-8")
        compile(source, str(path), "exec")
        ast.parse(source, feature_version=(3, 9))


def test_module_files_are_rooms_of_one_job():
    """SHIVACMB.py is the thin entry; each section is a file of its own, none large."""
    assert len(MODULE_PY.read_text(encoding="utf-8").splitlines()) < 300
    for path in SECTIONS:
        assert len(path.read_text(encoding="utf-8").splitlines()) < 700, path.name
    init = ast.parse((MODULE_DIR / "SHIVACMBSlicer" / "__init__.py").read_text(encoding="utf-8"))
    submodules = next(ast.literal_eval(node.value) for node in init.body
                      if isinstance(node, ast.Assign) and node.targets[0].id == "SUBMODULES")
    assert sorted(f"{name}.py" for name in submodules) == sorted(
        p.name for p in SECTIONS if p.name != "__init__.py")


def test_every_ui_widget_the_module_uses_exists():
    used = {node.attr for node in ast.walk(module_tree())
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert used, "SHIVACMB.py uses no self.ui widget"
    assert used - set(ui_widgets()) == set()


def test_ui_bindings_name_parameters_with_widgets_that_can_show_them():
    fields = parameter_fields()
    bindings = ui_bindings()
    assert set(bindings) - set(fields) == set()
    # The model selector is filled from the installed models, so it is bound in code, not by connectGui;
    # the save folder is asked for when saving.
    assert set(fields) - set(bindings) == {"model", "saveFolder"}
    for name, widget_class in bindings.items():
        if widget_class == "QComboBox":
            assert "Choice(" in fields[name], f"{name}: a QComboBox binds only a Choice-annotated value"
        if widget_class == "ctkSliderWidget":
            assert "WithinRange(" in fields[name], f"{name}: a ctkSliderWidget needs a bounded value"
        if widget_class == "qMRMLNodeComboBox":
            assert fields[name].startswith(("vtkMRML", "Optional[vtkMRML")), name
        if widget_class == "QCheckBox":
            assert fields[name] == "bool", name
        if widget_class == "QLineEdit":
            assert fields[name] == "str", name


def test_ui_file_is_consistent():
    root = ui_tree()
    widgets = ui_widgets()
    top = root.find("widget")
    assert (top.get("class"), top.get("name"), root.findtext("class")) == ("qMRMLWidget", "SHIVACMB", "SHIVACMB")
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    custom = {cls for cls in widgets.values() if not cls.startswith("Q")}
    assert custom <= declared
    mrml_widgets = {name for name, cls in widgets.items() if cls in ("qMRMLNodeComboBox", "qMRMLTableView")}
    scene_receivers = {c.findtext("receiver") for c in root.iter("connection")
                       if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert scene_receivers == mrml_widgets
    for connection in root.iter("connection"):
        assert {connection.findtext("sender"), connection.findtext("receiver")} <= set(widgets)


STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def is_stdlib(top_level_name):
    if top_level_name in sys.builtin_module_names or top_level_name == "__future__":
        return True
    spec = importlib.util.find_spec(top_level_name)
    if spec is None or spec.origin is None:
        return False
    if spec.origin in ("built-in", "frozen"):
        return True
    origin = Path(spec.origin).resolve()
    return STDLIB in origin.parents and "site-packages" not in origin.parts


PACKAGES = {"SHIVACMBLib": MODULE_DIR / "SHIVACMBLib", "SHIVACMBSlicer": MODULE_DIR / "SHIVACMBSlicer"}


def module_path(name):
    """The file of a dotted SHIVACMBLib or SHIVACMBSlicer module (a package's __init__.py); None otherwise."""
    top, *rest = name.split(".")
    if top not in PACKAGES:
        return None
    base = PACKAGES[top].joinpath(*rest)
    for candidate in (base.parent / f"{base.name}.py", base / "__init__.py"):
        if rest and candidate.is_file() or not rest and candidate.name == "__init__.py":
            return candidate
    return None


def dotted(path):
    parts = list(path.relative_to(MODULE_DIR).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path):
    """Dotted names of the modules a file imports outside functions (relative imports resolved)."""
    package = dotted(path) if path.name == "__init__.py" else dotted(path).rpartition(".")[0]
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        for sub in [node] + (list(ast.walk(node)) if isinstance(node, (ast.If, ast.Try)) else []):
            if isinstance(sub, ast.Import):
                names |= {alias.name for alias in sub.names}
            elif isinstance(sub, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - sub.level + 1] if sub.level else []
                module = ".".join(base + ([sub.module] if sub.module else []))
                names.add(module)
                # `from SHIVACMBLib.slicerside import slicerbridge` imports a module, not only a name
                names |= {f"{module}.{alias.name}" for alias in sub.names if module_path(f"{module}.{alias.name}")}
    return names


def third_party_imports(path, seen):
    """Non-standard packages importing ``path`` loads at module level, following the project's own imports
    (``seen``: the project modules followed)."""
    found = set()
    for name in module_level_imports(path):
        parts = name.split(".")
        if parts[0] in PACKAGES:
            for depth in range(1, len(parts) + 1):  # a.b.c runs a/__init__.py, a/b/__init__.py, a/b/c.py
                module = ".".join(parts[:depth])
                if module not in seen and module_path(module) is not None:
                    seen.add(module)
                    found |= third_party_imports(module_path(module), seen)
        elif not is_stdlib(parts[0]):
            found.add(parts[0])
    return found


def test_module_imports_no_third_party_package_but_numpy_at_module_level():
    """A failing top-level import would stop Slicer from loading the module at all."""
    followed = set()
    assert third_party_imports(MODULE_PY, followed) <= {"numpy", "slicer", "qt", "ctk", "vtk"}
    assert {"SHIVACMBLib.slicerside.slicerbridge", "SHIVACMBLib.findings", "SHIVACMBLib.progress",
            "SHIVACMBLib.modelstore.models", "SHIVACMBLib.resources", "SHIVACMBLib.settings",
            "SHIVACMBSlicer.segment", "SHIVACMBSlicer.rating"} <= followed
    assert third_party_imports(PACKAGES["SHIVACMBLib"] / "pipeline.py", set()) >= {"numpy", "SimpleITK", "scipy"}


def test_the_core_never_imports_slicer():
    for path in PACKAGES["SHIVACMBLib"].rglob("*.py"):
        imported = {name.split(".")[0] for name in module_level_imports(path)}
        source = path.read_text(encoding="utf-8")
        assert not imported & {"slicer", "qt", "ctk", "vtk"}, path
        assert not re.search(r"^\s*(import|from) (slicer|qt|ctk|vtk)\b", source, re.M), path


def annotations(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.returns
        if isinstance(node, ast.arg):
            yield node.annotation
        if isinstance(node, ast.AnnAssign):
            yield node.annotation


def uses_union_operator(annotation):
    if annotation is None:
        return False
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        annotation = ast.parse(annotation.value, mode="eval")
    return any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(annotation))


def test_no_union_operator_in_annotations():
    """parameterNodeWrapper evaluates annotations, and `X | None` fails on Python 3.9 (Slicer 5.8)."""
    for path in SLICER_FILES + sorted((MODULE_DIR / "SHIVACMBLib" / "slicerside").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert not [ast.unparse(a) for a in annotations(tree) if uses_union_operator(a)], path


# --- CMake and resources ---------------------------------------------------------------------


def cmake_list(variable):
    text = CMAKE.read_text(encoding="utf-8")
    body = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S).group(1)
    return [entry.replace("${MODULE_NAME}", "SHIVACMB") for entry in body.split()]


def test_cmake_lists_every_script_and_each_listed_file_exists():
    scripts = cmake_list("MODULE_PYTHON_SCRIPTS")
    on_disk = sorted(str(p.relative_to(MODULE_DIR).as_posix()) for p in MODULE_DIR.rglob("*.py")
                     if "__pycache__" not in p.parts)
    assert sorted(scripts) == on_disk
    library = [s for s in scripts if s.startswith("SHIVACMBLib/")]
    assert library == sorted(library)
    for entry in scripts + cmake_list("MODULE_PYTHON_RESOURCES"):
        assert (MODULE_DIR / entry).is_file(), entry


def test_cmake_minimum_is_that_of_slicer_510_templates():
    """Slicer 5.10's extension templates ask for CMake 3.20.6...3.22.6 (3.16.3 predates them)."""
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"^cmake_minimum_required\(VERSION 3\.20\.6\.\.\.3\.22\.6\)$", top, re.M)


def test_icon_is_a_128_pixel_rgba_png():
    data = ICON.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height, depth, colour_type = struct.unpack(">IIBB", data[16:26])
    assert (width, height, depth, colour_type) == (128, 128, 8, 6)


def test_rating_shortcuts_are_distinct_and_leave_the_slice_view_keys_alone():
    from SHIVACMBLib.slicerside import ratingview

    keys = [key.lower() for key in ratingview.SHORTCUTS.values()]
    assert len(set(keys)) == len(keys)
    slice_view_keys = set("bfvrgt[]{}") | {"left", "right", "up", "down"}  # SLICER_NOTES.md, section 9
    assert not set(keys) & slice_view_keys
    setup = next(node for node in ast.walk(module_tree())
                 if isinstance(node, ast.FunctionDef) and node.name == "_setupRating")
    dicts = [node for node in ast.walk(setup) if isinstance(node, ast.Dict)]
    assert all({ast.literal_eval(k) for k in d.keys} == set(ratingview.SHORTCUTS) for d in dicts) and len(dicts) == 2


# --- compare with baseline ---------------------------------------------------------------------


def test_compare_command_is_what_the_cli_parses():
    from SHIVACMBLib.slicerside import compareview

    settings = ScanSettings(model="shiva-cmb-swi", device="cpu", threshold=0.4, precision="fp16", location=False,
                            report=False)
    args = compareview.compare_command("/slicer/PythonSlicer", "/t/b.nrrd", "/t/f.nrrd", "/t/out", settings,
                                       baseline_findings="/t/b.tsv")
    assert args[:3] == ["/slicer/PythonSlicer", "-m", "SHIVACMBLib.cli"]
    parsed = cli.build_parser().parse_args(args[3:])
    assert (parsed.command, parsed.baseline, parsed.followup, parsed.out) == ("compare", "/t/b.nrrd", "/t/f.nrrd",
                                                                              "/t/out")
    assert (parsed.baseline_findings, parsed.followup_findings) == ("/t/b.tsv", None)
    assert (parsed.model, parsed.device, parsed.threshold, parsed.progress) == ("shiva-cmb-swi", "cpu", 0.4, "json")
    assert settings_from_args(parsed) == settings  # --precision and --no-location reach `compare` too


def test_compare_summary_line_and_result_text():
    from SHIVACMBLib.slicerside import compareview

    line = json.dumps({"stage": "done", "fraction": 1.0, "message": "m", "output": "/t/out", "grade": "moderate",
                       "counts": {"new": 5, "persistent": 2, "not seen at follow-up": 0}})
    summary = compareview.parse_summary_line(line)
    assert summary.counts["new"] == 5 and summary.grade == "moderate"
    text = compareview.result_text(summary)
    assert text.startswith("5 new, 2 persistent. ARIA-H microhemorrhage grade from the new CMBs: moderate.")
    assert "radiologist" in text
    assert compareview.parse_summary_line('{"stage": "done", "fraction": 1.0, "output": "x"}') is None
    monitor = slicerbridge.RunMonitor(parse=compareview.parse_summary_line)
    monitor.feed(line)
    assert monitor.outcome(0, False) == "done" and monitor.summary == summary


def test_followup_is_put_on_the_baseline_by_the_registration_matrix():
    import SimpleITK as sitk

    from SHIVACMBLib.slicerside import compareview

    from SHIVACMBLib import longitudinal

    transform = sitk.Euler3DTransform((10.0, -5.0, 2.0), 0.1, -0.2, 0.15, (3.0, -8.0, 12.0))
    registration = longitudinal.Registration(transform, "rigid", -0.6, 0.98, 1.0)
    matrix = compareview.followup_to_baseline_ras({"registration": registration.summary()})
    followup_ras = np.array([[12.0, -30.0, 7.5], [-40.0, 22.0, -3.0]])
    expected = registration.to_baseline_ras(followup_ras)
    assert np.allclose(followup_ras @ matrix[:3, :3].T + matrix[:3, 3], expected, atol=1e-4)
