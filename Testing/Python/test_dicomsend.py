"""Sending DICOM results to a real DICOM server: an Orthanc (Debian `orthanc`, `orthanc-dicomweb`) started here on
loopback ports receives them by DICOMweb STOW-RS and by DIMSE C-STORE, from `shivacmb send`, `batch --send` and the
Slicer module's Save results; its REST API finds both objects and what they reference; a rerun sends nothing twice;
an unreachable server is one line, exit 4, and the local results stay as they were."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import types
from pathlib import Path

import pytest

import phantoms
import slicer_standins as standins
from dicom_objects import missing, tool
from helpers import SMALL_FOV, files_under, run_cli
from SHIVACMBLib.dicomsend import PASSWORD_ENV, SENT_NAME, dimse_address, parse_destination
from SHIVACMBLib.errors import InputError, RuntimeFailure
from SHIVACMBLib.files import checksum
from SHIVACMBLib.pipeline import SegmentOptions, segment

requests = pytest.importorskip("requests")

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD, AET = "shiva", "cmb-secret", "ORTHANC"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """One Orthanc process on loopback ports, its storage in a temporary folder, and its REST API."""

    def __init__(self, folder: Path):
        plugin = DICOMWEB_PLUGIN
        if not plugin.is_file():
            missing(f"the DICOMweb plugin of Orthanc ({plugin})")
        self.http, self.dicom = free_port(), free_port()
        config = {"Name": "shivacmb-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
                  "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": AET, "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}, "Plugins": [str(plugin)],
                  "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "StorageCompression": False}
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = folder / "orthanc.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([tool("Orthanc"), str(folder / "orthanc.json")], stdout=log,
                                            stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.http}"
        for _ in range(150):
            try:
                if requests.get(f"{self.url}/system", auth=(USER, PASSWORD), timeout=2).ok:
                    return
            except requests.exceptions.ConnectionError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        pytest.fail("Orthanc did not start: " + self.log.read_text(errors="replace")[-2000:])

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def dimse(self) -> str:
        return f"127.0.0.1:{self.dicom}:{AET}"

    def rest(self, method: str, path: str, **kwargs):
        answer = requests.request(method, f"{self.url}{path}", auth=(USER, PASSWORD), timeout=30, **kwargs)
        answer.raise_for_status()
        return answer.json() if answer.content else None

    def find(self, sop_instance_uid: str) -> list:
        query = {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}
        return self.rest("POST", "/tools/find", json=query)

    def tags(self, sop_instance_uid: str) -> dict:
        (orthanc_id,) = self.find(sop_instance_uid)
        return self.rest("GET", f"/instances/{orthanc_id}/tags?simplify")

    def delete(self, sop_instance_uid: str) -> None:
        for orthanc_id in self.find(sop_instance_uid):
            self.rest("DELETE", f"/instances/{orthanc_id}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dicom_result(tmp_path_factory, scene, model_dir, orthanc):
    """A DICOM phantom series (uploaded to the server, as the scanner would) and its `segment` result."""
    folder = tmp_path_factory.mktemp("send")
    grid = phantoms.grid_around((1.3, -2.1, 0.7), SMALL_FOV, (1.0, 1.0, 2.0))
    series = phantoms.write_dicom_series(phantoms.render(scene, grid, seed=3), folder / "swi",
                                         "1.2.826.0.1.3680043.2.1125.31")
    for path in sorted(series.iterdir()):
        orthanc.rest("POST", "/instances", data=path.read_bytes())
    result = segment(series, folder / "out", SegmentOptions(model=str(model_dir), report=False, location=False))
    return series, result.output_dir


def uids(result: Path) -> dict:
    return {name: record["sop_instance_uid"] for name, record in
            json.loads((result / "run.json").read_text())["results"]["dicom"]["objects"].items()}


def test_dicomweb_then_dimse_deliver_both_objects_and_a_rerun_sends_nothing_twice(orthanc, dicom_result):
    series, result = dicom_result
    seg_uid, sr_uid = uids(result)["cmb.seg.dcm"], uids(result)["cmb.sr.dcm"]
    done = run_cli(["send", result.parent, "--dicomweb", orthanc.dicomweb + "/", "--user", USER],
                   env={PASSWORD_ENV: PASSWORD})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{result.parent}{os.sep}: 2 DICOM object(s) sent to dicomweb {orthanc.dicomweb}"

    seg, sr = orthanc.tags(seg_uid), orthanc.tags(sr_uid)
    source_uids = {orthanc.tags(i["ReferencedSOPInstanceUID"])["SOPInstanceUID"]
                   for i in seg["ReferencedSeriesSequence"][0]["ReferencedInstanceSequence"]}
    assert len(source_uids) == len(list(series.iterdir()))  # every source instance is on the server
    assert seg["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == "1.2.826.0.1.3680043.2.1125.31"
    assert seg["Modality"] == "SEG" and sr["Modality"] == "SR"
    assert seg["StudyInstanceUID"] == sr["StudyInstanceUID"] == "1.2.826.0.1.3680043.2.1125.31.0"
    evidence = {i["ReferencedSOPInstanceUID"]  # highdicom 0.22 (Python 3.9) lists the images as other evidence
                for key in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence")
                for study in sr.get(key, []) for s in study["ReferencedSeriesSequence"]
                for i in s["ReferencedSOPSequence"]}
    assert evidence == source_uids | {seg_uid} and all(orthanc.find(uid) for uid in evidence)
    study = orthanc.find(seg_uid) and orthanc.rest("POST", "/tools/find", json={
        "Level": "Study", "Query": {"StudyInstanceUID": seg["StudyInstanceUID"]}})
    assert len(orthanc.rest("GET", f"/studies/{study[0]}")["Series"]) == 3  # the scan, its SEG, its SR

    for name, destination in (("dicomweb", orthanc.dicomweb), ("dimse", orthanc.dimse)):
        if name == "dimse":  # a new destination receives both
            done = run_cli(["send", result, "--dimse", destination])
            assert done.returncode == 0, done.stderr
            assert "2 DICOM object(s) sent to dimse" in done.stdout and orthanc.find(seg_uid) and orthanc.find(sr_uid)
        orthanc.delete(seg_uid)
        orthanc.delete(sr_uid)
        option = ["--dicomweb", destination, "--user", USER] if name == "dicomweb" else ["--dimse", destination]
        again = run_cli(["send", result, *option], env={PASSWORD_ENV: PASSWORD})
        assert again.returncode == 0, again.stderr
        assert "0 DICOM object(s) sent" in again.stdout and "2 sent there before, not sent again" in again.stdout
        assert orthanc.find(seg_uid) == [] and orthanc.find(sr_uid) == []  # not sent again
    sent = json.loads((result / SENT_NAME).read_text())["sent"]
    assert sorted((item["file"], item["destination"].split()[0]) for item in sent) == [
        ("cmb.seg.dcm", "dicomweb"), ("cmb.seg.dcm", "dimse"), ("cmb.sr.dcm", "dicomweb"), ("cmb.sr.dcm", "dimse")]


@pytest.mark.parametrize("how", ["dicomweb-refused", "dimse-refused", "dicomweb-wrong-password"])
def test_an_unreachable_or_refusing_server_is_one_line_exit_4_and_the_results_stay(orthanc, dicom_result, how):
    _, result = dicom_result
    before = {name: checksum([result / name]) for name in files_under(result)}
    closed = free_port()
    args = {"dicomweb-refused": ["--dicomweb", f"http://127.0.0.1:{closed}/dicom-web"],
            "dimse-refused": ["--dimse", f"127.0.0.1:{closed}:{AET}"],
            # another service root of the same server: a destination the record does not know yet
            "dicomweb-wrong-password": ["--dicomweb", orthanc.dicomweb + "-other", "--user", USER]}[how]
    done = run_cli(["send", result, *args], env={PASSWORD_ENV: "wrong"})
    assert done.returncode == RuntimeFailure.exit_code, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    expected = {"dicomweb-refused": "connection refused", "dimse-refused": "cannot open a DICOM association",
                "dicomweb-wrong-password": "HTTP 401"}[how]
    assert len(lines) == 1 and expected in lines[0], lines
    assert {name: checksum([result / name]) for name in files_under(result)} == before


def test_an_object_sent_but_not_recorded_is_one_line(tmp_path, dicom_result, monkeypatch):
    """The server took it, the record cannot be written (a read-only result folder): exit 4, saying so."""
    import shutil

    from SHIVACMBLib import dicomsend

    copy = tmp_path / "result"
    shutil.copytree(dicom_result[1], copy)
    (copy / SENT_NAME).unlink(missing_ok=True)
    (copy / SENT_NAME).mkdir()  # cannot be replaced by a file
    monkeypatch.setattr(dicomsend, "_stow", lambda destination: lambda path, dataset: None)
    with pytest.raises(RuntimeFailure, match="sent to dicomweb https://pacs.example/dicom-web, but dicom_sent.json "
                                             "cannot be written beside it"):
        dicomsend.send_results(copy, parse_destination("https://pacs.example/dicom-web"))


def test_a_folder_without_dicom_results_and_bad_destinations_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    done = run_cli(["send", tmp_path / "empty", "--dimse", "127.0.0.1:104:PACS"])
    assert done.returncode == InputError.exit_code and "holds no DICOM results" in done.stderr
    for bad in ("pacs:port:AET", "pacs:104:" + "A" * 17, "pacs"):
        with pytest.raises(InputError, match="neither a DICOMweb URL"):
            dimse_address(bad)
    done = run_cli(["send", tmp_path, "--dicomweb", "ftp://pacs/dicom-web"])
    assert done.returncode == InputError.exit_code and "give an http:// or https:// URL" in done.stderr
    done = run_cli(["send", tmp_path, "--dimse", "https://pacs/dicom-web"])
    assert done.returncode == InputError.exit_code and "nor a DIMSE peer HOST:PORT:AET" in done.stderr
    where = parse_destination("https://ann@pacs.example:8443/dicom-web/", environ={PASSWORD_ENV: "pw"})
    assert (where.url, where.user, where.password, where.key) == (
        "https://pacs.example:8443/dicom-web", "ann", "pw", "dicomweb https://pacs.example:8443/dicom-web")
    assert "pw" not in repr(where) and parse_destination("::1:11112:PACS").key == "dimse PACS@::1:11112"
    with pytest.raises(InputError, match="SHIVACMB_DICOMWEB_PASSWORD"):
        parse_destination("https://ann:secret@pacs.example/dicom-web")


def test_batch_send_delivers_every_scan(tmp_path, orthanc, scene, model_dir):
    pytest.importorskip("distributed")
    for index in range(2):
        grid = phantoms.grid_around((0.5 * index, -2.1, 0.7), SMALL_FOV, (1.0, 1.0, 2.0))
        phantoms.write_dicom_series(phantoms.render(scene, grid, seed=10 + index), tmp_path / "in" / f"scan{index}",
                                    f"1.2.826.0.1.3680043.2.1125.4{index}")
    out = tmp_path / "out"
    command = ["batch", tmp_path / "in", "--out", out, "--model", model_dir, "--no-location", "--no-report",
               "--workers", "1", "--threads", "1", "--progress", "none", "--send", orthanc.dimse]
    done = run_cli(command)
    assert done.returncode == 0, done.stderr
    assert "4 DICOM object(s) sent to dimse" in done.stdout
    for index in range(2):
        for uid in uids(out / f"scan{index}").values():
            assert orthanc.find(uid), uid
    again = run_cli(command)
    assert again.returncode == 0 and "0 DICOM object(s) sent" in again.stdout and "4 sent there before" in again.stdout


def test_slicer_save_results_sends_the_dicom_results(tmp_path, orthanc, monkeypatch):
    """Save results with "Send to" set: written beside the others, sent, and the status line says so."""
    from test_slicer_adapter import dicom_volume

    module = standins.load_module(monkeypatch)
    logic, table, _, volume, _ = dicom_volume(tmp_path, module)
    widget = module.SHIVACMBWidget()
    widget.logic, widget._observedTable = logic, table
    widget.ui = types.SimpleNamespace(statusLabel=types.SimpleNamespace(text=""))
    widget._parameterNode = types.SimpleNamespace(rater="ann", sendTo=orthanc.dimse)
    saved = widget.saveResultsTo(str(tmp_path / "saved"))
    folder = tmp_path / "saved" / "SWI_scan"
    assert saved.files[-2:] == ["cmb.seg.dcm", "cmb.sr.dcm"] and (folder / "cmb.sr.dcm").is_file()
    assert widget.ui.statusLabel.text.endswith(f"2 DICOM object(s) sent to dimse {AET}@127.0.0.1:{orthanc.dicom}.")
    for record in json.loads((folder / SENT_NAME).read_text())["sent"]:
        assert orthanc.find(record["sop_instance_uid"])

    widget._parameterNode.sendTo = f"127.0.0.1:{free_port()}:{AET}"  # unreachable: saved, not sent, one error
    with pytest.raises(RuntimeFailure):
        widget.saveResultsTo(str(tmp_path / "saved"))
    assert module.errors[-1].startswith("The results were saved, but not sent.")
    assert "Saved in" in widget.ui.statusLabel.text and (folder / "cmb.seg.dcm").is_file()
