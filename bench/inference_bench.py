"""Time per scan and peak memory of a SHIVA-sized 3-fold model: TF/Keras `predict` against onnxruntime.

    python bench/inference_bench.py [--box 160 214 176] [--base 8] [--levels 4] [--folds 3]
                                    [--repeat 2] [--rounds 2] [--backends B ...] [--json FILE]

Builds (once, cached in bench/out/inference/) the stand-in of Testing/Python/shivaweights.py at full
size with random weights (the last bias placed so that a few voxels of the phantom pass 0.5, as
CMBs would), as Keras `.h5` folds (the SHIVA-CMB v1 form) installed through
`shivacmb models install` (so the ONNX folds are exactly what users get), and its int8 copy
(`models verify --precision int8` makes the same), then runs every backend in its own fresh process
on the same normalised phantom box:

- ``tf-cpu`` / ``tf-gpu``: each fold loaded with Keras (``compile=False``) and run by
  ``model.predict`` (batch of one), the mean of the folds: what the SHiVAi pipeline runs;
- ``ort-default``: :class:`FoldEnsemble` as ``shivacmb segment`` uses it with the default install and
  ``--device auto`` (OpenVINO, every fold in one graph, on x86-64 Linux and Windows; onnxruntime's own
  kernels elsewhere); ``ort-int8``: the same with the model's int8 copy, run without the verification
  `segment` asks for (this random-weight model fails it: its detections are specks at the threshold);
- ``ort-cpu`` (onnxruntime's own CPU kernels, one session per fold), ``ort-openvino-bf16`` (OpenVINO,
  bfloat16) and, by name, ``ort-openvino`` (the same as ``ort-default`` where OpenVINO is the default) and
  ``ort-cpu-fp16`` (each fold narrowed to fp16); with onnxruntime-gpu ``ort-cuda``, ``ort-cuda-fp16``,
  ``ort-tensorrt``;
- ``segment-default``: the ``shivacmb segment`` command as a user runs it (a fresh process per scan,
  default device and precision) on a 1 mm phantom scan: wall time, its network stage (sessions
  included) and the peak resident memory of the whole process;
- ``segment-int8`` / ``segment-cpu`` / ``segment-cpu-bf16`` / ``segment-gpu``: the whole ``segment`` of that
  scan in this process (read, mask, preprocess, network, postprocess, location, write), sessions kept.

Per backend: the first scan (model loading, session start, engine build included), the best of
``--repeat`` warm scans, the peak resident memory of the process once its input is ready, the
backend's own part of it (that peak less the resident memory when the input was ready: library,
model, working memory), the rise of GPU memory for GPU runs, and the ratios to TF in the same run
(time: TF's warm scan over the backend's network time; memory: the backend's own peak over TF's). ONNX
rows other than ``ort-cpu`` are compared with ONNX CPU fp32 in the first round (largest difference
of the fold-mean probability, voxels thresholded differently outside the +-1e-3 band, +-1e-2 for
reduced precisions, whose components above threshold are paired with fp32's too); the TF
against ONNX parity of every fold is the install's, recorded in model.json and printed. ``--rounds`` runs the backends in turn that many times and keeps
each one's best warm scan, so a machine shared with other work slows both sides alike. Never
asserts timings.

Every child process starts as the ``shivacmb`` command does (``release_freed_memory``: glibc serves
allocations over 1 MiB by mmap, so freed volumes leave the process); the TF rows run under the same
setting, so that both sides are measured alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "Testing" / "Python"))
sys.path.insert(0, str(REPO / "SHIVACMB"))
OUT = HERE / "out" / "inference"
CACHE = OUT / "cache"  # the int8 copy and its calibration phantoms (the bench's own SHIVACMB_CACHE)
ORT = {"ort-default": ("auto", "fp32", None),  # device, precision, providers (None: the device's plan)
       "ort-int8": ("auto", "int8", None),
       "ort-cpu": ("cpu", "fp32", ["CPUExecutionProvider"]),
       "ort-openvino": ("cpu", "fp32", ["OpenVINOExecutionProvider", "CPUExecutionProvider"]),
       "ort-openvino-bf16": ("cpu", "bf16", ["OpenVINOExecutionProvider", "CPUExecutionProvider"]),
       "ort-cuda": ("cuda", "fp32", None), "ort-cuda-fp16": ("cuda", "fp16", None),
       "ort-tensorrt": ("tensorrt", "fp32", None)}
CPU_CANDIDATES = ("ort-cpu-fp16",)  # measured to decide, not offered by `segment`
SEGMENT = {"segment-int8": ("auto", "int8"), "segment-cpu": ("cpu", "fp32"), "segment-cpu-bf16": ("cpu", "bf16"),
           "segment-gpu": ("auto", "fp32")}
COMMAND = "segment-default"  # the command in a fresh process per scan
CHECK_FIELDS = ("max_diff_vs_fp32", "differing_outside_band", "detections")  # of the first round
PHANTOM_SEED = 424243  # a 1 mm SWI phantom for the `segment` rows


def build(box, base: int, levels: int, folds: int) -> Path:
    """The installed ONNX model (its Keras originals in source/), built once per size."""
    tag = f"{'x'.join(map(str, box))}-b{base}-l{levels}-f{folds}-h5"
    home = OUT / tag / "models"
    if (home / "bench" / "model.json").is_file():
        return home / "bench"
    os.environ["SHIVACMB_MODELS"] = str(home)
    import shivaweights
    from SHIVACMBLib.modelstore import blobmodel
    from SHIVACMBLib.inference import model_layout
    from SHIVACMBLib.modelstore.models import read_descriptor
    from SHIVACMBLib.modelstore.official import install
    from SHIVACMBLib.modelstore.parity import parity_input

    weights = OUT / tag / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    calibration = model_layout(parity_input(read_descriptor(blobmodel.write_model(weights / "box", shape=box))), "NDHWC")
    paths = []
    for index in range(folds):
        path = weights / f"fold_{index}.h5"
        shivaweights.shiva_unet(box, base=base, levels=levels, seed=index, calibrate=calibration).save(path)
        paths.append(path)
    archive = shivaweights.official_zip(OUT / tag / "weights.zip", paths)
    install(archive, name="bench")
    return home / "bench"


def int8_copy(model_dir: Path) -> None:
    """The model's int8 copy, made once (as `models verify --precision int8` makes it)."""
    from SHIVACMBLib.modelstore import precisions
    from SHIVACMBLib.modelstore.models import read_descriptor

    model = read_descriptor(model_dir)
    if not precisions.int8_file(model).is_file():
        precisions.make_int8(model)


