"""Run a model's folds with onnxruntime: provider choice, CPU fallback, fold ensemble.

Sessions are created once per (model, device, precision) and reused for every scan of the process
(:func:`get_ensemble`). Provider order for ``--device auto``: CUDA, then CoreML/DirectML,
then OpenVINO on the CPU (onnxruntime-openvino, the default install on x86-64 Linux and Windows:
Intel's kernels, faster than onnxruntime's own 3D convolutions on AVX-512 CPUs; fp32, same numbers),
then CPU; ``--device cpu`` takes OpenVINO first too; ``--device tensorrt`` puts TensorRT (engines
cached in the user cache folder) before CUDA. A provider that fails to load, or fails while running
(out of memory, driver error), is dropped for onnxruntime's own CPU kernels with a warning; the
provider that really ran is reported.

OpenVINO runs every fold of a model in one session over one graph (:mod:`modelstore.ensemblegraph`)
shaped to the model box: one memory plan for all folds instead of one kept per fold, and the static
shapes its int8 kernels need; converted Keras upsamplings run there as single Resize nodes and, in fp32,
convolutions of concatenations as sums of convolutions (faster on OpenVINO, same numbers but for float
rounding). Other providers run one session per fold. On CUDA/TensorRT the input is copied to the GPU
once and every fold reads it there (IO binding); cuDNN picks its fastest convolution algorithms once per
session (exhaustive search). With ``precision="fp16"`` GPU sessions run an fp16
copy of each fold (fp32 inputs and outputs). The CPU precisions ``bf16`` (OpenVINO, on CPUs with AMX
or AVX-512 BF16) and ``int8`` (the model's int8 copy, :mod:`modelstore.quantize`) run only where
``shivacmb models verify --precision`` has shown on this computer that they find what fp32 finds
(:mod:`modelstore.precisions`); otherwise fp32 runs, with a warning saying how to check them. CPU
sessions use every available core.
"""

from __future__ import annotations

import json
import os
import re
import threading
import warnings
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy.special import expit, softmax

from .errors import ModelError, RuntimeFailure, one_line
from .modelstore import precisions
from .modelstore.ensemblegraph import boxed_graph
from .modelstore.models import ModelDescriptor, cache_dir, verify_model
from .nativelog import native_stderr_captured
from .runtimes import OPENVINO, builds_warning, cpu_has_bf16, installed_builds, load_openvino_libraries
from .settings import DEVICES, PRECISIONS

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (CUDA, "CoreMLExecutionProvider", "DmlExecutionProvider")
NVIDIA_PROVIDERS = (TENSORRT, CUDA)  # where IO binding keeps the input on the GPU
STOP_GRACE_S = 0.5  # how long a cancelled run may take to stop before the command ends without it

ProgressFn = Callable[[float, str], None]


def onnxruntime_module():
    """Import onnxruntime, or explain how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeFailure("onnxruntime is not installed: pip install 'shivacmb[cpu]' (onnxruntime-openvino on "
                             "x86-64 Linux and Windows, else onnxruntime), or 'shivacmb[gpu]' on a machine with an "
                             "NVIDIA GPU") from None
    return onnxruntime


def available_cores() -> int:
    """CPU cores this process may use (affinity and cgroup-aware where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def provider_plan(device: str, available: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Providers to try in order, and warnings about requested ones that are absent."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not '{device}'")
    cpu = [OPENVINO, CPU] if OPENVINO in available else [CPU]
    if device == "cpu":
        return cpu, []
    if device in ("cuda", "tensorrt"):
        wanted = [TENSORRT, CUDA] if device == "tensorrt" else [CUDA]
        plan = [p for p in wanted if p in available]
        notes = [f"--device {device}: this onnxruntime has no {_NAMES[p]} provider (install 'shivacmb[gpu]')"
                 for p in wanted if p not in available]
        if not plan:
            notes[-1] += "; running on CPU"
        return plan + [CPU], notes
    return [p for p in GPU_PROVIDERS if p in available] + cpu, []


_NAMES = {CUDA: "CUDA", TENSORRT: "TensorRT"}


def trt_cache_dir() -> Path:
    """Where TensorRT keeps its built engines (building one takes minutes; reusing it, a second)."""
    return cache_dir() / "tensorrt"


def provider_options(provider: str, precision: str = "fp32", threads: int = 1) -> Dict[str, Any]:
    """Tuning of each execution provider (the cuDNN search runs once per session)."""
    if provider == OPENVINO:
        options = {"device_type": "CPU", "num_of_threads": str(threads)}
        if precision == "bf16":
            return options | {"load_config": json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}})}
        return options | {"precision": "FP32"}  # on CPUs with AMX OpenVINO would otherwise choose bf16
    if provider == CUDA:
        return {"cudnn_conv_algo_search": "EXHAUSTIVE", "cudnn_conv_use_max_workspace": "1",
                "do_copy_in_default_stream": "1", "arena_extend_strategy": "kSameAsRequested"}
    if provider == TENSORRT:
        cache = trt_cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache),
                "trt_fp16_enable": str(precision == "fp16"), "trt_max_workspace_size": str(4 << 30)}
    return {}


