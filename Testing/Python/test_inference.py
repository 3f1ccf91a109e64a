"""onnxruntime sessions: layouts, activations, the fold ensemble, providers and CPU fallback."""

import json
import signal
import threading

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from SHIVACMBLib.modelstore import blobmodel
from SHIVACMBLib import inference
from SHIVACMBLib.errors import ModelError, RuntimeFailure
from SHIVACMBLib.files import checksum
from SHIVACMBLib.inference import CPU, CUDA, TENSORRT, FoldEnsemble, get_ensemble, provider_plan
from SHIVACMBLib.modelstore.models import read_descriptor

SHAPE = (24, 28, 20)


@pytest.fixture(scope="module")
def volume():
    """A normalised box with two dark blobs, indexed [z, y, x]."""
    z, y, x = np.indices(tuple(reversed(SHAPE)))
    v = np.full(z.shape, 0.6, np.float32) + np.random.default_rng(0).normal(0, 0.02, z.shape).astype(np.float32)
    for cz, cy, cx in ((10, 14, 12), (6, 8, 18)):
        v[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= 6] = 0.08
    return v


@pytest.fixture
def own_cpu_kernels(monkeypatch):
    """onnxruntime's own CPU provider only, as in an environment without onnxruntime-openvino."""
    available = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: [p for p in available if p != inference.OPENVINO])


def ensemble(tmp_path, **kwargs):
    return FoldEnsemble(read_descriptor(blobmodel.write_model(tmp_path / "m", shape=SHAPE, **kwargs)), "cpu")


@pytest.mark.parametrize("layout", ["NDHWC", "NCDHW"])
@pytest.mark.parametrize("activation", ["none", "sigmoid", "softmax"])
def test_every_layout_and_activation_gives_the_same_probability(tmp_path, volume, layout, activation):
    reference, _ = ensemble(tmp_path / "ref").predict(volume)
    prob, folds = ensemble(tmp_path / "v", layout=layout, activation=activation).predict(volume)
    assert prob.shape == volume.shape and prob.dtype == np.float32 and folds == []
    assert np.allclose(prob, reference, atol=1e-4)
    assert prob[10, 14, 12] > 0.9 and prob[0, 0, 0] < 0.5


def test_fixed_spatial_axes_matching_the_descriptor_run(tmp_path, volume):
    prob, _ = ensemble(tmp_path, spatial_fixed=True).predict(volume)
    assert prob[6, 8, 18] > 0.9


def test_ensemble_is_the_mean_of_floored_folds(tmp_path, volume):
    runner = ensemble(tmp_path, folds=3)
    mean, folds = runner.predict(volume)
    assert len(folds) == 3
    feed = {"image": np.ascontiguousarray(volume.transpose(2, 1, 0)[None, ..., None])}
    own = []
    for fold in runner.model.folds:
        p = ort.InferenceSession(str(fold.path), providers=[CPU]).run(None, feed)[0][0, ..., 0].transpose(2, 1, 0)
        p[p < 0.001] = 0
        own.append(p)
    assert np.allclose(mean, np.mean(own, axis=0), atol=1e-6)
    assert all(np.allclose(f, o, atol=1e-6) for f, o in zip(folds, own))
    assert not any(np.any((f > 0) & (f < 0.001)) for f in folds)  # the floor applies per fold


def test_provider_plan():
    assert provider_plan("cpu", [CUDA, CPU]) == ([CPU], [])
    assert provider_plan("auto", [CPU]) == ([CPU], [])
    assert provider_plan("auto", ["CoreMLExecutionProvider", CUDA, CPU]) == \
        ([CUDA, "CoreMLExecutionProvider", CPU], [])
    plan, notes = provider_plan("cuda", [CPU])
    assert plan == [CPU] and "no CUDA provider" in notes[0]
    assert provider_plan("tensorrt", [TENSORRT, CUDA, CPU]) == ([TENSORRT, CUDA, CPU], [])
    plan, notes = provider_plan("tensorrt", [CUDA, CPU])
    assert plan == [CUDA, CPU] and "no TensorRT provider" in notes[0]
    with pytest.raises(ValueError):
        provider_plan("tpu", [CPU])
    openvino = inference.OPENVINO  # onnxruntime-openvino: Intel's CPU kernels before onnxruntime's own
    assert provider_plan("cpu", [openvino, CPU]) == ([openvino, CPU], [])
    assert provider_plan("auto", [CUDA, openvino, CPU]) == ([CUDA, openvino, CPU], [])
    assert provider_plan("cuda", [CUDA, openvino, CPU]) == ([CUDA, CPU], [])


