"""`shivacmb batch`: discovery of folder/BIDS/CSV cohorts, runs on a local dask cluster, resume, failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import SimpleITK as sitk

import phantoms
from helpers import REPO, SMALL_FOV, files_under, match, run_cli
from SHIVACMBLib import inference
from SHIVACMBLib.cohort import batch
from SHIVACMBLib.cohort.batch import BatchSettings, ClusterSettings, Job, discover, run_batch
from SHIVACMBLib.errors import InputError
from SHIVACMBLib.findings import read_tsv
from SHIVACMBLib.scan import scan_id_from_path

pytest.importorskip("distributed")

NO_LOCATION = BatchSettings(location=False)


def _scan(path: Path, seed: int, spacing=(1.0, 1.0, 1.0)) -> Path:
    grid = phantoms.grid_around((0.5 * seed, -2.1, 0.7), SMALL_FOV, spacing)
    return phantoms.write(phantoms.render(phantoms.default_scene(), grid, seed=seed, supersample=2), path)


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory) -> Path:
    """Six small phantom scans (1 mm and 1x1x1.5 mm) in sub-folders, and one corrupt file."""
    root = tmp_path_factory.mktemp("cohort")
    for index in range(6):
        _scan(root / f"site{index % 2}" / f"scan{index}.nii.gz", index, (1, 1, 1.5 if index % 2 else 1))
    (root / "site0" / "broken.nii.gz").write_bytes(b"not an image")
    return root


@pytest.fixture
def settings(model_dir) -> BatchSettings:
    return BatchSettings(model=str(model_dir), location=False)


def _log(out: Path) -> List[Dict]:
    return [json.loads(line) for line in (out / batch.LOG_NAME).read_text().splitlines() if line.strip()]


def _results(out: Path, scan_ids) -> Dict[str, tuple]:
    """Per scan: findings.tsv text and the label array (what must not change between runs)."""
    return {s: ((out / s / "findings.tsv").read_text(),
                sitk.GetArrayFromImage(sitk.ReadImage(str(out / s / "cmb_labels.nii.gz"))).tobytes())
            for s in scan_ids}


# --- discovery ------------------------------------------------------------------------------


def test_folder_discovery_names_scans_and_tells_equal_names_apart(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "swi.nii.gz").write_bytes(b"x")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.nii.gz").write_bytes(b"x")
    cohort = discover(tmp_path)
    assert [j.scan_id for j in cohort.jobs] == ["a_swi", "b_swi"] and not cohort.bids
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no scans found"):
        discover(tmp_path / "empty")
    with pytest.raises(InputError, match="no such file"):
        discover(tmp_path / "missing")


def test_csv_discovery_reads_ids_images_masks_relative_to_the_list(tmp_path):
    listing = tmp_path / "lists" / "cohort.csv"
    listing.parent.mkdir()
    listing.write_text("scan_id,image,mask,parcellation\nP01,../scans/p01.nii.gz,/abs/mask.nii.gz,\n"
                       "P02,p02.nrrd,,\n")
    jobs = discover(listing).jobs
    assert jobs[0] == Job("P01", listing.parent / "../scans/p01.nii.gz", Path("/abs/mask.nii.gz"), None)
    assert jobs[1].image == listing.parent / "p02.nrrd" and jobs[1].mask is None
    listing.write_text("scan_id,image,dicom_source\nP01,p01.nii.gz,dicom/p01\n")
    assert discover(listing).jobs[0].dicom_source == listing.parent / "dicom" / "p01"
    for text, problem in (("id,path\nA,a.nii\n", "header"), ("scan_id,image\nA,a.nii\nA,b.nii\n", "twice"),
                          ("scan_id,image\n../up,a.nii\n", "cannot name a file or folder"), ("scan_id,image\nA,\n", "both")):
        listing.write_text(text)
        with pytest.raises(InputError, match=problem):
            discover(listing)


def _bids(root: Path) -> Path:
    (root / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    for name in ("sub-01/ses-1/anat/sub-01_ses-1_swi.nii.gz", "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
                 "sub-01/ses-1/anat/sub-01_ses-1_part-phase_swi.nii.gz", "sub-01/ses-2/anat/sub-01_ses-2_swi.nii.gz",
                 "sub-02/anat/sub-02_acq-3d_T2starw.nii.gz", "derivatives/x/sub-01/anat/sub-01_swi.nii.gz"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    return root


def test_bids_discovery_picks_cmb_contrasts_magnitude_only_and_filters(tmp_path):
    root = _bids(tmp_path / "bids")
    cohort = discover(root)
    assert cohort.bids
    assert [(j.scan_id, j.folder, j.prefix) for j in cohort.jobs] == [
        ("sub-01_ses-1_swi", "sub-01/ses-1/anat", "sub-01_ses-1_desc-cmb_"),
        ("sub-01_ses-2_swi", "sub-01/ses-2/anat", "sub-01_ses-2_desc-cmb_"),
        ("sub-02_acq-3d_T2starw", "sub-02/anat", "sub-02_acq-3d_desc-cmb_")]
    assert [j.scan_id for j in discover(root, ["ses=2"]).jobs] == ["sub-01_ses-2_swi"]
    assert [j.scan_id for j in discover(root, ["suffix=T2starw,GRE"]).jobs] == ["sub-02_acq-3d_T2starw"]
    assert len(discover(root, ["part=phase"]).jobs) == 1
    with pytest.raises(InputError, match="ENTITY=VALUE"):
        discover(root, ["ses"])
    with pytest.raises(InputError, match="matches the --bids-filter"):
        discover(root, ["sub=99"])
    (root / "sub-02/anat/sub-02_acq-3d_GRE.nii.gz").write_bytes(b"x")
    with pytest.raises(InputError, match="share output names.*suffix=swi"):
        discover(root)


def test_bids_names_of_the_outputs():
    job = Job("sub-01_swi", Path("x"), folder="sub-01/anat", prefix="sub-01_desc-cmb_")
    assert [job.output_name(n) for n in ("cmb_labels.nii.gz", "cmb_labels.nrrd", "cmb.seg.nrrd",
                                         "cmb_probability.nii.gz", "findings.tsv", "run.json", "report.html")] == [
        "sub-01_desc-cmb_dseg.nii.gz", "sub-01_desc-cmb_dseg.nrrd", "sub-01_desc-cmb_dseg.seg.nrrd",
        "sub-01_desc-cmb_probseg.nii.gz", "sub-01_desc-cmb_findings.tsv", "sub-01_desc-cmb_run.json",
        "sub-01_desc-cmb_report.html"]
    assert Job("a", Path("x")).output(Path("/o"), "run.json") == Path("/o/a/run.json")


def test_worker_plan_one_worker_per_gpu_else_cores_and_memory():
    envs, threads = batch.worker_plan(16, 2)
    assert envs == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}] and threads == 8
    assert batch.worker_plan(16, 0, memory_gib=128) == ([{}] * 16, 1)
    assert batch.worker_plan(16, 0, memory_gib=10) == ([{}] * 2, 8)  # 4 GiB per worker
    assert batch.worker_plan(2, 0, workers=2, memory_gib=64) == ([{}, {}], 1)
    assert batch.worker_plan(1, 0, memory_gib=1) == ([{}], 1)
    # OpenVINO's networks use a second core well: a worker per two cores, each network on both
    assert batch.worker_plan(16, 0, memory_gib=128, cores_per_worker=2) == ([{}] * 8, 2)
    assert batch.worker_plan(2, 0, memory_gib=64, cores_per_worker=2) == ([{}], 2)
    assert batch.worker_plan(1, 0, memory_gib=64, cores_per_worker=2) == ([{}], 1)


def test_cores_per_worker_follow_the_cpu_runtime(monkeypatch):
    ort = inference.onnxruntime_module()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [inference.OPENVINO, inference.CPU])
    assert batch.cpu_cores_per_worker() == 2
    monkeypatch.setattr(ort, "get_available_providers", lambda: [inference.CPU])
    assert batch.cpu_cores_per_worker() == 1


# --- runs -----------------------------------------------------------------------------------


def test_batch_on_two_workers_runs_every_scan_records_the_corrupt_one_and_resumes(tmp_path, cohort_dir, settings):
    out = tmp_path / "out"
    cohort = discover(cohort_dir)
    seen = []
    result = run_batch(cohort, out, settings, ClusterSettings(workers=2), progress=seen.append)
    assert (result.done, result.skipped) == (6, 0)
    assert [s for s, _ in result.failed] == ["broken"] and "broken.nii.gz: cannot read image" in result.failed[0][1]
    assert [p["remaining"] for p in seen] == list(range(6, -1, -1))
    assert len({entry["worker"] for entry in _log(out) if entry["status"] == "done"}) == 2
    scan_ids = [f"scan{i}" for i in range(6)]
    for scan_id in scan_ids:  # each scan's outputs, the planted CMBs where they were put
        run = json.loads((out / scan_id / "run.json").read_text())
        found = read_tsv(out / scan_id / "findings.tsv")
        assert run["batch"]["fingerprint"]["inputs"]["image"] == run["input"]["sha256"]
        assert np.all(match([f.ras for f in found], phantoms.default_scene().centres) < 1.5)
    assert not (out / "broken").exists()
    summary = (out / batch.SUMMARY_NAME).read_text().splitlines()
    assert summary[0].split("\t") == list(batch.SUMMARY_COLUMNS) and len(summary) == 8
    rows = {line.split("\t")[0]: dict(zip(batch.SUMMARY_COLUMNS, line.split("\t"))) for line in summary[1:]}
    assert rows["broken"]["status"] == "failed" and "cannot read image" in rows["broken"]["error"]
    assert rows["scan3"]["status"] == "done" and rows["scan3"]["cmb_count"] == "6"
    assert rows["scan3"]["report"] == "scan3/report.html"
    cohort_findings = (out / batch.FINDINGS_TABLE).read_text().splitlines()
    assert len(cohort_findings) == 1 + 36
    scan3 = [line.split("\t", 1)[1] for line in cohort_findings if line.startswith("scan3\t")]
    assert scan3 == (out / "scan3" / "findings.tsv").read_text().splitlines()[1:]  # the same cells as findings.tsv
    before = _results(out, scan_ids)

    again = run_batch(cohort, out, settings, ClusterSettings(workers=1))
    assert (again.done, again.skipped, [s for s, _ in again.failed]) == (0, 6, ["broken"])
    assert _results(out, scan_ids) == before
    assert sum(1 for e in _log(out) if e["status"] == "done") == 6

    changed = run_batch(cohort, out, BatchSettings(model=settings.model, location=False, threshold=0.6,
                                                   retry_failed=True), ClusterSettings(workers=1))
    assert changed.done == 6 and [s for s, _ in changed.failed] == ["broken"]  # new settings: all rerun
    broken = [e for e in _log(out) if e["scan_id"] == "broken"]
    assert [e.get("previous", False) for e in broken] == [False, True, False]  # recorded, kept, retried


def test_bids_input_gives_a_bids_derivatives_dataset(tmp_path, settings):
    root = tmp_path / "bids"
    (root / "sub-01" / "ses-1" / "anat").mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    _scan(root / "sub-01/ses-1/anat/sub-01_ses-1_swi.nii.gz", 1)
    _scan(root / "sub-02/anat/sub-02_T2starw.nii.gz", 2)
    out = tmp_path / "derivatives" / "shivacmb"
    result = run_batch(discover(root), out, settings, ClusterSettings(workers=1))
    assert result.done == 2 and result.ok
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "shivacmb"
    anat = out / "sub-01" / "ses-1" / "anat"
    assert sorted(p.name for p in anat.iterdir()) == [
        f"sub-01_ses-1_desc-cmb_{n}" for n in ("dseg.nii.gz", "dseg.seg.nrrd", "findings.tsv", "report.html",
                                                "run.json")]
    assert len(read_tsv(anat / "sub-01_ses-1_desc-cmb_findings.tsv")) == 6
    assert (out / "sub-02/anat/sub-02_desc-cmb_run.json").is_file()
    assert files_under(out / batch.STATE_DIR / "bids") == []
    rows = (out / batch.SUMMARY_NAME).read_text().splitlines()[1:]
    reports = [dict(zip(batch.SUMMARY_COLUMNS, r.split("\t")))["report"] for r in rows]
    assert reports == ["sub-01/ses-1/anat/sub-01_ses-1_desc-cmb_report.html", "sub-02/anat/sub-02_desc-cmb_report.html"]
    assert all((out / r).is_file() for r in reports)
    assert run_batch(discover(root), out, settings, ClusterSettings(workers=1)).skipped == 2


def test_a_lost_worker_makes_a_failed_scan(tmp_path):
    class Lost:
        def result(self):
            raise RuntimeError("KilledWorker: worker-1 died")

    outcome = batch._outcome(Lost(), Job("s1", tmp_path / "s1.nii.gz"), tmp_path, "run-1")
    assert outcome["status"] == "failed" and "worker lost" in outcome["error"]
    assert batch.read_failure(tmp_path, Job("s1", tmp_path / "s1.nii.gz"))["error"] == outcome["error"]


def test_killed_batch_leaves_whole_results_and_a_rerun_finishes_each_scan_once(tmp_path, cohort_dir, model_dir):
    """SIGTERM in the middle of a 2-worker batch; the rerun does the rest; results equal an uninterrupted run."""
    scans = tmp_path / "scans"  # 12 scans and the corrupt one: 4 run at a time, so the kill lands mid-batch
    shutil.copytree(cohort_dir, scans)
    for path in sorted(scans.rglob("scan*.nii.gz")):
        shutil.copy(path, path.with_name(path.name.replace("scan", "copy")))
    ids = sorted(scan_id_from_path(p) for p in scans.rglob("*.nii.gz") if p.name != "broken.nii.gz")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "SHIVACMBLib.cli", "batch", str(scans), "--out", str(out), "--model",
               str(model_dir), "--no-location", "--workers", "2", "--threads", "1", "--progress", "json"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    done_lines = 0
    for line in process.stdout:  # the first finished scan: the batch is under way, most scans are not done
        if '"status": "done"' in line:
            done_lines += 1
            break
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert done_lines == 1
    first_runs = {}
    for folder in (p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        run = json.loads((folder / "run.json").read_text())  # a visible scan folder is a whole result
        assert all((folder / name).is_file() for name in run["results"]["files"])
        first_runs[folder.name] = run["batch"]["run_id"]
    assert 1 <= len(first_runs) < len(ids), first_runs
    assert not (out / batch.SUMMARY_NAME).exists()  # cohort tables only once every scan is processed
    logged = len(_log(out))

    rerun = run_cli(command[3:-2] + ["--progress", "none"])
    assert rerun.returncode == 1 and "failed: broken" in rerun.stdout, rerun.stderr
    second = {e["scan_id"]: e["status"] for e in _log(out)[logged:]}
    assert sorted(second) == sorted(ids + ["broken"])
    for scan_id in ids:  # every scan done exactly once over both runs
        run_id = json.loads((out / scan_id / "run.json").read_text())["batch"]["run_id"]
        if scan_id in first_runs:
            assert second[scan_id] == "skipped" and run_id == first_runs[scan_id]
        else:
            assert second[scan_id] == "done" and run_id not in first_runs.values()
    assert [p for p in files_under(out) if Path(p).name.startswith(".") and Path(p).name != batch.STATE_DIR
            and not p.startswith(batch.STATE_DIR)] == []
    reference = tmp_path / "reference"
    run_batch(discover(scans), reference, BatchSettings(model=str(model_dir), location=False, threads=1),
              ClusterSettings(workers=1))
    assert _results(out, ids) == _results(reference, ids)


def test_batch_command_refuses_an_input_without_scans(tmp_path):
    (tmp_path / "empty").mkdir()
    done = run_cli(["batch", tmp_path / "empty", "--out", tmp_path / "out"])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"shivacmb: error: {tmp_path / 'empty'}: no scans found "
                                                "(image files or DICOM folders)"]
    assert not (tmp_path / "out").exists()


def test_one_scan_at_a_time_goes_through_the_network_while_others_prepare(model_dir, monkeypatch):
    """A worker runs two scans at once; the ensemble lets one of them through the folds at a time."""
    import threading

    from SHIVACMBLib.inference import FoldEnsemble
    from SHIVACMBLib.modelstore.models import load_model

    ensemble = FoldEnsemble(load_model(str(model_dir)), "cpu")
    inside, most = [0], [0]
    real = ensemble._run_all

    def counted(feed, progress):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.2)
        try:
            return real(feed, progress)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(ensemble, "_run_all", counted)
    volume = np.zeros(ensemble.model.shape[::-1], np.float32)
    threads = [threading.Thread(target=ensemble.predict, args=(volume,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1


def test_a_worker_reuses_its_sessions_and_their_memory_for_every_scan(tmp_path, cohort_dir, settings, monkeypatch):
    """`process` as a worker runs it: scan after scan through one ensemble whose CPU sessions keep their memory."""
    from SHIVACMBLib import inference

    ort = inference.onnxruntime_module()
    available = ort.get_available_providers()  # onnxruntime's own CPU kernels, as installed by the `cpu` extra
    monkeypatch.setattr(ort, "get_available_providers", lambda: [p for p in available if p != inference.OPENVINO])
    inference.clear_ensembles()
    jobs = [job for job in discover(cohort_dir).jobs if "broken" not in str(job.image)][:2]
    outcomes = [batch.process(job, str(tmp_path), settings, "run-1") for job in jobs]
    assert [o["status"] for o in outcomes] == ["done", "done"], outcomes
    ensembles = list(inference._ENSEMBLES.values())
    assert len(ensembles) == 1 and ensembles[0].keep_memory
    assert all(s.get_session_options().enable_cpu_mem_arena for s in ensembles[0].sessions)
    inference.clear_ensembles()


def test_results_depend_on_the_extent_threshold_only_for_a_model_that_has_one(model_dir, tmp_path):
    from SHIVACMBLib.modelstore.models import read_descriptor

    plain = read_descriptor(model_dir)
    assert "extent_threshold" not in BatchSettings().result_settings(plain)  # older fingerprints stay valid
    descriptor = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    descriptor.update(threshold=0.9, extent_threshold=0.5)
    (tmp_path / "model.json").write_text(json.dumps(descriptor), encoding="utf-8")
    shutil.copy(model_dir / descriptor["folds"][0]["file"], tmp_path)
    hysteresis = read_descriptor(tmp_path)
    assert BatchSettings().result_settings(hysteresis)["extent_threshold"] == 0.5
    assert BatchSettings(threshold=0.3).result_settings(hysteresis)["extent_threshold"] == 0.3  # never above it
    descriptor.update(extent_threshold=0.4)
    (tmp_path / "model.json").write_text(json.dumps(descriptor), encoding="utf-8")
    assert BatchSettings().result_settings(read_descriptor(tmp_path))["extent_threshold"] == 0.4  # a new one: rerun


def test_batch_bar_counts_scans():
    from SHIVACMBLib.progress import BatchBar

    with BatchBar(3) as bar:
        bar({"total": 3, "done": 1, "skipped": 0, "failed": 1, "remaining": 1})
        task = bar._progress.tasks[0]
        assert task.completed == 2 and task.fields["counts"] == "done 1, already done 0, failed 1, remaining 1"