def create_session(model: Union[str, bytes], providers: Sequence[str], threads: int, precision: str = "fp32",
                   keep_memory: bool = False) -> Any:
    """One onnxruntime session from a file or a serialized model (module-level so tests can stand in for a GPU).

    ``keep_memory``: a CPU session works in the process's shared arena (:func:`shared_cpu_arena`) instead of
    memory given back after every run."""
    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False  # give each fold's working memory back: folds run one after another
    if providers[0] == CPU:
        # The memory pattern (one block per run, laid out once) stays, but without the planner's
        # buffer reuse: reuse makes early full-size buffers live until the decoder takes them over,
        # and the pattern of a SHIVA-sized fold then needs 1.56 GiB instead of the 1.08 GiB its
        # tensors need at once (docs/performance.md). Same kernels, same numbers; GPUs unmeasured.
        options.enable_mem_reuse = False
        if keep_memory:
            shared_cpu_arena()
            options.enable_cpu_mem_arena = True
            options.add_session_config_entry("session.use_env_allocators", "1")
    if OPENVINO in providers:
        load_openvino_libraries()
    tuned = [(p, provider_options(p, precision, threads)) for p in providers]
    return ort.InferenceSession(model, sess_options=options, providers=tuned)


@lru_cache(maxsize=1)
def shared_cpu_arena() -> None:
    """Register one CPU memory arena for the whole process, shared by the sessions that keep their memory.

    Without it a CPU session takes its working memory from the system at every run and gives it back
    (memory pattern, no arena: the lowest peak for one scan); the pages are then faulted in again at the
    next run, 0.5 s of system time per run of the default model on one core. A batch worker runs one
    fold at a time, scan after scan: one arena sized by the largest fold serves them all (peak 2.7 GiB
    for the default model instead of 1.4; docs/performance.md). onnxruntime's default arena settings:
    its kSameAsRequested growth made the shared arena abort ("Could not find Region", onnxruntime 1.32)."""
    ort = onnxruntime_module()
    cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(0, -1, -1, -1))


def fp16_model(path: Path) -> bytes:
    """An fp16 copy of an fp32 ONNX fold, serialized."""
    import onnx

    from .modelstore.onnxfloat import to_float16

    return to_float16(onnx.load(str(path))).SerializeToString()


def model_layout(volume: np.ndarray, layout: str) -> np.ndarray:
    """Model box [z, y, x] -> the contiguous float32 batch of one the ONNX input takes."""
    xyz = np.asarray(volume, dtype=np.float32).transpose(2, 1, 0)
    batch = xyz[np.newaxis, ..., np.newaxis] if layout == "NDHWC" else xyz[np.newaxis, np.newaxis]
    return np.ascontiguousarray(batch)


def to_probability(raw: np.ndarray, model: ModelDescriptor) -> np.ndarray:
    """Network output -> CMB probability, [z, y, x] float32, as the descriptor's output section says."""
    out = np.asarray(raw, dtype=np.float32)
    if out.ndim != 5 or out.shape[0] != 1:
        raise ModelError(f"model '{model.name}' returned shape {out.shape}, expected a 5D batch of one")
    channels = out[0] if model.layout == "NCDHW" else np.moveaxis(out[0], -1, 0)  # C, X, Y, Z
    if model.channel >= channels.shape[0]:
        raise ModelError(f"model '{model.name}': output channel {model.channel} does not exist "
                         f"(output has {channels.shape[0]})")
    if model.activation == "softmax":
        prob = softmax(channels, axis=0)[model.channel]
    elif model.activation == "sigmoid":
        prob = expit(channels[model.channel])
    else:
        prob = channels[model.channel]
    return np.ascontiguousarray(prob.transpose(2, 1, 0), dtype=np.float32)


