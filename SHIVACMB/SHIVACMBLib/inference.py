"""Run a model's folds with onnxruntime: provider choice, CPU fallback, fold ensemble.

Sessions are created once per (model, device) and reused for every scan of the process
(:func:`get_ensemble`). Provider order for ``--device auto``: CUDA, then CoreML/DirectML,
then CPU. A GPU provider that fails to load, or fails while running (out of memory, driver
error), is dropped for CPU with a warning; the provider that really ran is reported.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.special import expit, softmax

from .errors import ModelError, RuntimeFailure
from .models import ModelDescriptor, verify_model
from .nativelog import native_stderr_captured

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
GPU_PROVIDERS = (CUDA, "CoreMLExecutionProvider", "DmlExecutionProvider")
DEVICES = ("auto", "cpu", "cuda")

ProgressFn = Callable[[float, str], None]


def onnxruntime_module():
    """Import onnxruntime, or explain how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeFailure("onnxruntime is not installed: pip install 'shivacmb[cpu]' "
                             "(or 'shivacmb[gpu]' on a machine with an NVIDIA GPU)") from None
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
    if device == "cpu":
        return [CPU], []
    if device == "cuda":
        if CUDA in available:
            return [CUDA, CPU], []
        return [CPU], ["--device cuda: this onnxruntime has no CUDA provider (install 'shivacmb[gpu]'); "
                       "running on CPU"]
    return [p for p in GPU_PROVIDERS if p in available] + [CPU], []


def create_session(path: str, providers: Sequence[str], threads: int) -> Any:
    """One onnxruntime session (module-level so tests can stand in for a GPU)."""
    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False  # give each fold's working memory back: folds run one after another
    return ort.InferenceSession(path, sess_options=options, providers=list(providers))


class FoldEnsemble:
    """All folds of a model as onnxruntime sessions, with the ensemble rule of the descriptor."""

    def __init__(self, model: ModelDescriptor, device: str = "auto", threads: Optional[int] = None):
        verify_model(model)
        self.model = model
        self.device = device
        self.threads = threads or available_cores()
        self.warnings: List[str] = []
        ort = onnxruntime_module()
        self.onnxruntime_version = ort.__version__
        plan, notes = provider_plan(device, ort.get_available_providers())
        self.requested = plan
        self.warnings += notes
        self.sessions = self._open(plan)

    @property
    def provider(self) -> str:
        """The execution provider the sessions actually run on."""
        return self.sessions[0].get_providers()[0]

    def summary(self) -> Dict[str, Any]:
        return {"onnxruntime": self.onnxruntime_version, "device": self.device, "requested": self.requested,
                "provider": self.provider, "threads": self.threads, "warnings": list(self.warnings)}

    # --- sessions -------------------------------------------------------------------
    def _open(self, providers: List[str]) -> List[Any]:
        sessions = []
        for fold in self.model.folds:
            printed: List[str] = []
            try:
                with native_stderr_captured(printed), warnings.catch_warnings(record=True) as raised:
                    warnings.simplefilter("always")
                    session = create_session(str(fold.path), providers, self.threads)
                printed += [f"{w.message}\n" for w in raised]
            except Exception as err:  # noqa: BLE001 - any provider failure gets the same treatment
                if providers == [CPU]:
                    raise ModelError(f"{fold.path}: onnxruntime cannot load this model: {_one_line(err)}") from None
                self._warn_fallback(f"could not start {providers[0]} ({_one_line(err)})")
                return self._open([CPU])
            used = session.get_providers()[0]
            if used != providers[0]:
                reason = _provider_failure("".join(printed)) or "provider unavailable"
                self._warn_fallback(f"{providers[0]} not usable ({reason})")
                return self._open([CPU])
            self._check_io(session, fold.path)
            sessions.append(session)
        return sessions

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
        feed = self._to_model_layout(volume)
        try:
            return self._run_all(feed, progress)
        except ModelError:
            raise
        except Exception as err:  # noqa: BLE001 - a GPU failure mid-run falls back to CPU
            if self.provider == CPU:
                raise RuntimeFailure(f"inference failed on CPU: {_one_line(err)}") from None
            self._warn_fallback(f"{self.provider} failed during inference ({_one_line(err)})")
            self.sessions = self._open([CPU])
            return self._run_all(feed, progress)

    def _run_all(self, feed: np.ndarray, progress: Optional[ProgressFn]) -> Tuple[np.ndarray, List[np.ndarray]]:
        total: Optional[np.ndarray] = None
        folds: List[np.ndarray] = []
        n = len(self.sessions)
        for index, session in enumerate(self.sessions):
            if progress:
                progress(index / n, f"fold {index + 1} of {n} on {self.provider}")
            name = session.get_inputs()[0].name
            raw = session.run(None, {name: feed})[0]
            prob = self._to_probability(raw)
            prob[prob < self.model.fold_floor] = 0.0
            if n > 1:
                folds.append(prob)
            if total is None:
                total = prob.copy() if n > 1 else prob
            else:
                total += prob
        if progress:
            progress(1.0, f"{n} fold(s) done on {self.provider}")
        assert total is not None
        total /= np.float32(n)
        return total, folds

    def _to_model_layout(self, volume: np.ndarray) -> np.ndarray:
        xyz = np.asarray(volume, dtype=np.float32).transpose(2, 1, 0)
        batch = xyz[np.newaxis, ..., np.newaxis] if self.model.layout == "NDHWC" else xyz[np.newaxis, np.newaxis]
        return np.ascontiguousarray(batch)

    def _to_probability(self, raw: np.ndarray) -> np.ndarray:
        """Network output -> CMB probability, [z, y, x] float32."""
        out = np.asarray(raw, dtype=np.float32)
        if out.ndim != 5 or out.shape[0] != 1:
            raise ModelError(f"model '{self.model.name}' returned shape {out.shape}, expected a 5D batch of one")
        channels = out[0] if self.model.layout == "NCDHW" else np.moveaxis(out[0], -1, 0)  # C, X, Y, Z
        if self.model.channel >= channels.shape[0]:
            raise ModelError(f"model '{self.model.name}': output channel {self.model.channel} does not exist "
                             f"(output has {channels.shape[0]})")
        if self.model.activation == "softmax":
            prob = softmax(channels, axis=0)[self.model.channel]
        elif self.model.activation == "sigmoid":
            prob = expit(channels[self.model.channel])
        else:
            prob = channels[self.model.channel]
        return np.ascontiguousarray(prob.transpose(2, 1, 0), dtype=np.float32)


_ENSEMBLES: Dict[Tuple[Any, ...], FoldEnsemble] = {}


def get_ensemble(model: ModelDescriptor, device: str = "auto", threads: Optional[int] = None) -> FoldEnsemble:
    """The process-wide ensemble for this model and device, created on first use."""
    key = (str(model.path), tuple(f.sha256 for f in model.folds), device, threads)
    if key not in _ENSEMBLES:
        _ENSEMBLES[key] = FoldEnsemble(model, device, threads)
    return _ENSEMBLES[key]


def clear_ensembles() -> None:
    """Release every cached session (frees GPU memory)."""
    _ENSEMBLES.clear()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:240] or type(err).__name__


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
