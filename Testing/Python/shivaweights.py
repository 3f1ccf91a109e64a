"""Stand-ins for the official SHIVA-CMB weights, built in code (tests and bench/inference_bench.py).

The network is of the SHIVA kind: a 3D residual U-Net, channels-last, one input channel,
sigmoid output in float32, for boxes of any size (odd sizes too: 214 halves to 107), with random
weights. :func:`official_zip` packages folds as the downloads are laid out: a model folder with
``model_info.json`` (target, modalities, version, files with name and md5) and the fold files,
names relative to the folder above it.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def shiva_unet(shape: Sequence[int], base: int = 4, levels: int = 2, mixed: bool = False, seed: int = 0,
               keras: Any = None, calibrate: Any = None, share: float = 0.002) -> Any:
    """Residual 3D U-Net (Keras 3, or ``keras=tf_keras`` for a Keras 2 model); mixed_float16 on request.

    ``calibrate`` (a [1, x, y, z, 1] input) sets the last bias so that ``share`` of its non-empty
    voxels come out above 0.5; otherwise the random network's output sits on one side of 0.5.
    """
    if keras is None:
        import keras
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        def block(x: Any, filters: int) -> Any:
            shortcut = layers.Conv3D(filters, 1, padding="same")(x)
            x = layers.Conv3D(filters, 3, padding="same", activation="relu")(x)
            x = layers.BatchNormalization()(x)
            x = layers.Conv3D(filters, 3, padding="same")(x)
            return layers.Activation("relu")(layers.Add()([x, shortcut]))

        inputs = keras.Input(tuple(shape) + (1,))
        skips, x = [], inputs
        for level in range(levels):
            x = block(x, base * 2 ** level)
            skips.append(x)
            x = layers.MaxPooling3D(2, padding="same")(x)
        x = block(x, base * 2 ** levels)
        for skip in reversed(skips):
            x = layers.UpSampling3D(2)(x)
            extra = [int(a) - int(b) for a, b in zip(x.shape[1:4], skip.shape[1:4])]
            if any(extra):
                x = layers.Cropping3D(tuple((0, e) for e in extra))(x)
            x = block(layers.Concatenate()([x, skip]), int(skip.shape[-1]))
        logits = layers.Conv3D(1, 1, dtype="float32", name="logits")(x)
        model = keras.Model(inputs, layers.Activation("sigmoid", dtype="float32")(logits))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    _spread(model, keras, seed, calibrate, share)
    return model


def _spread(model: Any, keras: Any, seed: int, volume: Any, share: float) -> None:
    """Widen the last layer's random weights, and place its bias when a calibration input is given."""
    import numpy as np
    import tensorflow as tf

    last = model.get_layer("logits")
    kernel, bias = last.get_weights()
    kernel = np.abs(np.random.default_rng(seed).normal(0, 2.0, kernel.shape)).astype(kernel.dtype)  # no ties on top
    last.set_weights([kernel, bias])
    if volume is not None:
        head = keras.Model(model.inputs, last.output)
        values = tf.function(lambda x: head(x, training=False), jit_compile=True)(tf.constant(volume)).numpy()
        inside = values[np.asarray(volume) > 0.1]  # the brain; the empty background is one constant value
        last.set_weights([kernel, bias - np.quantile(inside, 1.0 - share)])


def save_savedmodel(model: Any, folder: Path) -> Path:
    """A TensorFlow SavedModel folder with a serving_default signature (as SHIVA-CMB v2 folds)."""
    model.export(str(folder), verbose=False)
    return folder


def md5_of(path: Path) -> str:
    from SHIVACMBLib.modelstore.official import md5_of as md5

    return md5(path)


def official_zip(out: Path, folds: Sequence[Path], model_dir: str = "SWI-CMB", target: str = "CMB",
                 extra: Optional[Dict[str, Any]] = None, md5_override: Optional[Dict[int, str]] = None) -> Path:
    """``out`` zip: ``<model_dir>/model_info.json`` and the folds in ``<model_dir>/``."""
    files: List[Dict[str, str]] = []
    for index, fold in enumerate(folds):
        md5 = (md5_override or {}).get(index) or md5_of(fold)
        files.append({"name": f"{model_dir}/{fold.name}", "md5": md5})
    info = {"version": "v2", "release date": "2024/01/01", "author": "test", "target": target,
            "modalities": ["swi"], "files": files, **(extra or {})}
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{model_dir}/model_info.json", json.dumps(info, indent=2))
        for fold in folds:
            members = sorted(fold.rglob("*")) if fold.is_dir() else [fold]
            for member in members:
                if member.is_file():
                    archive.write(member, f"{model_dir}/{member.relative_to(fold.parent)}")
    return out