class FoldEnsemble:
    """All folds of a model as onnxruntime sessions, with the ensemble rule of the descriptor."""

    def __init__(self, model: ModelDescriptor, device: str = "auto", threads: Optional[int] = None,
                 precision: str = "fp32", providers: Optional[Sequence[str]] = None, keep_memory: bool = False,
                 unverified: bool = False):
        """``providers`` replaces the device's plan (tried in order, e.g. ``[CPU]`` for onnxruntime's own kernels);
        ``keep_memory``: CPU sessions keep their working memory between runs (for processes that run many scans);
        ``unverified``: run bf16 or int8 without a passing `models verify --precision` (that check itself, benches)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
        verify_model(model)
        self.model = model
        self.device = device
        self.precision = precision
        self.threads = threads or available_cores()
        self.keep_memory = keep_memory
        self.unverified = unverified
        self.running_precision = "fp32"  # what the sessions compute in (set when they open)
        self.builds = installed_builds()
        self.warnings: List[str] = [w for w in [builds_warning(self.builds)] if w]
        ort = onnxruntime_module()
        self.onnxruntime_version = ort.__version__
        plan, notes = (list(providers), []) if providers else provider_plan(device, ort.get_available_providers())
        self.requested = plan
        self.warnings += notes
        self._outputs: List[List[str]] = []  # per session, the outputs that are fold maps (in fold order)
        self.sessions = self._open(plan)
        self._running = threading.Lock()  # one scan at a time through the folds; others prepare meanwhile

    @property
    def provider(self) -> str:
        """The execution provider the sessions actually run on."""
        return self.sessions[0].get_providers()[0]

    def summary(self) -> Dict[str, Any]:
        """run.json's ``inference``: the build, what was asked and what ran, and (CPU runs in fp32) the reduced
        precisions this CPU has units for, with whether they are verified for this model here."""
        offered = precisions.offers(self.model, self.provider) if self.running_precision == "fp32" else {}
        return {"onnxruntime": self.onnxruntime_version, "runtime": ", ".join(self.builds), "device": self.device,
                "requested": self.requested, "provider": self.provider, "precision": self.running_precision,
                "threads": self.threads, "faster_precisions": offered, "warnings": list(self.warnings)}

    # --- sessions -------------------------------------------------------------------
    def _open(self, providers: List[str]) -> List[Any]:
        self.running_precision, note = self._precision_on(providers[0])
        if note and note not in self.warnings:
            self.warnings.append(note)
        sessions: List[Any] = []
        self._outputs = []
        for label, source, folds in self._sources(providers[0]):
            printed: List[str] = []
            try:
                with native_stderr_captured(printed), warnings.catch_warnings(record=True) as raised:
                    warnings.simplefilter("always")
                    session = run_interruptibly(partial(create_session, source, providers, self.threads,
                                                        self.running_precision, self.keep_memory))
                printed += [f"{w.message}\n" for w in raised]
            except Exception as err:  # noqa: BLE001 - any provider failure gets the same treatment
                if providers == [CPU]:
                    raise ModelError(f"{label}: onnxruntime cannot load this model: {one_line(err)}") from None
                self._warn_fallback(f"could not start {providers[0]} ({one_line(err)})")
                return self._open([CPU])
            used = session.get_providers()[0]
            if used != providers[0]:
                reason = _provider_failure("".join(printed)) or "provider unavailable"
                if used in providers:  # e.g. TensorRT missing, CUDA runs: no CPU fallback needed
                    self.warnings.append(f"{providers[0]} not usable ({reason}); running on {used}")
                    return self._open(providers[providers.index(used):])
                self._warn_fallback(f"{providers[0]} not usable ({reason})")
                return self._open([CPU])
            self._check_io(session, label)
            names = [o.name for o in session.get_outputs()]
            if len(names) < folds:
                raise ModelError(f"{label}: computes {len(names)} output(s), expected one per fold ({folds})")
            sessions.append(session)
            self._outputs.append(names[:folds])
        return sessions

    def _precision_on(self, provider: str) -> Tuple[str, Optional[str]]:
        """The precision ``provider`` computes in, and why it is not the one asked for (None when it is)."""
        if self.precision == "fp16":
            return ("fp16", None) if provider in NVIDIA_PROVIDERS else (
                "fp32", f"--precision fp16 is for NVIDIA GPUs; {provider} runs fp32")
        if self.precision in ("bf16", "int8"):
            why = _cpu_precision_note(self.precision, provider) or (
                None if self.unverified else precisions.unverified_note(self.model, self.precision, provider))
            if not why and self.precision == "int8" and not precisions.int8_file(self.model).is_file():
                why = f"--precision int8: model '{self.model.name}' has no int8 copy yet (`models verify` makes it)"
            return ("fp32", why) if why else (self.precision, None)
        return "fp32", None

    def _sources(self, provider: str) -> List[Tuple[Path, Union[str, bytes], int]]:
        """What each session loads, the file its errors name and how many folds it computes: the int8 copy (every
        fold); on OpenVINO one graph of every fold shaped to the model box; fp16 copies of the folds for CUDA
        (TensorRT makes its own fp16 engine from fp32); else the fold files."""
        every = len(self.model.folds)
        if self.running_precision == "int8":
            path = precisions.int8_file(self.model)
            return [(path, str(path), every)]
        if provider == OPENVINO:
            graph = boxed_graph(self.model, fp32=self.running_precision == "fp32")
            if graph is not None:
                return [(self.model.path if every > 1 else self.model.folds[0].path, graph.SerializeToString(), every)]
        if self.running_precision == "fp16" and provider == CUDA:
            return [(fold.path, fp16_model(fold.path), 1) for fold in self.model.folds]
        return [(fold.path, str(fold.path), 1) for fold in self.model.folds]

    def _warn_fallback(self, reason: str) -> None:
        self.warnings.append(f"{reason}; running on CPU")

    def _check_io(self, session: Any, path: Any) -> None:
        inputs = session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 5:
            raise ModelError(f"{path}: expected one 5D input ({self.model.layout}), "
                             f"found {[tuple(i.shape) for i in inputs]}")
        shape = inputs[0].shape
        spatial, channels = (shape[1:4], shape[4]) if self.model.layout == "NDHWC" else (shape[2:5], shape[1])
        if isinstance(channels, int) and channels != 1:
            raise ModelError(f"{path}: model takes {channels} input channels; only single-modality models run here")
        for have, want in zip(spatial, self.model.shape):
            if isinstance(have, int) and have != want:
                raise ModelError(f"{path}: ONNX input is {tuple(spatial)} but model.json says "
                                 f"{tuple(self.model.shape)}")

    # --- prediction -----------------------------------------------------------------
    def predict(self, volume: np.ndarray, progress: Optional[ProgressFn] = None
                ) -> Tuple[np.ndarray, List[np.ndarray]]:
        """Mean probability of all folds, and each fold's map (kept only when there are several).

        ``volume`` is the normalised model box indexed [z, y, x]; results have the same indexing.
        Per fold, values below the fold floor become 0 before averaging.
        """
        feed = model_layout(volume, self.model.layout)
        with self._running:
            return self._predict(feed, progress)

    def _predict(self, feed: np.ndarray, progress: Optional[ProgressFn]) -> Tuple[np.ndarray, List[np.ndarray]]:
        try:
            return self._run_all(feed, progress)
        except ModelError:
            raise
        except Exception as err:  # noqa: BLE001 - a provider failure mid-run falls back to CPU
            if self.provider == CPU:
                raise RuntimeFailure(f"inference failed on CPU: {one_line(err)}") from None
            self._warn_fallback(f"{self.provider} failed during inference ({one_line(err)})")
            self.sessions = self._open([CPU])
            return self._run_all(feed, progress)

    def raw_outputs(self, feed: np.ndarray) -> List[np.ndarray]:
        """Every fold's raw output for one batch in the model layout (no fallback: for parity checks)."""
        return [raw for index, bound in enumerate(self._bind_input(feed)) for raw in self._run_session(index, bound)]

    def _run_all(self, feed: np.ndarray, progress: Optional[ProgressFn]) -> Tuple[np.ndarray, List[np.ndarray]]:
        total: Optional[np.ndarray] = None
        folds: List[np.ndarray] = []
        n = len(self.model.folds)
        done = 0
        for index, bound in enumerate(self._bind_input(feed)):
            if progress:
                first, last = done + 1, done + len(self._outputs[index])
                which = f"fold {first}" if first == last else f"folds {first}-{last}"
                progress(done / n, f"{which} of {n} on {self.provider}")
            for raw in self._run_session(index, bound):
                prob = to_probability(raw, self.model)
                prob[prob < self.model.fold_floor] = 0.0
                if n > 1:
                    folds.append(prob)
                if total is None:
                    total = prob.copy() if n > 1 else prob
                else:
                    total += prob
                done += 1
        if progress:
            progress(1.0, f"{n} fold(s) done on {self.provider}")
        assert total is not None
        total /= np.float32(n)
        return total, folds

    def _bind_input(self, feed: np.ndarray) -> List[Any]:
        """Per session, the feed: on NVIDIA GPUs one device copy of the input shared by every fold."""
        device = io_binding_device(self.provider)
        if device is None:
            return [feed] * len(self.sessions)
        on_device = onnxruntime_module().OrtValue.ortvalue_from_numpy(feed, device, 0)
        return [on_device] * len(self.sessions)

    def _run_session(self, index: int, feed: Any) -> List[np.ndarray]:
        """The fold maps session ``index`` computes from ``feed`` (one per fold it holds)."""
        session, outputs = self.sessions[index], self._outputs[index]
        name = session.get_inputs()[0].name
        options = onnxruntime_module().RunOptions()
        stop = partial(setattr, options, "terminate", True)
        if isinstance(feed, np.ndarray):
            return run_interruptibly(lambda: session.run(outputs, {name: feed}, options), stop)
        binding = session.io_binding()
        binding.bind_ortvalue_input(name, feed)
        for output in outputs:
            binding.bind_output(output, feed.device_name())
        run_interruptibly(lambda: session.run_with_iobinding(binding, options), stop)
        return binding.copy_outputs_to_cpu()


