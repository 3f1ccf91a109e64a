"""Reduced CPU precisions, proven before they are used: the int8 copy (static quantization calibrated on boxes), the
record of `models verify --precision`, what `segment` then runs, and what a run says the CPU could use."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from SHIVACMBLib import cli, inference
from SHIVACMBLib.files import checksum
from SHIVACMBLib.inference import CPU, FoldEnsemble
from SHIVACMBLib.modelstore import parity, precisions, quantize
from SHIVACMBLib.modelstore.models import read_descriptor
from SHIVACMBLib.modelstore.parity import Detections, parity_input
from SHIVACMBLib.slicerside import slicerbridge
from helpers import SMALL_BOX


needs_openvino = pytest.mark.skipif(inference.OPENVINO not in ort.get_available_providers(),
                                    reason="int8 runs through OpenVINO (onnxruntime-openvino: the `cpu` extra, x86-64)")


@pytest.fixture
def calibrated_on_the_test_scan(monkeypatch, iso_scan):
    """The int8 copy calibrated on the test scan's box instead of the (slow to make) calibration phantoms."""
    monkeypatch.setattr(quantize, "calibration_boxes", lambda model, n=1: iter([parity_input(model, iso_scan)]))


@pytest.fixture
def vnni_cpu(monkeypatch):
    """A CPU with int8 units, whatever this one has."""
    monkeypatch.setattr(precisions, "fast_precisions", lambda: {"int8": "AVX-512 VNNI"})


def test_int8_copy_is_static_qdq_with_fp32_heads(tmp_path, model_dir, iso_scan):
    model = read_descriptor(model_dir)
    out = tmp_path / "int8.onnx"
    quantize.quantize_int8(model, out, [parity_input(model, iso_scan)], say=lambda line: None)
    graph = onnx.load(str(out)).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [1, *SMALL_BOX, 1]  # static: OpenVINO
    producers = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    quantized = [n for n in convs if getattr(producers.get(n.input[1]), "op_type", "") == "DequantizeLinear"]
    assert 0 < len(quantized) < len(convs)  # the separable box filter in int8, each head's last convolutions fp32
    assert producers[graph.output[0].name].op_type != "DequantizeLinear"  # the probability is not rounded to 8 bits
    assert not [p for p in tmp_path.iterdir() if p.name != "int8.onnx"]  # written atomically, nothing left over


@needs_openvino
def test_int8_runs_only_after_a_passing_check_here(tmp_path, model_dir, iso_scan, calibrated_on_the_test_scan,
                                                     capsys):
    model = read_descriptor(model_dir)
    before = FoldEnsemble(model, "cpu", precision="int8")
    assert before.running_precision == "fp32" and before.summary()["precision"] == "fp32"
    assert any("has not been checked" in w and f"models verify {model.name} --precision int8" in w
               for w in before.warnings)

    assert cli.main(["models", "verify", str(model_dir), "--precision", "int8", "--device", "cpu",
                     "--scan", str(iso_scan)]) == 0
    out = capsys.readouterr().out
    assert "int8: quantizing" in out and ": ok  max abs diff" in out
    assert "the same detections in 1 of 1 scan(s)" in out and "now uses it on this computer" in out
    provider = before.provider
    assert provider == inference.OPENVINO
    record = precisions.read_record(model, "int8", provider)
    assert record["passed"] and record["int8_sha256"] and record["scans"][0]["scan"] == str(iso_scan)

    after = FoldEnsemble(model, "cpu", precision="int8")
    assert after.running_precision == "int8" and after.provider == provider and not after.warnings
    assert len(after.sessions) == 1  # the copy holds every fold
    mean, _ = after.predict(parity_input(model, iso_scan))
    exact, _ = FoldEnsemble(model, "cpu").predict(parity_input(model, iso_scan))
    assert parity.compare(exact, mean, model.threshold, parity.REDUCED_TOLERANCE, detections=True).passed

    own = FoldEnsemble(model, "cpu", precision="int8", providers=[CPU])  # onnxruntime's own int8 kernels are slow
    assert own.running_precision == "fp32" and any("runs on CPUs through OpenVINO" in w for w in own.warnings)
    assert precisions.read_record(model, "int8", CPU) is None  # a check holds for its provider only
    precisions.int8_file(model).write_bytes(b"changed")  # a copy changed since its check is not the one checked
    assert FoldEnsemble(model, "cpu", precision="int8").running_precision == "fp32"