def test_openvino_runs_fp32_with_the_session_threads_and_falls_back_to_cpu(tmp_path, volume, monkeypatch):
    assert inference.provider_options(inference.OPENVINO, "fp16", 3) == {
        "device_type": "CPU", "precision": "FP32", "num_of_threads": "3"}
    bf16 = inference.provider_options(inference.OPENVINO, "bf16", 2)
    assert "precision" not in bf16 and bf16["num_of_threads"] == "2"
    assert json.loads(bf16["load_config"]) == {"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}}
    monkeypatch.setattr(ort, "get_available_providers", lambda: [inference.OPENVINO, CPU])
    real = inference.create_session

    def create(path, providers, threads, precision="fp32", keep_memory=False):
        if providers[0] == inference.OPENVINO:
            raise RuntimeError("Exception from src/inference/src/core.cpp: no CPU plugin")
        return real(path, providers, threads)

    monkeypatch.setattr(inference, "create_session", create)
    runner = FoldEnsemble(read_descriptor(blobmodel.write_model(tmp_path / "m", shape=SHAPE)), "cpu")
    assert runner.requested == [inference.OPENVINO, CPU] and runner.provider == CPU
    assert any("no CPU plugin" in w and "running on CPU" in w for w in runner.warnings)
    assert runner.predict(volume)[0][10, 14, 12] > 0.9


def pretend_gpu(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])


def test_real_onnxruntime_without_cuda_falls_back_with_a_warning(tmp_path, volume, monkeypatch):
    """CUDA is offered but this onnxruntime cannot use it: the session runs on CPU and says why."""
    pretend_gpu(monkeypatch)
    model = read_descriptor(blobmodel.write_model(tmp_path / "m", shape=SHAPE))
    runner = FoldEnsemble(model, "auto")
    assert runner.requested == [CUDA, CPU]
    assert runner.provider == CPU
    assert any(CUDA in w and "running on CPU" in w for w in runner.warnings)
    assert runner.predict(volume)[0][10, 14, 12] > 0.9


def test_gpu_session_that_fails_to_start_falls_back(tmp_path, volume, monkeypatch):
    pretend_gpu(monkeypatch)
    real = inference.create_session

    def create(path, providers, threads, precision="fp32", keep_memory=False):
        if providers[0] == CUDA:
            raise RuntimeError("CUDA driver version is insufficient")
        return real(path, providers, threads)

    monkeypatch.setattr(inference, "create_session", create)
    runner = FoldEnsemble(read_descriptor(blobmodel.write_model(tmp_path / "m", shape=SHAPE)), "cuda")
    assert runner.provider == CPU
    assert any("driver version is insufficient" in w for w in runner.warnings)


class FailingGpuSession:
    """Looks like a CUDA session, fails in run() like a GPU out of memory."""

    def __init__(self, real):
        self.real = real

    def get_providers(self):
        return [CUDA, CPU]

    def get_inputs(self):
        return self.real.get_inputs()

    def get_outputs(self):
        return self.real.get_outputs()

    def run(self, *args, **kwargs):
        raise RuntimeError("CUDA failure 2: out of memory")


def test_gpu_running_out_of_memory_reruns_on_cpu(tmp_path, volume, monkeypatch):
    pretend_gpu(monkeypatch)
    real = inference.create_session

    def create(path, providers, threads, precision="fp32", keep_memory=False):
        session = real(path, [CPU], threads)
        return FailingGpuSession(session) if providers[0] == CUDA else session

    monkeypatch.setattr(inference, "create_session", create)
    monkeypatch.setattr(inference, "io_binding_device", lambda provider: None)  # the stand-in has no IO binding
    runner = FoldEnsemble(read_descriptor(blobmodel.write_model(tmp_path / "m", shape=SHAPE, folds=2)), "auto")
    assert runner.provider == CUDA
    prob, folds = runner.predict(volume)
    assert runner.provider == CPU and len(folds) == 2
    assert any("out of memory" in w and "running on CPU" in w for w in runner.warnings)
    expected, _ = FoldEnsemble(runner.model, "cpu").predict(volume)
    assert np.allclose(prob, expected)