def run_interruptibly(call: Callable[[], Any], stop: Optional[Callable[[], None]] = None) -> Any:
    """``call`` (an onnxruntime run, or a session being made) in a helper thread, the main thread waiting on it.

    A fold runs for seconds inside onnxruntime, and OpenVINO compiles a session for a second or more, where Python
    cannot act on a signal; waiting here instead, the main thread gets SIGTERM/Ctrl-C at once and raises. ``stop``
    ends the call first (a run's ``RunOptions.terminate``: onnxruntime stops between two kernels), waited for at
    most ``STOP_GRACE_S`` (a provider that runs the whole graph as one kernel, as OpenVINO may, stops only at its
    end); a call that has not ended by then, or has no ``stop`` (a session being compiled), is left to its daemon
    thread, which the command's exit ends. Off the main thread (batch workers), which never gets signals, it
    simply runs.
    """
    if threading.current_thread() is not threading.main_thread():
        return call()
    outcome: Dict[str, Any] = {}
    finished = threading.Event()  # not Thread.join: a join cut short by a signal may return early

    def work() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = err
        finally:
            finished.set()

    threading.Thread(target=work, name="onnxruntime-run", daemon=True).start()
    try:
        while not finished.wait(0.05):
            pass
    except BaseException:
        if stop is not None:
            stop()
            finished.wait(STOP_GRACE_S)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _cpu_precision_note(precision: str, provider: str) -> Optional[str]:
    """Why ``provider`` cannot compute in the CPU precision ``precision`` (None when it can)."""
    if precision == "bf16" and provider != OPENVINO:
        return (f"--precision bf16 runs on CPUs through OpenVINO (onnxruntime-openvino, the default install on "
                f"x86-64 Linux and Windows); {provider} runs fp32")
    if precision == "bf16" and not cpu_has_bf16():
        return "--precision bf16: this CPU has no bfloat16 instructions (AMX or AVX-512 BF16); OpenVINO runs fp32"
    if precision == "int8" and provider != OPENVINO:
        return (f"--precision int8 runs on CPUs through OpenVINO (onnxruntime's own int8 3D convolutions are slower "
                f"than its fp32 ones: docs/performance.md); {provider} runs fp32")
    return None