def child(model_dir: Path, backend: str, repeat: int, check: bool) -> dict:
    """One backend in this (fresh) process: first scan, best warm scan, peak memory (and parity on request)."""
    from SHIVACMBLib.modelstore.models import read_descriptor
    from SHIVACMBLib.modelstore.parity import parity_input

    model = read_descriptor(model_dir)
    volume = parity_input(model)
    ready = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak (VmHWM) from here: the phantom's making is not counted
    gpu = GpuPeak()
    if backend == COMMAND:
        return _command(model_dir, repeat)
    if backend.startswith("tf"):
        run, provider = _keras_predict(model_dir, volume, gpu=backend == "tf-gpu")
    elif backend in ORT:
        run, provider = _onnxruntime(model, volume, *ORT[backend])
    elif backend in CPU_CANDIDATES:
        run, provider = _cpu_candidate(model, volume, backend.rsplit("-", 1)[1])
    else:
        run, provider = _segment(model, *SEGMENT[backend])
    times = []
    for _ in range(repeat + 1):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    peak = _rss_kib("VmHWM")
    row = {"backend": backend, "provider": provider(), "first_s": times[0], "warm_s": min(times[1:]),
           "peak_rss_mib": peak / 1024, "own_mib": (peak - ready) / 1024, "gpu_mib": gpu.stop()}
    if backend in SEGMENT:
        row["stages_s"] = result.run.timings_s  # of the last warm scan
        row["network_s"] = result.run.timings_s["inference"]
    elif check and result is not None and backend != "ort-cpu":
        from SHIVACMBLib.inference import CPU, FoldEnsemble
        from SHIVACMBLib.modelstore.parity import FP32_TOLERANCE, REDUCED_TOLERANCE, compare

        precision = ORT[backend][1] if backend in ORT else backend.rsplit("-", 1)[1]  # CPU candidates: int8, fp16
        reduced = precision != "fp32"
        reference = FoldEnsemble(model, "cpu", providers=[CPU]).predict(volume)[0]
        parity = compare(reference, result, model.threshold, REDUCED_TOLERANCE if reduced else FP32_TOLERANCE,
                         detections=reduced)
        row.update(max_diff_vs_fp32=parity.max_abs_diff, differing_outside_band=parity.differing_outside_band)
        if parity.detections:
            row["detections"] = parity.detections.text()
    return row