@needs_openvino
def test_a_failed_check_keeps_fp32_and_is_not_offered(model_dir, iso_scan, calibrated_on_the_test_scan, vnni_cpu,
                                                      monkeypatch):
    model = read_descriptor(model_dir)
    monkeypatch.setattr(parity, "compare_detections", lambda a, b, threshold: Detections(6, 7, 6, 0.0))
    results = precisions.verify_precision(model, "cpu", "int8", iso_scan, say=lambda line: None)
    assert [r.passed for r in results] == [False]
    runner = FoldEnsemble(model, "cpu", precision="int8")
    assert runner.running_precision == "fp32"
    assert any("found other CMBs than fp32" in w and "the same detections in 0 of 1 scan(s)" in w
               for w in runner.warnings)
    plain = FoldEnsemble(model, "cpu")
    assert plain.summary()["faster_precisions"] == {"int8": {"unit": "AVX-512 VNNI", "status": "differs"}}
    assert precisions.hint(model.name, plain.summary()["faster_precisions"]) == ""


@needs_openvino
def test_a_run_says_what_this_cpu_could_use(tmp_path, model_dir, iso_scan, vnni_cpu, capsys):
    """The command's last JSON line (what the Slicer module reads) and its text output name the faster precision
    and how to check it; once checked, that it is verified and how much faster it was."""
    args = ["segment", str(iso_scan), "--model", str(model_dir), "--device", "cpu", "--no-report", "--out"]
    assert cli.main(args + [str(tmp_path / "a"), "--progress", "json"]) == 0
    done = capsys.readouterr().out.strip().splitlines()[-1]
    summary = slicerbridge.parse_summary_line(done)
    assert summary.precision == "fp32" and summary.cmb_count == 6
    assert f"`shivacmb models verify {model_dir} --precision int8`" in summary.hint and "(AVX-512 VNNI)" in summary.hint
    assert "Faster: this CPU computes int8 fast" in slicerbridge.result_text(summary)
    run = json.loads((tmp_path / "a" / "iso" / "run.json").read_text())
    assert run["inference"]["faster_precisions"] == {"int8": {"unit": "AVX-512 VNNI", "status": "not verified"}}

    model = read_descriptor(model_dir)
    record = precisions.record_file(model, "int8", FoldEnsemble(model, "cpu").provider)
    record.parent.mkdir(parents=True)
    precisions.int8_file(model).write_bytes(b"int8")
    record.write_text(json.dumps({"passed": True, "speedup": 2.5, "int8_sha256": checksum(
        [precisions.int8_file(model)])}))
    assert cli.main(args + [str(tmp_path / "b"), "--progress", "none"]) == 0
    assert ("note: --precision int8 (2.5x the fp32 network's speed, the same detections) is verified for this model "
            "here") in capsys.readouterr().out


def test_bf16_waits_for_its_check_too(model_dir):
    runner = FoldEnsemble(read_descriptor(model_dir), "cpu", precision="bf16")
    assert runner.running_precision == "fp32"
    if inference.OPENVINO in ort.get_available_providers() and inference.cpu_has_bf16():
        assert any("--precision bf16 has not been checked" in w for w in runner.warnings)
    else:
        assert any("bf16" in w and "fp32" in w for w in runner.warnings)


def test_a_model_whose_folds_cannot_share_a_graph_is_refused_for_int8(tmp_path, iso_scan):
    from SHIVACMBLib.errors import ModelError
    from SHIVACMBLib.modelstore import blobmodel

    folder = blobmodel.write_model(tmp_path / "m", shape=SMALL_BOX, folds=2)
    proto = onnx.load(str(folder / "fold1.onnx"))
    proto.opset_import[0].version = 18  # the same graph under another opset: one session per fold, no shared graph
    (folder / "fold1.onnx").write_bytes(proto.SerializeToString())
    data = json.loads((folder / "model.json").read_text())
    data["folds"][1]["sha256"] = checksum([folder / "fold1.onnx"])
    (folder / "model.json").write_text(json.dumps(data))
    model = read_descriptor(folder)
    with pytest.raises(ModelError, match="differ in their inputs or ONNX versions"):
        quantize.quantize_int8(model, tmp_path / "int8.onnx", [parity_input(model, iso_scan)], say=lambda line: None)
    assert not (tmp_path / "int8.onnx").exists()
    runner = FoldEnsemble(model, "cpu")  # fp32 still runs: one session per fold
    assert len(runner.sessions) == 2 and np.isfinite(runner.predict(parity_input(model, iso_scan))[0]).all()