def io_binding_device(provider: str) -> Optional[str]:
    """onnxruntime device name for IO binding under ``provider``, None for a plain run (module-level for tests)."""
    return "cuda" if provider in NVIDIA_PROVIDERS else None


_ENSEMBLES: Dict[Tuple[Any, ...], FoldEnsemble] = {}


def get_ensemble(model: ModelDescriptor, device: str = "auto", threads: Optional[int] = None,
                 precision: str = "fp32", keep_memory: bool = False) -> FoldEnsemble:
    """The process-wide ensemble for this model, device and precision, created on first use."""
    key = (str(model.path), tuple(f.sha256 for f in model.folds), device, threads, precision, keep_memory)
    if key not in _ENSEMBLES:
        _ENSEMBLES[key] = FoldEnsemble(model, device, threads, precision, keep_memory=keep_memory)
    return _ENSEMBLES[key]


def clear_ensembles() -> None:
    """Release every cached session (frees GPU memory)."""
    _ENSEMBLES.clear()


def _provider_failure(text: str) -> str:
    """The useful part of what onnxruntime printed when a provider failed to load (one line)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    reasons = []
    for line in text.splitlines():
        if "[E:" in line or "not in available" in line:
            reasons.append(line.split("with error:", 1)[-1].split("FAIL :", 1)[-1].split("] ", 1)[-1])
        elif "Require " in line:
            reasons.append("Require " + line.split("Require ", 1)[1].split(". ", 1)[0])
    return "; ".join(" ".join(r.split())[:200] for r in reasons if r.strip())[:400]