def _command(model_dir: Path, repeat: int) -> dict:
    """`shivacmb segment` with the default device and precision, a fresh process per scan, as a user runs it:
    wall time, the network stage (sessions included), the peak resident memory of each process."""
    scan = _phantom_scan()
    runs = []
    for number in range(repeat + 1):
        out = OUT / "command-results"
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "SHIVACMBLib.cli", "segment", str(scan), "--out", str(out),
                                    "--model", str(model_dir), "--progress", "none"], stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        if status:
            raise SystemExit(f"shivacmb segment exited with status {status}")
        record = json.loads((out / scan.name[:-7] / "run.json").read_text(encoding="utf-8"))
        runs.append({"wall_s": time.perf_counter() - started, "peak_mib": usage.ru_maxrss / 1024,
                     "stages_s": record["timings_s"], "ran": f"{record['inference']['provider']} "
                                                             f"{record['inference']['precision']}"})
    best = min(runs, key=lambda r: r["wall_s"])
    peak = max(r["peak_mib"] for r in runs)
    return {"backend": COMMAND, "provider": f"`shivacmb segment` on {best['ran']}", "first_s": runs[0]["wall_s"],
            "warm_s": best["wall_s"], "network_s": best["stages_s"]["inference"], "peak_rss_mib": peak,
            "own_mib": peak, "gpu_mib": 0.0, "stages_s": best["stages_s"]}


def _phantom_scan() -> Path:
    """The 1 mm SWI phantom of the `segment` rows, made once."""
    from SHIVACMBLib.devtools.synthetic import make_phantom, write_phantom

    scan = OUT / f"phantom-{PHANTOM_SEED}" / f"phantom-{PHANTOM_SEED}.nii.gz"
    if not scan.is_file():
        write_phantom(make_phantom(PHANTOM_SEED, "swi", (1.0, 1.0, 1.0), n_cmb=6), scan.parent, scan.name[:-7])
    return scan


