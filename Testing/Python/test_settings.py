"""One settings object for a scan (SHIVACMBLib.settings): adding an option is one edit there.

The test copies SHIVACMBLib, makes that one edit (a new field of ScanSettings with its
command-line and parameter-node wording) and checks, in a fresh interpreter, that the new option
reaches `segment`, the batch resume fingerprint, `compare` and the Slicer module's parameter node
and command line, with nothing else changed.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from helpers import REPO
from SHIVACMBLib import cli
from SHIVACMBLib.cohort.batch import BatchSettings
from SHIVACMBLib.pipeline import SegmentOptions
from SHIVACMBLib.settings import ScanSettings, scan_fields, settings_from_args

LIB = REPO / "SHIVACMB" / "SHIVACMBLib"
DUMMY_FIELD = '''    dummy_level: float = setting(0.0, Option(
        "--dummy-level", "a dummy option of the settings test", "L", volume, gui=Gui("range", 2.0, (0.0, 10.0))))
'''

CHECKS = '''
import sys
from pathlib import Path

import SHIVACMBLib
assert Path(SHIVACMBLib.__file__).parent == Path(sys.argv[1]), SHIVACMBLib.__file__
from SHIVACMBLib import cli, longitudinal, pipeline
from SHIVACMBLib.cohort import batch
from SHIVACMBLib.modelstore.blobmodel import write_model
from SHIVACMBLib.modelstore.models import load_model
from SHIVACMBLib.slicerside import slicerbridge

work = Path(sys.argv[2])
seen = {}
pipeline.segment = lambda input_path, out, options, progress=None: seen.setdefault("segment", options) and exit(0)
longitudinal.compare = lambda baseline, followup, out, options, progress=None: seen.setdefault("compare", options)
try:
    cli.main(["segment", "scan.nii.gz", "--dummy-level", "3", "--progress", "none"])
except SystemExit:
    pass
cli.main(["compare", "a.nii.gz", "b.nii.gz", "--out", "o", "--dummy-level", "4", "--progress", "none"])
assert seen["segment"].dummy_level == 3.0, seen
assert seen["compare"].detection.dummy_level == 4.0, seen

(work / "scan.nii.gz").write_bytes(b"not read, only checksummed")
model = load_model(str(write_model(work / "model")))
job = batch.Job("s", work / "scan.nii.gz")
parsed = cli.build_parser().parse_args(["batch", "in", "--out", "o", "--dummy-level", "5"])
settings = cli.settings_from_args(parsed, batch.BatchSettings)
assert batch.fingerprint(job, model, settings)["dummy_level"] == 5.0
assert batch.fingerprint(job, model, settings) != batch.fingerprint(job, model, batch.BatchSettings())

import slicer_standins
module = slicer_standins.load_module(slicer_standins.Patch())
node = module.SHIVACMBParameterNode
assert node.__annotations__["dummy_level"].__metadata__ == ((0.0, 10.0),) and node.dummy_level == 2.0
node.model, node.device, node.threshold = "", "cpu", 0.4
from SHIVACMBSlicer.parameters import scanSettings
args = slicerbridge.segment_command("py", "in.nrrd", "out", scanSettings(node, report=False), "scan")
assert args[args.index("--dummy-level") + 1] == "2.0", args
print("the dummy option reached segment, batch, compare and the parameter node")
'''


def test_a_new_option_is_one_edit(tmp_path):
    copy = tmp_path / "SHIVACMBLib"
    shutil.copytree(LIB, copy, ignore=shutil.ignore_patterns("__pycache__"))
    settings = copy / "settings.py"
    text = settings.read_text(encoding="utf-8")
    anchor = "\n    def __post_init__(self) -> None:"
    assert text.count(anchor) == 1
    settings.write_text(text.replace(anchor, "\n" + DUMMY_FIELD + anchor), encoding="utf-8")
    script = tmp_path / "checks.py"
    script.write_text(textwrap.dedent(CHECKS), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO / "Testing" / "Python")]))
    done = subprocess.run([sys.executable, str(script), str(copy), str(tmp_path)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "reached segment, batch, compare and the parameter node" in done.stdout


def test_every_front_end_takes_every_scan_setting():
    parser = cli.build_parser()
    names = [item.name for item in scan_fields()]
    for command in (["segment", "x"], ["batch", "x", "--out", "o"], ["compare", "a", "b", "--out", "o"]):
        parsed = parser.parse_args(command + ["--precision", "fp16", "--no-location", "--min-volume", "2",
                                              "--save-probability"])
        assert {name: getattr(parsed, name) for name in names} == dict(
            ScanSettings(precision="fp16", location=False, min_volume_mm3=2.0, save_probability=True).values())
    assert isinstance(settings_from_args(parser.parse_args(["segment", "x"]), SegmentOptions, scan_id="s"),
                      ScanSettings)


def test_what_decides_reuse():
    """The device does not change a result; every other scan setting does (batch resume fingerprint)."""
    reuse = set(ScanSettings().reuse_values())
    assert reuse == {item.name for item in scan_fields()} - {"device"}
    assert set(BatchSettings(threads=3, retry_failed=True).reuse_values()) == reuse


@pytest.mark.parametrize("args, message", [(["--threshold", "1.5"], "must be between 0 and 1, not 1.5"),
                                           (["--min-volume", "-1"], "must be >= 0, not -1"),
                                           (["--device", "gpu"], "invalid choice: 'gpu'")])
def test_the_command_refuses_bad_settings_in_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["segment", "x"] + args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
