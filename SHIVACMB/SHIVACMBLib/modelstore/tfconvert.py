"""TensorFlow/Keras folds -> ONNX (extra ``convert``: tensorflow, tf_keras for Keras 2 .h5, tf2onnx).

A fold is a Keras ``.h5`` file (SHIVA-CMB v1), a TensorFlow SavedModel folder (v2) or a Keras 3
``.keras`` file. :func:`load_fold` opens it as a callable taking float32 ``[1, x, y, z, 1]`` and
giving float32 probabilities; :func:`to_onnx` converts that callable with tf2onnx and widens any
fp16 part (mixed_float16 models) to fp32. ``.h5`` files written by Keras 2 that Keras 3 cannot
read are opened with ``tf_keras``. The TF original stays the reference for the parity check
(:func:`tf_predict`); fp16 kernels missing on CPU (3D pooling) are run through XLA.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..errors import ModelError, RuntimeFailure, one_line
from ..nativelog import native_stderr_captured

OPSET = 17
CONVERT_EXTRA = "pip install 'shivacmb[convert]'"
SAVEDMODEL_MARK = "saved_model.pb"
_HIDING = threading.local()  # inside tf_log_hidden (the capture does not nest)


def check_converter() -> None:
    """Refuse (exit 4) when tensorflow or tf2onnx is missing, without importing TensorFlow."""
    missing = [name for name in ("tensorflow", "tf2onnx") if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeFailure(f"converting TensorFlow/Keras weights needs tensorflow and tf2onnx "
                             f"({missing[0]} is missing): {CONVERT_EXTRA}")


def require_converter() -> Tuple[Any, Any]:
    """Import tensorflow and tf2onnx (their start-up log kept off the terminal), or explain how to install them."""
    check_converter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with tf_log_hidden():
        import tensorflow as tf
        import tf2onnx
    return tf, tf2onnx


@contextlib.contextmanager
def tf_log_hidden() -> Iterator[None]:
    """What TensorFlow, Keras and tf2onnx print on stderr inside the block is dropped (the command's errors stay
    one line); ``SHIVACMB_DEBUG=1`` lets it through."""
    if getattr(_HIDING, "on", False) or os.environ.get("SHIVACMB_DEBUG"):
        yield
        return
    _HIDING.on = True
    try:
        with native_stderr_captured([]):
            yield
    finally:
        _HIDING.on = False


def converter_versions() -> Dict[str, str]:
    """Versions of the conversion stack, recorded in model.json."""
    tf, tf2onnx = require_converter()
    import keras

    return {"tensorflow": tf.__version__, "keras": keras.__version__, "tf2onnx": tf2onnx.__version__}


def fold_kind(path: Path) -> str:
    """'savedmodel', 'h5' or 'keras'; refuses anything else."""
    if path.is_dir():
        if (path / SAVEDMODEL_MARK).is_file():
            return "savedmodel"
        raise ModelError(f"{path}: folder is not a TensorFlow SavedModel (no {SAVEDMODEL_MARK})")
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return "h5"
    if suffix == ".keras":
        return "keras"
    raise ModelError(f"{path}: not a Keras .h5/.keras file or a SavedModel folder")


@dataclass
class LoadedFold:
    """A TF fold as one float32 -> float32 function, with what the conversion needs to know."""

    path: Path
    kind: str
    function: Callable[[Any], Any]  # tf.function, input signature [1, x, y, z, 1] (spatial may be None)
    input_shape: Tuple[Optional[int], ...]  # the model's own input shape, batch first
    mixed_precision: bool
    loader: str  # "keras", "tf_keras" or "tf.saved_model"


def load_fold(path: Path) -> LoadedFold:
    """Open one fold with TensorFlow; errors name the file."""
    tf, _ = require_converter()
    kind = fold_kind(path)
    with tf_log_hidden():
        if kind == "savedmodel":
            return _load_savedmodel(tf, path)
        model, loader = _load_keras(path, kind)
    shape = tuple(model.inputs[0].shape)
    mixed = any("float16" in str(getattr(layer, "compute_dtype", "")) for layer in model.layers)
    return LoadedFold(path, kind, _wrap(tf, lambda x: model(x, training=False), _spec_shape(path, shape)),
                      shape, mixed, loader)


def _load_keras(path: Path, kind: str) -> Tuple[Any, str]:
    import keras

    errors: List[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return keras.models.load_model(str(path), compile=False), "keras"
        except Exception as err:  # noqa: BLE001 - Keras 3 refuses many Keras 2 files; tf_keras is tried next
            errors.append(f"Keras {keras.__version__}: {one_line(err)}")
        if kind == "h5":
            try:
                import tf_keras
            except ImportError:
                errors.append(f"tf_keras (for Keras 2 .h5 files) is not installed: {CONVERT_EXTRA}")
            else:
                try:
                    return tf_keras.models.load_model(str(path), compile=False), "tf_keras"
                except Exception as err:  # noqa: BLE001
                    errors.append(f"tf_keras: {one_line(err)}")
    raise ModelError(f"{path}: cannot be loaded ({'; '.join(errors)})")


def _load_savedmodel(tf: Any, path: Path) -> LoadedFold:
    try:
        loaded = tf.saved_model.load(str(path))
        infer = loaded.signatures["serving_default"]
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"{path}: cannot be loaded as a SavedModel ({one_line(err)})") from None
    inputs = infer.structured_input_signature[1]
    if len(inputs) != 1:
        raise ModelError(f"{path}: the serving signature takes {len(inputs)} inputs; a SHIVA-CMB fold takes one")
    name, spec = next(iter(inputs.items()))
    shape = tuple(spec.shape.as_list())
    mixed = spec.dtype == tf.float16 or any(op.type == "Cast" and op.get_attr("DstT") == tf.float16
                                            for op in infer.graph.get_operations())

    def call(x: Any) -> Any:
        outputs = infer(**{name: tf.cast(x, spec.dtype)})
        return outputs[sorted(outputs)[0]]  # SHiVAi takes the first output; these folds have one

    fold = LoadedFold(path, "savedmodel", _wrap(tf, call, _spec_shape(path, shape)), shape, mixed, "tf.saved_model")
    fold.keep_alive = loaded  # type: ignore[attr-defined]  # the signature needs its object alive
    return fold


def _spec_shape(path: Path, shape: Tuple[Optional[int], ...]) -> Tuple[Optional[int], ...]:
    """The converted input shape [1, x, y, z, 1]; refuses anything that is not NDHWC single channel."""
    if len(shape) != 5 or shape[-1] != 1 or shape[0] not in (None, 1):
        raise ModelError(f"{path}: input shape {_show(shape)} is not channels-last 3D with one channel "
                         "[batch, x, y, z, 1]; only SHIVA-CMB-style NDHWC single-modality folds are supported")
    return (1,) + tuple(shape[1:4]) + (1,)


def _wrap(tf: Any, call: Callable[[Any], Any], shape: Tuple[Optional[int], ...]) -> Any:
    spec = [tf.TensorSpec(shape, tf.float32, name="input")]

    @tf.function(input_signature=spec, autograph=False)
    def function(x: Any) -> Any:
        return tf.cast(call(x), tf.float32)

    return function


def to_onnx(fold: LoadedFold):
    """The fold as an fp32 ONNX model (onnx.ModelProto), opset 17, input 'input' [1, x, y, z, 1]."""
    _, tf2onnx = require_converter()
    from .onnxfloat import to_float32

    try:
        with warnings.catch_warnings(), tf_log_hidden():
            warnings.simplefilter("ignore")
            proto, _ = tf2onnx.convert.from_function(fold.function, input_signature=fold.function.input_signature,
                                                     opset=OPSET)
    except Exception as err:  # noqa: BLE001 - tf2onnx raises many kinds
        raise ModelError(f"{fold.path}: tf2onnx could not convert this fold ({one_line(err)})") from None
    proto.doc_string = f"converted from {fold.path.name} ({fold.kind}, loaded by {fold.loader}) by shivacmb"
    return to_float32(proto)


def tf_predict(fold: LoadedFold, batch: np.ndarray) -> np.ndarray:
    """What the TF original computes for ``batch`` ([1, x, y, z, 1] float32)."""
    tf, _ = require_converter()
    x = tf.constant(batch, dtype=tf.float32)
    with tf_log_hidden():
        if not fold.mixed_precision:
            return fold.function(x).numpy()
        try:
            return fold.function(x).numpy()
        except Exception:  # noqa: BLE001 - TF has no CPU kernel for some fp16 ops (3D pooling); XLA has
            return tf.function(fold.function, jit_compile=True)(x).numpy()


def _show(shape: Tuple[Optional[int], ...]) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"