def _rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, KiB (Linux)."""
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _keras_predict(model_dir: Path, volume, gpu: bool):
    """One scan as SHiVAi runs it: Keras folds (loaded by the first scan), ``predict``, the mean."""
    import tensorflow as tf

    devices = tf.config.list_physical_devices("GPU")
    if not gpu:
        tf.config.set_visible_devices([], "GPU")
    elif not devices:
        raise SystemExit("TensorFlow sees no GPU (tensorflow-cpu, or no CUDA build): tf-gpu not measured")
    for device in devices if gpu else []:
        tf.config.experimental.set_memory_growth(device, True)  # memory used, not TF's whole-GPU reservation
    import keras
    from SHIVACMBLib.inference import model_layout

    records = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))["conversion"]["folds"]
    feed = model_layout(volume, "NDHWC")
    loaded: List = []

    def run() -> None:  # no parity check: the install compared every fold with its ONNX conversion
        if not loaded:
            loaded.extend(keras.models.load_model(str(model_dir / r["source"]), compile=False) for r in records)
        outputs = [fold.predict(feed, batch_size=1, verbose=0) for fold in loaded]
        sum(outputs) / len(outputs)

    return run, lambda: f"TensorFlow {tf.__version__} {'GPU' if gpu else 'CPU'}"


def _onnxruntime(model, volume, device: str, precision: str, providers: Optional[List[str]]):
    """One scan through the fold ensemble `segment` uses (sessions opened by the first scan; reduced precisions
    run without the verification `segment` asks for)."""
    from SHIVACMBLib.inference import FoldEnsemble

    ensemble: List = []

    def run():
        if not ensemble:
            ensemble.append(FoldEnsemble(model, device, precision=precision, providers=providers, unverified=True))
        return ensemble[0].predict(volume)[0]

    return run, lambda: f"{ensemble[0].provider} {ensemble[0].running_precision}"


def _cpu_candidate(model, volume, precision: str):
    """The CPU ensemble with every fold narrowed to fp16 (sessions made by the first scan)."""
    import onnx
    from SHIVACMBLib.inference import CPU, FoldEnsemble, create_session
    from SHIVACMBLib.modelstore.onnxfloat import to_float16

    ensemble: List = []

    def run():
        if not ensemble:
            cpu = FoldEnsemble(model, "cpu", providers=[CPU])
            cpu.sessions = [create_session(to_float16(onnx.load(str(fold.path))).SerializeToString(), [CPU],
                                           cpu.threads) for fold in model.folds]
            ensemble.append(cpu)
        return ensemble[0].predict(volume)[0]

    return run, lambda: f"{CPU} {precision}"


def _segment(model, device: str, precision: str):
    """The whole `segment` of a 1 mm phantom scan (sessions kept by the process between scans; reduced precisions
    without the verification `segment` asks for)."""
    from SHIVACMBLib.inference import FoldEnsemble
    from SHIVACMBLib.pipeline import SegmentOptions, segment

    scan = _phantom_scan()
    out = OUT / "segment-results"
    ensemble: List = []

    def run():
        if not ensemble:
            ensemble.append(FoldEnsemble(model, device, precision=precision, unverified=True))
        return segment(scan, out, SegmentOptions(device=device, precision=precision), model=model,
                       ensemble=ensemble[0])

    return run, lambda: f"segment on {ensemble[0].provider} {ensemble[0].running_precision}"


class GpuPeak:
    """Largest rise of used GPU memory (nvidia-smi, sampled every 0.2 s) while it runs; 0 without a GPU."""

    def __init__(self) -> None:
        self.start = _gpu_used_mib()
        self.peak = self.start
        self.done = threading.Event()
        if self.start is not None:
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self.done.wait(0.2):
            self.peak = max(self.peak, _gpu_used_mib() or 0.0)

    def stop(self) -> float:
        self.done.set()
        return 0.0 if self.start is None else max(self.peak, _gpu_used_mib() or 0.0) - self.start


def _gpu_used_mib() -> Optional[float]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def backends() -> List[str]:
    """What this machine can run: the CPU rows always, the GPU rows where onnxruntime has the provider."""
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    found = ["tf-cpu", "ort-cpu", "ort-default", "ort-int8"]
    if "OpenVINOExecutionProvider" in providers:
        found.append("ort-openvino-bf16")
    if "CUDAExecutionProvider" in providers:
        found += ["tf-gpu", "ort-cuda", "ort-cuda-fp16"]
    if "TensorrtExecutionProvider" in providers:
        found.append("ort-tensorrt")
    found += [COMMAND, "segment-int8"]
    return found + (["segment-gpu"] if "CUDAExecutionProvider" in providers else [])


def machine() -> Dict[str, str]:
    """Date, device and versions for the table's header."""
    versions = {}
    for name in ("tensorflow", "keras", "tf2onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnx",
                 "numpy"):
        try:
            from importlib.metadata import version

            versions[name] = version(name if name != "tensorflow" else _tf_distribution())
        except Exception:  # noqa: BLE001 - a package that is not installed is left out
            continue
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() if _gpu_used_mib() is not None else "none"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": f"{cpu}, {len(os.sched_getaffinity(0))} cores usable", "gpu": gpu,
            "load average": " ".join(f"{v:.1f}" for v in os.getloadavg()), "python": platform.python_version(),
            "versions": ", ".join(f"{k} {v}" for k, v in versions.items())}


def _tf_distribution() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("tensorflow", "tensorflow-cpu"):
        try:
            version(name)
            return name
        except PackageNotFoundError:
            continue
    return "tensorflow"


def best_rows(rounds: List[List[dict]]) -> List[dict]:
    """Per backend, the run with the best warm scan over all rounds (order of first appearance), with the
    parity check of the first round."""
    best: Dict[str, dict] = {}
    checked = {r["backend"]: {k: r[k] for k in CHECK_FIELDS if k in r} for r in rounds[0]} if rounds else {}
    for row in (r for runs in rounds for r in runs):
        if row["backend"] not in best or row["warm_s"] < best[row["backend"]]["warm_s"]:
            best[row["backend"]] = row | checked.get(row["backend"], {})
    return list(best.values())