def test_io_binding_gives_what_a_plain_run_gives(tmp_path, volume, monkeypatch):
    """The GPU path (input bound once, shared by every fold) exercised on the CPU device."""
    model = read_descriptor(blobmodel.write_model(tmp_path / "m", shape=SHAPE, folds=2))
    plain, plain_folds = FoldEnsemble(model, "cpu").predict(volume)
    monkeypatch.setattr(inference, "io_binding_device", lambda provider: "cpu")
    bound, bound_folds = FoldEnsemble(model, "cpu").predict(volume)
    assert np.array_equal(plain, bound) and all(np.array_equal(a, b) for a, b in zip(plain_folds, bound_folds))


def test_fp16_on_cpu_runs_fp32_and_says_so(tmp_path, volume):
    runner = FoldEnsemble(read_descriptor(blobmodel.write_model(tmp_path / "m", shape=SHAPE)), "cpu", precision="fp16")
    assert runner.running_precision == "fp32" and runner.summary()["precision"] == "fp32"
    assert any("fp16 is for NVIDIA GPUs" in w for w in runner.warnings)


def test_bf16_without_openvino_runs_fp32_and_says_so(tmp_path, volume, own_cpu_kernels):
    model = read_descriptor(blobmodel.write_model(tmp_path / "m", shape=SHAPE))
    runner = FoldEnsemble(model, "cpu", precision="bf16", unverified=True)
    assert runner.provider == CPU and runner.summary()["precision"] == "fp32"
    assert any("bf16 runs on CPUs through OpenVINO" in w and "onnxruntime-openvino" in w for w in runner.warnings)


class OpenVinoStandIn:
    """An onnxruntime CPU session that reports OpenVINO, for the bf16 bookkeeping without the real provider."""

    def __init__(self, session):
        self.session = session

    def get_providers(self):
        return [inference.OPENVINO, CPU]

    def __getattr__(self, name):
        return getattr(self.session, name)


@pytest.mark.parametrize("has_bf16", [True, False])
def test_bf16_on_openvino_is_asked_for_and_reported_where_the_cpu_has_it(tmp_path, volume, monkeypatch, has_bf16):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [inference.OPENVINO, CPU])
    monkeypatch.setattr(inference, "cpu_has_bf16", lambda: has_bf16)
    asked = []
    real = inference.create_session

    def create(path, providers, threads, precision="fp32", keep_memory=False):
        asked.append((providers[0], precision))
        return OpenVinoStandIn(real(path, [CPU], threads))

    monkeypatch.setattr(inference, "create_session", create)
    runner = FoldEnsemble(read_descriptor(blobmodel.write_model(tmp_path / "m", shape=SHAPE)), "cpu", precision="bf16",
                          unverified=True)
    assert asked == [(inference.OPENVINO, "bf16" if has_bf16 else "fp32")]
    assert runner.summary()["precision"] == ("bf16" if has_bf16 else "fp32")
    assert any("no bfloat16 instructions" in w for w in runner.warnings) != has_bf16
    assert runner.predict(volume)[0][10, 14, 12] > 0.9


def test_providers_given_replace_the_device_plan(tmp_path, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [inference.OPENVINO, CPU])
    runner = FoldEnsemble(read_descriptor(blobmodel.write_model(tmp_path / "m", shape=SHAPE)), "cpu", providers=[CPU])
    assert runner.requested == [CPU] and runner.provider == CPU


@pytest.mark.openvino
def test_real_openvino_bf16_keeps_the_detections_of_fp32(tmp_path, volume):
    if inference.OPENVINO not in ort.get_available_providers():
        pytest.skip("onnxruntime-openvino is not installed (extra `openvino`)")
    from SHIVACMBLib.modelstore.parity import REDUCED_TOLERANCE, compare

    model = read_descriptor(blobmodel.write_model(tmp_path / "m", shape=SHAPE))
    full = FoldEnsemble(model, "cpu")
    reduced = FoldEnsemble(model, "cpu", precision="bf16", unverified=True)
    assert full.provider == reduced.provider == inference.OPENVINO and full.running_precision == "fp32"
    assert reduced.running_precision == ("bf16" if inference.cpu_has_bf16() else "fp32")
    own = FoldEnsemble(model, "cpu", providers=[CPU]).predict(volume)[0]
    assert np.abs(full.predict(volume)[0] - own).max() < 1e-5
    parity = compare(own, reduced.predict(volume)[0], model.threshold, REDUCED_TOLERANCE, detections=True)
    assert parity.passed and parity.detections.reference == 2, parity.text()


