"""Time per scan and peak memory of a SHIVA-sized 3-fold model: TF/Keras `predict` against onnxruntime.

    python bench/inference_bench.py [--box 160 214 176] [--base 8] [--levels 4] [--folds 3] [--repeat 2]

Builds (once, cached in bench/out/inference/) the stand-in of Testing/Python/shivaweights.py at full
size with random weights, as SavedModel folds installed through `shivacmb models install` (so the
ONNX folds are exactly what users get), then runs every backend in its own fresh process on the
same normalised phantom box: TF/Keras `predict` (what the SHiVAi pipeline runs), ONNX CPU fp32 and,
when a GPU is there, TF GPU, ORT CUDA fp32/fp16 and TensorRT. Per backend: the first scan (session
start, engine build) and the best of the warm scans, peak resident memory of the process (and peak
GPU memory for GPU runs), and the ratio to TF in the same run. Never asserts timings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "Testing" / "Python"))
sys.path.insert(0, str(REPO / "SHIVACMB"))
OUT = HERE / "out" / "inference"


def build(box, base: int, levels: int, folds: int) -> Path:
    """The installed ONNX model (its TF originals in source/), built once per size."""
    tag = f"{'x'.join(map(str, box))}-b{base}-l{levels}-f{folds}"
    home = OUT / tag / "models"
    if (home / "bench" / "model.json").is_file():
        return home / "bench"
    os.environ["SHIVACMB_MODELS"] = str(home)
    import shivaweights
    from SHIVACMBLib.official import install

    weights = OUT / tag / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(folds):
        model = shivaweights.shiva_unet(box, base=base, levels=levels, seed=index)
        paths.append(shivaweights.save_savedmodel(model, weights / f"fold_{index}"))
    archive = shivaweights.official_zip(OUT / tag / "weights.zip", paths)
    install(archive, name="bench")
    return home / "bench"


def child(model_dir: Path, backend: str, repeat: int) -> dict:
    """One backend in this (fresh) process: first scan, best warm scan, peak memory."""
    from SHIVACMBLib.inference import FoldEnsemble, model_layout
    from SHIVACMBLib.models import read_descriptor
    from SHIVACMBLib.parity import parity_input

    model = read_descriptor(model_dir)
    volume = parity_input(model)
    baseline = _rss_mib()
    times = []
    if backend.startswith("tf"):
        import tensorflow as tf

        if backend == "tf-cpu":
            tf.config.set_visible_devices([], "GPU")
        records = json.loads((model_dir / "model.json").read_text())["conversion"]["folds"]
        feed = model_layout(volume, "NDHWC")
        for _ in range(repeat + 1):
            started = time.perf_counter()
            outputs = []
            for record in records:  # as SHiVAi: load each fold, predict, next
                tf.keras.backend.clear_session()
                layer = tf.saved_model.load(str(model_dir / record["source"])).signatures["serving_default"]
                name = list(layer.structured_input_signature[1])[0]
                result = layer(**{name: tf.constant(feed)})
                outputs.append(result[sorted(result)[0]].numpy())
            sum(outputs) / len(outputs)
            times.append(time.perf_counter() - started)
        provider = "TensorFlow " + ("GPU" if backend == "tf-gpu" else "CPU")
    else:
        device, precision = {"ort-cpu": ("cpu", "fp32"), "ort-cuda": ("cuda", "fp32"), "ort-cuda-fp16": ("cuda", "fp16"),
                             "ort-tensorrt": ("tensorrt", "fp32")}[backend]
        started = time.perf_counter()
        ensemble = FoldEnsemble(model, device, precision=precision)
        for _ in range(repeat + 1):
            ensemble.predict(volume)
            times.append(time.perf_counter() - started)
            started = time.perf_counter()
        provider = f"{ensemble.provider} {ensemble.running_precision}"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"backend": backend, "provider": provider, "first_s": times[0], "warm_s": min(times[1:]),
            "peak_rss_mib": peak, "above_start_mib": peak - baseline, "gpu_peak_mib": _gpu_peak_mib()}


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _gpu_peak_mib() -> float:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return 0.0


def backends() -> list:
    found = ["tf-cpu", "ort-cpu"]
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" in providers:
        found += ["tf-gpu", "ort-cuda", "ort-cuda-fp16"]
    if "TensorrtExecutionProvider" in providers:
        found.append("ort-tensorrt")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box", type=int, nargs=3, default=[160, 214, 176])
    parser.add_argument("--base", type=int, default=8, help="filters of the first level (doubling per level)")
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2, help="warm scans after the first")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], args.repeat)))
        return
    started = time.perf_counter()
    model_dir = build(tuple(args.box), args.base, args.levels, args.folds)
    print(f"model: {model_dir} (built/installed in {time.perf_counter() - started:.0f} s)")
    rows = []
    for backend in backends():
        done = subprocess.run([sys.executable, __file__, "--child", str(model_dir), backend, "--repeat",
                               str(args.repeat)], capture_output=True, text=True)
        if done.returncode:
            print(f"{backend}: failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    tf_cpu = next((r for r in rows if r["backend"] == "tf-cpu"), None)
    print(f"{'backend':14} {'runs on':28} {'first s':>8} {'warm s':>8} {'x TF CPU':>9} {'peak RSS MiB':>13} "
          f"{'GPU MiB':>8}")
    for r in rows:
        ratio = f"{tf_cpu['warm_s'] / r['warm_s']:.2f}" if tf_cpu else "-"
        print(f"{r['backend']:14} {r['provider']:28} {r['first_s']:8.2f} {r['warm_s']:8.2f} {ratio:>9} "
              f"{r['peak_rss_mib']:13.0f} {r['gpu_peak_mib']:8.0f}")


if __name__ == "__main__":
    main()