def table(rows: List[dict], say: Callable[[str], None] = print) -> None:
    """The Markdown table: times, ratios to TF on the same device kind (of the network: a `segment` row's network
    stage), memory (the command's whole process against TF's peak)."""
    by = {r["backend"]: r for r in rows}
    say("| backend | runs on | first scan s | warm scan s | network s | x faster than TF CPU | x faster than TF GPU "
        "| peak RSS MiB | own MiB | own / TF CPU | peak / TF CPU peak | GPU MiB | max diff vs ONNX CPU fp32 |")
    say("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        network = r.get("network_s", r["warm_s"])
        speed = {ref: f"{by[ref]['warm_s'] / network:.2f}" if ref in by else "-" for ref in ("tf-cpu", "tf-gpu")}
        memory = f"{r['own_mib'] / by['tf-cpu']['own_mib']:.2f}" if "tf-cpu" in by and r["backend"] != COMMAND else "-"
        peak = f"{r['peak_rss_mib'] / by['tf-cpu']['peak_rss_mib']:.2f}" if "tf-cpu" in by else "-"
        differs = (f"{r['max_diff_vs_fp32']:.1e} ({r['differing_outside_band']} vx)" if "max_diff_vs_fp32" in r
                   else "-")
        if "detections" in r:
            differs += f"; {r['detections']}"
        say(f"| {r['backend']} | {r['provider']} | {r['first_s']:.2f} | {r['warm_s']:.2f} | {network:.2f} | "
            f"{speed['tf-cpu']} | {speed['tf-gpu']} | {r['peak_rss_mib']:.0f} | {r['own_mib']:.0f} | {memory} | "
            f"{peak} | {r['gpu_mib']:.0f} | {differs} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--box", type=int, nargs=3, default=[160, 214, 176])
    parser.add_argument("--base", type=int, default=8, help="filters of the first level (doubling per level)")
    parser.add_argument("--levels", type=int, default=4)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2, help="warm scans after the first")
    parser.add_argument("--rounds", type=int, default=2, help="times every backend runs, in turn; best kept")
    parser.add_argument("--backends", nargs="+", metavar="B",
                        help="subset to run (default: all this machine can: tf-cpu ort-cpu ort-default ort-int8 "
                             "[ort-openvino-bf16] [tf-gpu ort-cuda ort-cuda-fp16 ort-tensorrt] segment-default "
                             "segment-int8 [segment-gpu]; by name only: ort-openvino ort-cpu-fp16 "
                             "segment-cpu segment-cpu-bf16)")
    parser.add_argument("--json", type=Path, help="also write the machine and the rows to this file")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "BACKEND"), help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        from SHIVACMBLib.cli import release_freed_memory

        release_freed_memory()  # as the `shivacmb` command starts; every row, TF included, runs so
        print(json.dumps(child(Path(args.child[0]), args.child[1], args.repeat, args.check)))
        return
    os.environ["SHIVACMB_CACHE"] = str(CACHE)  # children inherit it
    started = time.perf_counter()
    model_dir = build(tuple(args.box), args.base, args.levels, args.folds)
    if {"ort-int8", "segment-int8"} & set(args.backends or backends()):
        int8_copy(model_dir)
    print(f"model: {model_dir} (built/installed in {time.perf_counter() - started:.0f} s)")
    parity = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))["conversion"]["parity"]["folds"]
    print("conversion parity at install (each fold, TF against ONNX CPU): max abs diff "
          + ", ".join(f"{p['max_abs_diff']:.1e}" for p in parity))
    rounds = []
    for number in range(args.rounds):
        runs = []
        for backend in args.backends or backends():
            done = subprocess.run([sys.executable, __file__, "--child", str(model_dir), backend, "--repeat",
                                   str(args.repeat)] + (["--check"] if number == 0 else []),
                                  capture_output=True, text=True)
            if done.returncode:
                print(f"round {number + 1}, {backend}: not measured: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
                continue
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {number + 1}, {backend}: warm {runs[-1]['warm_s']:.2f} s, first {runs[-1]['first_s']:.2f} s")
        rounds.append(runs)
    about = machine()
    print("\n" + "\n".join(f"- {key}: {value}" for key, value in about.items()))
    print(f"- model: {args.folds} folds, box {'x'.join(map(str, args.box))}, base {args.base}, levels {args.levels}; "
          f"{args.repeat} warm scans per run, best of {args.rounds} rounds\n")
    rows = best_rows(rounds)
    table(rows)
    for row in rows:
        if "stages_s" in row:
            print(f"\n{row['backend']}, stages of a warm scan (s): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in row["stages_s"].items()))
    if args.json:
        args.json.write_text(json.dumps({"machine": about, "args": vars(args) | {"json": str(args.json)},
                                         "rows": rows, "rounds": rounds}, indent=2, default=str) + "\n",
                             encoding="utf-8")


if __name__ == "__main__":
    main()