def test_fp16_copy_of_a_fold_computes_what_fp32_computes(tmp_path, volume):
    """The CUDA fp16 copy, run here on CPU: same probabilities within fp16 rounding."""
    model = read_descriptor(blobmodel.write_model(tmp_path / "m", shape=SHAPE))
    session = inference.create_session(inference.fp16_model(model.folds[0].path), [CPU], 1)
    feed = inference.model_layout(volume, model.layout)
    half = inference.to_probability(session.run(None, {session.get_inputs()[0].name: feed})[0], model)
    full, _ = FoldEnsemble(model, "cpu").predict(volume)
    assert session.get_inputs()[0].type == "tensor(float)"
    assert np.abs(half - full).max() < 2e-2


def test_cpu_failure_is_a_runtime_failure(tmp_path, volume, monkeypatch, own_cpu_kernels):
    real = inference.create_session

    def create(path, providers, threads, precision="fp32", keep_memory=False):
        session = real(path, providers, threads)
        session.run = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bad allocation"))
        return session

    monkeypatch.setattr(inference, "create_session", create)
    runner = ensemble(tmp_path)
    with pytest.raises(RuntimeFailure, match="inference failed on CPU: bad allocation"):
        runner.predict(volume)


def identity_model(tmp_path, input_shape, output_channels=1):
    folder = tmp_path / "identity"
    folder.mkdir()
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["output"])], "identity",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, input_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (folder / "fold0.onnx").write_bytes(model.SerializeToString())
    descriptor = {"name": "identity", "version": "1", "target": "CMB",
                  "input": {"shape": list(SHAPE), "layout": "NDHWC"},
                  "output": {"activation": "none", "channel": output_channels},
                  "folds": [{"file": "fold0.onnx", "sha256": checksum([folder / "fold0.onnx"])}]}
    (folder / "model.json").write_text(json.dumps(descriptor))
    return read_descriptor(folder)


def test_spatial_shape_disagreeing_with_the_descriptor_is_refused(tmp_path):
    with pytest.raises(ModelError, match="model.json says"):
        FoldEnsemble(identity_model(tmp_path, [1, 10, 10, 10, 1]), "cpu")


def test_multi_channel_input_is_refused(tmp_path):
    with pytest.raises(ModelError, match="2 input channels"):
        FoldEnsemble(identity_model(tmp_path, [1, "x", "y", "z", 2]), "cpu")


def test_missing_output_channel_is_refused(tmp_path, volume):
    runner = FoldEnsemble(identity_model(tmp_path, [1, "x", "y", "z", 1], output_channels=3), "cpu")
    with pytest.raises(ModelError, match="output channel 3 does not exist"):
        runner.predict(volume)


def test_unloadable_onnx_file_is_a_model_error(tmp_path):
    folder = blobmodel.write_model(tmp_path / "m", shape=SHAPE)
    (folder / "fold0.onnx").write_bytes(b"not an onnx graph")
    data = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    data["folds"][0]["sha256"] = checksum([folder / "fold0.onnx"])
    (folder / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="onnxruntime cannot load this model"):
        FoldEnsemble(read_descriptor(folder), "cpu")


def test_sessions_are_created_once_per_model_and_device(tmp_path):
    model = read_descriptor(blobmodel.write_model(tmp_path / "m", shape=SHAPE))
    first = get_ensemble(model, "cpu")
    assert get_ensemble(model, "cpu") is first
    assert get_ensemble(model, "auto") is not first


def test_threads_follow_the_available_cores(tmp_path, own_cpu_kernels):
    runner = ensemble(tmp_path)
    assert runner.threads == inference.available_cores() >= 1
    assert runner.summary()["provider"] == CPU


def test_cpu_sessions_plan_memory_without_buffer_reuse(tmp_path, volume, monkeypatch, own_cpu_kernels):
    """The planner's buffer reuse made a SHIVA-sized fold's memory pattern 1.56 GiB instead of the
    1.08 GiB its tensors need at once (docs/performance.md): CPU sessions keep the pattern, no reuse,
    no arena, and compute exactly what onnxruntime's defaults compute."""
    model = read_descriptor(blobmodel.write_model(tmp_path / "m", shape=SHAPE))
    options = inference.create_session(str(model.folds[0].path), [CPU], 1).get_session_options()
    assert options.enable_mem_reuse is False
    assert options.enable_mem_pattern is True and options.enable_cpu_mem_arena is False
    runner = FoldEnsemble(model, "cpu")
    assert all(s.get_session_options().enable_mem_reuse is False for s in runner.sessions)
    feed = inference.model_layout(volume, model.layout)
    default = ort.InferenceSession(str(model.folds[0].path), providers=[CPU]).run(None, {"image": feed})[0]
    assert np.array_equal(runner.raw_outputs(feed)[0], default)

    seen = []  # GPU sessions (not measured) keep onnxruntime's default planning
    monkeypatch.setattr(ort, "InferenceSession", lambda model, sess_options, providers: seen.append(sess_options))
    inference.create_session("fold.onnx", [CUDA, CPU], 1)
    assert seen[0].enable_mem_reuse is True


