"""Time and accuracy of the MARS location step on a fresh set of atlas-made phantoms.

    python bench/location_bench.py [--n 12] [--seed 700000] [--cmbs 13] [--warp MM]

Each phantom is the shipped MNI template with a T2*-like contrast, moved by a random affine
(rotation up to 12 degrees, scaling 0.9-1.1 per axis, shift up to 10 mm), sampled on a random
grid (LPS or RAS storage, axial/sagittal/coronal, oblique up to 20 degrees, 0.8-1.2 mm in plane,
1-3 mm slices), with a bias field, noise and CMBs planted where the atlas region is the same
all around them; ``--warp MM`` adds a smooth random non-linear warp (B-spline control points
about 40 mm apart moved by up to MM per axis: 12 moves brain voxels by 1.5 mm on average and up
to 5 mm, 20 by 2.5 and up to 8 mm), anatomy that no affine matches (Testing/Python/atlas_phantoms.py).
The brain mask is computed as `segment` computes it. Prints, per phantom, the time of `location.locate` (registration included) and
pooled accuracy: MARS area, sub-region, and side for CMBs more than 3 mm from the midline,
against the targets (95 % area, 100 % side; 20 s per scan on two CPU cores).
Run it with two cores (e.g. `taskset -c 0,1`) to compare with the target.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SHIVACMB"))
sys.path.insert(0, str(ROOT / "Testing" / "Python"))

from atlas_phantoms import make_atlas_phantom, random_grid  # noqa: E402
from SHIVACMBLib.location import locate  # noqa: E402
from SHIVACMBLib.preprocess import compute_brain_mask  # noqa: E402

TARGETS = {"area": 0.95, "side": 1.0, "seconds": 20.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--seed", type=int, default=700000)
    parser.add_argument("--cmbs", type=int, default=13, help="CMBs per phantom")
    parser.add_argument("--warp", type=float, default=0.0, help="non-linear warp of each phantom, mm (0: none)")
    args = parser.parse_args()
    area = region = side = total = lateral = deformable = 0
    seconds = []
    for seed in range(args.seed, args.seed + args.n):
        rng = np.random.default_rng(seed)
        name, spacing, direction = random_grid(rng)
        phantom = make_atlas_phantom(seed, spacing, direction, n_cmb=args.cmbs, radius=float(rng.uniform(1.5, 3.0)),
                                     warp_mm=args.warp)
        mask = compute_brain_mask(phantom.scan())
        started = time.perf_counter()
        located = locate(phantom.image, mask.image, phantom.labels, phantom.findings)
        seconds.append(time.perf_counter() - started)
        hits = 0
        for f, (truth_region, truth_area, truth_side, x) in zip(located.findings, phantom.truth):
            hits += f.mars_area == truth_area
            region += f.region == truth_region
            if abs(x) > 3.0:
                lateral += 1
                side += f.side == truth_side
        area += hits
        total += len(phantom.truth)
        deformable += str(located.summary.get("registration", "")).startswith("affine + B-spline")
        print(f"seed {seed}: {name:8s} {'x'.join(f'{s:.2g}' for s in spacing)} mm, Dice "
              f"{located.summary['dice']:.3f}, volume x{located.summary['volume_ratio']:.2f}, "
              f"{seconds[-1]:5.1f} s, area {hits}/{len(phantom.truth)}"
              f"{'  ' + '; '.join(located.warnings) if located.warnings else ''}")
    results = {"area": area / total, "side": side / max(lateral, 1), "seconds": float(np.median(seconds))}
    print(f"\n{args.n} phantoms, {total} CMBs ({lateral} more than 3 mm from the midline), "
          f"B-spline kept in {deformable} registrations")
    print(f"MARS area  {results['area']:7.1%}  target >= {TARGETS['area']:.0%}  ratio {results['area'] / TARGETS['area']:.3f}")
    print(f"side       {results['side']:7.1%}  target  = {TARGETS['side']:.0%}  ratio {results['side'] / TARGETS['side']:.3f}")
    print(f"sub-region {region / total:7.1%}  (no target: lobe boundaries are planes)")
    print(f"time       {results['seconds']:6.1f} s median, {max(seconds):.1f} s max per scan;  target < "
          f"{TARGETS['seconds']:g} s  ratio {results['seconds'] / TARGETS['seconds']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
