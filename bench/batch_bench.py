"""Scans per hour of `shivacmb batch` against `shivacmb segment` run once per scan in a shell loop.

    python bench/batch_bench.py [--n 12] [--kind atlas|head] [--seed 700000] [--workers 1 2] [--rounds 1]
                                [--model NAME|DIR] [--precision fp32|bf16]

Makes (once, cached in bench/out/batch/) N phantom scans (``--kind``, see :func:`phantoms`), then, on
the same scans in the same run, each in a fresh output folder:

- ``loop``: ``for f in scans/*.nii.gz; do shivacmb segment "$f" --out DIR; done`` (a new process per
  scan: imports, model sessions, the scan);
- ``batch-wN``: ``shivacmb batch scans --out DIR --workers N`` for each N of ``--workers`` (a local
  dask cluster; its start is counted);
- ``batch-default``: ``shivacmb batch`` with the worker count it picks for this machine (left out when
  that count is one of ``--workers``).

Prints wall time, scans per hour and the ratio to the loop, the largest peak resident memory of a
process of each mode (a `segment` process of the loop, a batch worker) against the memory `shivacmb
batch` plans per worker, and checks that every mode found the same CMBs (count per scan). ``--rounds``
runs the modes in turn that many times and keeps each one's best, so a machine shared with other work
slows every mode alike. Never asserts timings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "batch"
SHIVACMB = [sys.executable, "-m", "SHIVACMBLib.cli"]


def phantoms(n: int, seed: int, kind: str) -> Path:
    """N scans, made once: ``atlas`` phantoms (the MNI template in T2* contrast on a random clinical grid,
    8 CMBs: the atlas registration of the location step converges, as on real heads) or ``head``
    phantoms of `shivacmb phantom` (random contrast and voxel size; an ellipsoid brain, on which
    that registration fails its checks)."""
    folder = OUT / f"phantoms-{kind}-{seed}-{n}"
    if len(list(folder.glob("*.nii.gz"))) >= n:
        return folder
    if kind == "head":
        subprocess.run(SHIVACMB + ["phantom", "--out", str(folder), "--n", str(n), "--seed", str(seed)], check=True)
        return folder
    sys.path.insert(0, str(HERE.parent / "Testing" / "Python"))
    import numpy as np
    import SimpleITK as sitk
    from atlas_phantoms import make_atlas_phantom, random_grid

    folder.mkdir(parents=True, exist_ok=True)
    for number in range(seed, seed + n):
        rng = np.random.default_rng(number)
        _, spacing, direction = random_grid(rng)
        phantom = make_atlas_phantom(number, spacing, direction, n_cmb=8, radius=float(rng.uniform(1.5, 3.0)))
        sitk.WriteImage(phantom.image, str(folder / f"atlas-{number}.nii.gz"))
    return folder


def run_mode(mode: str, scans: Path, model: Optional[str], precision: str) -> Dict[str, object]:
    """One mode from a fresh output folder: wall seconds and CMB count per scan."""
    out = OUT / "results" / mode
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = (["--model", model] if model else []) + ["--precision", precision]
    peaks: Dict[int, float] = {}
    started = time.perf_counter()
    if mode == "loop":
        for scan in sorted(scans.glob("*.nii.gz")):
            watched(SHIVACMB + ["segment", str(scan), "--out", str(out), "--progress", "none"] + extra, mode, peaks)
    else:
        listing = out.parent / "scans.csv"  # the scans only (the phantoms' folder also holds their truth maps)
        listing.write_text("scan_id,image\n" + "".join(f"{p.name[:-7]},{p}\n" for p in sorted(scans.glob("*.nii.gz"))))
        workers = [] if mode == "batch-default" else ["--workers", mode.rsplit("w", 1)[1]]
        watched(SHIVACMB + ["batch", str(listing), "--out", str(out), "--progress", "none"] + workers + extra, mode,
                peaks)
    seconds = time.perf_counter() - started
    counts = {p.parent.name: len(p.read_text().splitlines()) - 1 for p in sorted(out.glob("*/findings.tsv"))}
    runs = [json.loads(p.read_text()) for p in out.glob("*/run.json")]
    ran = {f"{r['inference']['provider']} {r['inference']['precision']}" for r in runs}
    located = sum(r.get("location", {}).get("source") == "atlas" and not r["location"].get("failed") for r in runs)
    return {"mode": mode, "seconds": seconds, "counts": counts, "ran": ", ".join(sorted(ran)), "located": located,
            "peak_mib": max(peaks.values(), default=0.0)}


def watched(command: List[str], mode: str, peaks: Dict[int, float]) -> None:
    """Run ``command``, noting every 0.2 s the peak resident memory (VmHWM) of it and each process it started."""
    import psutil

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            family = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for member in family:
            try:
                status = Path(f"/proc/{member.pid}/status").read_text()
            except OSError:
                continue
            hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
            peaks[member.pid] = max(peaks.get(member.pid, 0.0), hwm / 1024)
        time.sleep(0.2)
    if process.wait():
        raise SystemExit(f"{mode}: {process.stderr.read().strip() if process.stderr else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12, help="scans (default: %(default)s)")
    parser.add_argument("--kind", choices=("atlas", "head"), default="atlas",
                        help="phantoms: atlas-made heads or `shivacmb phantom` heads (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=700000, help="seed of the first phantom (default: %(default)s)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts of the scaling curve")
    parser.add_argument("--rounds", type=int, default=1, help="times every mode runs, in turn; best kept")
    parser.add_argument("--model", help="model name or folder (default: the embedded default model)")
    parser.add_argument("--precision", default="fp32", help="passed to every mode (bf16, int8: used where `shivacmb "
                        "models verify --precision` passed on this computer; default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent / "SHIVACMB"))
    scans = phantoms(args.n, args.seed, args.kind)
    from SHIVACMBLib.cohort.batch import WORKER_MEMORY_GIB, cpu_cores_per_worker, default_workers
    from SHIVACMBLib.inference import available_cores

    default = default_workers(available_cores(), cores_per_worker=cpu_cores_per_worker())  # `batch`'s, without GPU
    modes = ["loop"] + [f"batch-w{w}" for w in args.workers] + ([] if default in args.workers else ["batch-default"])
    best: Dict[str, Dict[str, object]] = {}
    for number in range(args.rounds):
        for mode in modes:
            row = run_mode(mode, scans, args.model, args.precision)
            print(f"round {number + 1}, {mode}: {row['seconds']:.1f} s", flush=True)
            if mode not in best or row["seconds"] < best[mode]["seconds"]:
                best[mode] = row
    loop = best["loop"]
    print(f"\n- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print(f"- machine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), Python "
          f"{platform.python_version()}, load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"- scans: {args.n} {args.kind} phantoms (seeds {args.seed}..{args.seed + args.n - 1}), model "
          f"{args.model or 'default'}, precision {args.precision}; best of {args.rounds} round(s)\n")
    print(f"- `shivacmb batch` without --workers runs {default} worker(s) here")
    print(f"- atlas registration of the location step passed its checks in {loop['located']} of {args.n} scans\n")
    print(f"- memory `shivacmb batch` plans per worker: {WORKER_MEMORY_GIB} GiB ({WORKER_MEMORY_GIB * 1024} MiB)\n")
    print("| mode | network ran on | wall s | s per scan | scans per hour | x loop | largest process peak MiB "
          "| same CMB counts as loop |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    rows: List[Dict[str, object]] = []
    for mode in modes:
        row = best[mode]
        seconds = float(row["seconds"])
        rows.append(dict(row, scans_per_hour=3600 * args.n / seconds, ratio=float(loop["seconds"]) / seconds))
        print(f"| {mode} | {row['ran']} | {seconds:.1f} | {seconds / args.n:.2f} | {3600 * args.n / seconds:.0f} | "
              f"{float(loop['seconds']) / seconds:.2f} | {row['peak_mib']:.0f} | "
              f"{'yes' if row['counts'] == loop['counts'] else 'NO'} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2,
                                        default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