def test_sessions_that_keep_memory_share_one_arena_and_compute_the_same(tmp_path, volume, own_cpu_kernels):
    """Batch workers keep their working memory between scans (no pages faulted in again at every run):
    the folds of every such ensemble in the process work in one registered arena, with the same kernels."""
    model = read_descriptor(blobmodel.write_model(tmp_path / "m", shape=SHAPE, folds=2))
    feed = inference.model_layout(volume, model.layout)
    plain = FoldEnsemble(model, "cpu")
    kept = FoldEnsemble(model, "cpu", keep_memory=True)
    again = get_ensemble(model, "cpu", keep_memory=True)  # a second ensemble: the arena is registered once
    assert get_ensemble(model, "cpu", keep_memory=True) is again and get_ensemble(model, "cpu") is not again
    for session in kept.sessions + again.sessions:
        options = session.get_session_options()
        assert options.enable_cpu_mem_arena and options.get_session_config_entry("session.use_env_allocators") == "1"
    assert not any(s.get_session_options().enable_cpu_mem_arena for s in plain.sessions)
    expected = plain.raw_outputs(feed)
    for _ in range(2):  # the second run reuses the arena's memory
        for outputs in (kept.raw_outputs(feed), again.raw_outputs(feed)):
            assert all(np.array_equal(a, b) for a, b in zip(outputs, expected))
    inference.clear_ensembles()


def test_provider_failure_reason_from_onnxruntime_gpu_output():
    """What onnxruntime-gpu 1.31 printed on this machine (no CUDA libraries), colours included."""
    printed = (
        "\x1b[1;31m2026-11-25 06:58:51.55 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
        "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:2043 onnxruntime::Provider& "
        "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
        "/x/libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open shared object file: "
        "No such file or directory\n\x1b[m\n"
        "\x1b[0;93m2026-11-25 06:58:51.55 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1295 "
        "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.* and "
        "CUDA 13.*. Please install all dependencies as mentioned in the GPU requirements page\x1b[m\n")
    assert inference._provider_failure(printed) == (
        "libcublasLt.so.13: cannot open shared object file: No such file or directory; "
        "Require cuDNN 9.* and CUDA 13.*")


def test_gpu_provider_tuning_and_tensorrt_engine_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(inference, "trt_cache_dir", lambda: tmp_path / "cache" / "tensorrt")
    cuda = inference.provider_options(CUDA)
    assert cuda["cudnn_conv_algo_search"] == "EXHAUSTIVE" and cuda["cudnn_conv_use_max_workspace"] == "1"
    for precision, fp16 in (("fp32", "False"), ("fp16", "True")):
        trt = inference.provider_options(TENSORRT, precision)
        assert trt["trt_engine_cache_enable"] == "True" and trt["trt_fp16_enable"] == fp16
        assert trt["trt_engine_cache_path"] == str(tmp_path / "cache" / "tensorrt")
    assert (tmp_path / "cache" / "tensorrt").is_dir()  # made before the provider writes its first engine
    assert inference.provider_options(CPU) == {}


class _Cancelled(Exception):
    pass


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="POSIX interval timers")
@pytest.mark.parametrize("honours_stop", [True, False])
def test_a_signal_ends_an_interruptible_run_whether_or_not_the_run_stops(honours_stop):
    """A signal during a run raises at once; ``stop`` is called, and a run that does not stop (a provider running
    the graph as one kernel) is not waited for beyond the grace: it stays in its daemon thread."""
    release, stopped, returned = threading.Event(), threading.Event(), threading.Event()

    def stop() -> None:
        stopped.set()
        if honours_stop:
            release.set()

    previous = signal.signal(signal.SIGALRM, lambda signum, frame: (_ for _ in ()).throw(_Cancelled()))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(_Cancelled):
            inference.run_interruptibly(lambda: (release.wait(5), returned.set()), stop)
        assert stopped.is_set() and returned.is_set() == honours_stop  # a stubborn run is still running here
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        release.set()
