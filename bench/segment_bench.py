"""Wall time per stage and peak memory of `segment` on one SWI-sized scan, on the CPU.

    python bench/segment_bench.py [--size 512 512 150] [--spacing 0.43 0.43 1.0] [--model DIR]

Makes (once, cached in bench/out/) a phantom head of the given size, stored oblique as
int16 NIfTI like a typical SWI, then runs the pipeline in a fresh process and prints, per
stage, the wall time and the peak resident memory above the process's baseline (Linux:
/proc/self/clear_refs resets the high-water mark between stages). The network's own time
and memory are reported apart: the figures that matter are the rest.

Memory is measured twice, in two fresh processes: as the `shivacmb` command runs (glibc
serves allocations over 1 MiB by mmap, so freed volumes leave the resident set and the
peaks are the data really held), and with glibc's default allocator (freed heap stays
resident and reusable: what a process embedding the library without that setting sees).

Printed side by side, from the same run: the budgets of the issue (5 s without the network and
the MARS location step, whose time is printed apart; 3 float32 copies of the native volume) and
a reference run that only reads the scan and casts it to float32, the floor any pipeline must pay.

Then the whole command with the embedded default model (network included) on a 1 mm
phantom, as a user runs it: `shivacmb segment` in a child process limited to the CPU, its wall
time and peak resident memory (getrusage of the child) against the budgets of 30 s and 3 GB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "Testing" / "Python"))
sys.path.insert(0, str(REPO / "SHIVACMB"))

TIME_BUDGET_S = 5.0
COPIES_BUDGET = 3.0
END_TO_END_BUDGET_S = 30.0
END_TO_END_BUDGET_GB = 3.0
STAGES = ("read", "mask", "preprocess", "inference", "postprocess", "location", "write")


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def make_scan(path: Path, size, spacing) -> None:
    import numpy as np
    import SimpleITK as sitk

    import phantoms

    fov = np.asarray(size) * np.asarray(spacing)
    scene = phantoms.head_scene()
    scale = min(fov[0] / 220.0, fov[1] / 260.0, fov[2] / 180.0, 1.0)
    scene.brain_radii = tuple(r * scale for r in scene.brain_radii)
    scene.spheres = [phantoms.Sphere(tuple(c * scale for c in s.centre), s.radius) for s in scene.spheres]
    grid = phantoms.grid_around((0.0, 0.0, 0.0), fov, spacing, phantoms.rotation((1.0, 0.0, 0.0), 12.0))
    grid = type(grid)(tuple(size), grid.spacing, grid.origin, grid.direction)
    image = phantoms.render(scene, grid, seed=7)
    sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16), str(path), True)


def child(scan: Path, model: Path, out: Path, allocator: str) -> dict:
    """Runs in a fresh process: measures the pipeline, then the read-only reference."""
    if allocator == "command":
        from SHIVACMBLib.cli import release_freed_memory

        release_freed_memory()
    import SimpleITK as sitk

    from SHIVACMBLib.inference import get_ensemble
    from SHIVACMBLib.modelstore.models import load_model
    from SHIVACMBLib.pipeline import SegmentOptions, segment

    model_d = load_model(str(model))
    ensemble = get_ensemble(model_d, "cpu")
    baseline = rss_kib()
    peaks = {}
    state = {"stage": None}

    def progress(stage: str, fraction: float, message: str) -> None:
        if stage != state["stage"]:
            if state["stage"] is not None:
                peaks[state["stage"]] = rss_kib("VmHWM") - baseline
            reset_peak()
            state["stage"] = stage

    reset_peak()
    result = segment(scan, out, SegmentOptions(model=str(model), device="cpu"), progress=progress,
                     model=model_d, ensemble=ensemble)
    peaks[state["stage"]] = max(peaks.get(state["stage"], 0), rss_kib("VmHWM") - baseline)
    pipeline_peak = max(peaks.values())

    reset_peak()
    reference_base = rss_kib()
    t0 = time.perf_counter()
    image = sitk.Cast(sitk.ReadImage(str(scan)), sitk.sitkFloat32)
    reference_s = time.perf_counter() - t0
    reference_kib = rss_kib("VmHWM") - reference_base
    size = image.GetSize()
    del image
    return {"timings": result.run.timings_s, "peaks_kib": peaks, "pipeline_peak_kib": pipeline_peak,
            "reference_s": reference_s, "reference_kib": reference_kib, "size": size,
            "cmb_count": len(result.findings), "provider": result.run.provider}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 150])
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.43, 0.43, 1.0])
    parser.add_argument("--model", type=Path, default=REPO / "Testing" / "models" / "dark-blob-detector")
    parser.add_argument("--child", nargs=4, metavar=("SCAN", "MODEL", "OUT", "ALLOCATOR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*map(Path, args.child[:3]), args.child[3])))
        return

    work = HERE / "out"
    work.mkdir(exist_ok=True)
    scan = work / f"swi_{'x'.join(map(str, args.size))}_{'x'.join(map(str, args.spacing))}.nii.gz"
    if not scan.exists():
        print(f"making {scan.name} ...", flush=True)
        make_scan(scan, args.size, args.spacing)
    runs = {}
    for allocator in ("command", "default"):
        run = subprocess.run([sys.executable, __file__, "--child", str(scan), str(args.model), str(work / "results"),
                              allocator], capture_output=True, text=True, check=True)
        runs[allocator] = json.loads(run.stdout.strip().splitlines()[-1])
    data = runs["command"]
    voxels = 1
    for s in data["size"]:
        voxels *= s
    copy_kib = voxels * 4 / 1024
    t = data["timings"]
    print(f"scan: {'x'.join(map(str, data['size']))} int16 NIfTI, {args.spacing} mm, oblique 12 deg "
          f"({voxels / 1e6:.1f} M voxels; one float32 copy = {copy_kib / 1024:.0f} MiB); "
          f"{data['cmb_count']} CMBs, {data['provider']}")
    print(f"{'stage':<12}{'wall s':>8}{'peak MiB':>10}{'float32 copies':>16}")
    for stage in STAGES:
        peak = data["peaks_kib"].get(stage, 0)
        note = {"inference": "  (network: excluded below)",
                "location": "  (atlas registration: apart below)"}.get(stage, "")
        print(f"{stage:<12}{t.get(stage, 0):>8.2f}{peak / 1024:>10.0f}{peak / copy_kib:>16.2f}{note}")
    # the 5 s budget is the core pipeline's; the MARS location step came later with its own budget
    # (bench/location_bench.py) and is printed apart
    without_network = t["total"] - t["inference"] - t.get("location", 0)

    def held(run: dict) -> float:
        return max(v for k, v in run["peaks_kib"].items() if k != "inference") / copy_kib

    copies = held(data)
    print(f"{'total':<12}{t['total']:>8.2f}")
    print()
    print(f"pipeline without the network and the location step: {without_network:.2f} s  "
          f"vs budget {TIME_BUDGET_S:.0f} s: ratio {without_network / TIME_BUDGET_S:.2f}")
    print(f"MARS location step (atlas registration; budget and figures: bench/location_bench.py): "
          f"{t.get('location', 0):.2f} s")
    print(f"peak memory held above baseline (stages other than the network): {copies:.2f} float32 copies  "
          f"vs budget {COPIES_BUDGET:.0f}: ratio {copies / COPIES_BUDGET:.2f}")
    print(f"  with glibc's default allocator instead (freed heap stays resident): {held(runs['default']):.2f} copies; "
          f"network stage {runs['default']['peaks_kib']['inference'] / copy_kib:.2f} copies")
    print(f"reference run (read + cast to float32, same process): {data['reference_s']:.2f} s, "
          f"{data['reference_kib'] / copy_kib:.2f} copies -> pipeline/reference: "
          f"time {without_network / data['reference_s']:.1f}x, memory {copies / (data['reference_kib'] / copy_kib):.2f}x")
    end_to_end(work)


def end_to_end(work: Path) -> None:
    """`shivacmb segment` with the default model on a 1 mm phantom: wall time and peak RSS of the child."""
    from SHIVACMBLib.modelstore.models import DEFAULT_MODEL, ModelError, find_model
    from SHIVACMBLib.devtools.synthetic import make_phantom, write_phantom

    try:
        find_model(DEFAULT_MODEL)
    except ModelError as err:
        print(f"\ndefault model not installed, end-to-end run skipped: {err}")
        return
    scan = work / "phantom_1mm.nii.gz"
    if not scan.exists():
        write_phantom(make_phantom(424243, "swi", (1.0, 1.0, 1.0), n_cmb=6), work, "phantom_1mm")
    command = [str(Path(sys.executable).with_name("shivacmb")), "segment", str(scan), "--device", "cpu",
               "--out", str(work / "results"), "--progress", "none"]
    # a fresh wrapper process, so that the peak is this child's alone (getrusage keeps the max of all children)
    wrapper = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, encoding="utf-8")
    wall = time.perf_counter() - started
    peak_gb = int(done.stderr.strip().splitlines()[-1]) * 1024 / 1e9
    if done.returncode:
        raise SystemExit(f"shivacmb segment failed: {done.stderr.strip()}")
    print(f"\nend to end, default model ({DEFAULT_MODEL}), 1 mm phantom, CPU: {done.stdout.strip().splitlines()[0]}")
    print(f"  wall {wall:.1f} s vs budget {END_TO_END_BUDGET_S:.0f} s: ratio {wall / END_TO_END_BUDGET_S:.2f}")
    print(f"  peak RSS {peak_gb:.2f} GB vs budget {END_TO_END_BUDGET_GB:.0f} GB: "
          f"ratio {peak_gb / END_TO_END_BUDGET_GB:.2f}")


if __name__ == "__main__":
    main()
