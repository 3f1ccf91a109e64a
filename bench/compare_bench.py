"""`shivacmb compare` on the CPU: registration time of a full-size pair, and classification of CMBs.

    python bench/compare_bench.py [--pairs 50] [--model-pairs 5] [--model NAME|DIR] [--threads 2]

Run it on two cores (e.g. `taskset -c 0,1`) to compare with the budget; the load average is
printed at the start and the end (a shared machine stretches the wall times).

1. Registration of a full-size pair (the budget: under 20 s on two CPU cores): a synthetic head
   (`shivacmb phantom`) as a 1 mm SWI baseline, and the same head as a T2*-GRE follow-up at
   0.5x0.5x2 mm, moved by 12 degrees and 18 mm. Prints the seconds of the two brain masks and of
   `register` apart, as wall time and as CPU time of the process (all threads: on a loaded
   machine the CPU time bounds what two free cores take), the ratio of their sum to the budget,
   the brain-mask Dice, and the registration error at the baseline's CMBs.
2. The test suite's random pairs (Testing/Python/pair_phantoms.py `random_pair`: motion up to
   15 degrees and 20 mm, another grid and contrast, CMBs added and removed) with the CMBs taken
   from the truth: pairs with every CMB classified right, registration seconds per pair.
3. Random pairs of the same kind (other seeds) with detection by the model on both scans
   (`compare` end to end, default: the default model): for each true status (new, persistent,
   not seen at follow-up), how many true CMBs got it and what the others got instead; the
   detections of no true CMB by the status they got; pairs with the right count of new CMBs and
   the right ARIA-H grade.

Never asserts: it prints.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SHIVACMB"))
sys.path.insert(0, str(ROOT / "Testing" / "Python"))

import pair_phantoms  # noqa: E402
import phantoms  # noqa: E402
from SHIVACMBLib import longitudinal  # noqa: E402
from SHIVACMBLib.devtools import synthetic  # noqa: E402
from SHIVACMBLib.modelstore.models import DEFAULT_MODEL  # noqa: E402
from SHIVACMBLib.pipeline import SegmentOptions  # noqa: E402
from SHIVACMBLib.preprocess import compute_brain_mask  # noqa: E402
from SHIVACMBLib.scan import Scan  # noqa: E402

BUDGET_S = 20.0
MODEL_SEED = 500  # pairs of section 3 are random_pair(MODEL_SEED + n): not those of the test suite
TRUE_STATUSES = (longitudinal.NEW, longitudinal.PERSISTENT, longitudinal.NOT_SEEN)
MISSED = "missed"


def _scan(image: sitk.Image, name: str) -> Scan:
    return Scan(path=Path(name), image=image, format="memory", sha256="")


def _load() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


def full_size_registration(seed: int = 4242) -> None:
    baseline = synthetic.make_phantom(seed, "swi", (1.0, 1.0, 1.0), n_cmb=10)
    followup = synthetic.make_phantom(seed, "t2s", (0.5, 0.5, 2.0), n_cmb=0)  # the same head, same place
    motion = np.eye(4)
    motion[:3, :3] = phantoms.rotation((0.3, 1.0, 0.2), 12.0)
    motion[:3, 3] = np.array([1.0, -0.5, 0.4]) / np.linalg.norm([1.0, -0.5, 0.4]) * 18.0
    # the follow-up grid shows at each point p what the motion brings there: the still head at motion^-1(p)
    back = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.linalg.inv(motion) @ np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS
    moved = sitk.Resample(followup.image, followup.image,
                          sitk.AffineTransform(back[:3, :3].ravel().tolist(), back[:3, 3].tolist()),
                          sitk.sitkLinear, 0.0)
    b, f = _scan(baseline.image, "baseline"), _scan(moved, "followup")
    start, cpu = time.perf_counter(), time.process_time()
    masks = compute_brain_mask(b), compute_brain_mask(f)
    mask_s, mask_cpu = time.perf_counter() - start, time.process_time() - cpu
    cpu = time.process_time()
    registration = longitudinal.register(b, f, *masks)
    register_cpu = time.process_time() - cpu
    truth = np.array([o.centre for o in baseline.objects if o.kind == "cmb"])
    error = np.linalg.norm(registration.to_followup_ras(truth) - (truth @ motion[:3, :3].T + motion[:3, 3]), axis=1)
    print(f"1. full-size pair: baseline {baseline.info['size']} at 1 mm SWI, follow-up {followup.info['size']} at "
          f"0.5x0.5x2 mm T2*-GRE, moved 12 degrees and 18 mm")
    print(f"   wall time: brain masks {mask_s:.1f} s, registration {registration.seconds:.1f} s, together "
          f"{mask_s + registration.seconds:.1f} s = {(mask_s + registration.seconds) / BUDGET_S:.2f} x the "
          f"{BUDGET_S:.0f} s budget")
    print(f"   CPU time (all threads): brain masks {mask_cpu:.1f} s, registration {register_cpu:.1f} s, together "
          f"{mask_cpu + register_cpu:.1f} s = {(mask_cpu + register_cpu) / BUDGET_S:.2f} x the budget")
    print(f"   brain-mask Dice {registration.mask_dice:.3f}; registration error at the {len(truth)} CMBs: mean "
          f"{error.mean():.2f} mm, max {error.max():.2f} mm")


def truth_pairs(n: int) -> None:
    right, seconds, worst = 0, [], 0.0
    for seed in range(n):
        result = pair_phantoms.compare_truth(pair_phantoms.random_pair(seed))
        right += result.found == result.expected
        seconds.append(result.registration.seconds)
        worst = max([worst] + [m.distance_mm for m in result.rows if m.status == longitudinal.PERSISTENT])
    print(f"2. {n} random pairs, CMBs from the truth: {right}/{n} with every CMB classified right; registration "
          f"{np.mean(seconds):.2f} s per pair (max {max(seconds):.2f} s); largest distance of a persistent pair "
          f"after registration {worst:.2f} mm")


def outcomes(pair: pair_phantoms.Pair, rows: List[longitudinal.Match]) -> Tuple[Dict[int, str], Counter]:
    """What each true CMB got (its status; several joined by '+'; 'missed'; or 'paired with' a false detection or
    another CMB), and the detections of no true CMB counted by the status they got."""
    truth = {side: pair_phantoms.truth_ids(getattr(pair, f"{side}_cmbs"),
                                           [getattr(m, side) for m in rows if getattr(m, side) is not None])
             for side in ("baseline", "followup")}
    given: Dict[int, List[str]] = {t: [] for t in {**pair.baseline_cmbs, **pair.followup_cmbs}}
    false: Counter = Counter()
    for m in rows:
        ids = {truth[side].get(getattr(m, side).cmb_id) for side in truth if getattr(m, side) is not None}
        if ids == {None}:
            false[m.status] += 1
        for t in ids - {None}:
            given[t].append(m.status if len(ids) == 1 else "paired with a false detection" if None in ids
                            else "paired with another CMB")
    return {t: "+".join(sorted(s)) or MISSED for t, s in given.items()}, false


def model_pairs(n: int, model: Optional[str]) -> None:
    table: Dict[str, Counter] = {status: Counter() for status in TRUE_STATUSES}
    false: Counter = Counter()
    right_count = right_grade = 0
    seconds = []
    detection = SegmentOptions(model=model, location=False, report=False)
    with tempfile.TemporaryDirectory() as scratch:
        for seed in range(MODEL_SEED, MODEL_SEED + n):
            pair = pair_phantoms.random_pair(seed, cmb_radius=(1.5, 3.0))
            folder = Path(scratch) / str(seed)
            b, f = pair_phantoms.write_pair(pair, folder)
            start = time.perf_counter()
            result = longitudinal.compare(b, f, folder / "out", longitudinal.CompareOptions(detection=detection,
                                                                                            report=False))
            seconds.append(time.perf_counter() - start)
            got, wrong = outcomes(pair, result.rows)
            expected = {t: status for status, ids in pair.expected.items() for t in ids}
            for t, outcome in got.items():
                table[expected[t]][outcome] += 1
            false += wrong
            true_new, found_new = len(pair.expected[longitudinal.NEW]), result.summary["counts"][longitudinal.NEW]
            right_count += found_new == true_new
            right_grade += longitudinal.aria_h_grade(found_new) == longitudinal.aria_h_grade(true_new)
    print(f"3. {n} random pairs, detection by the model ({model or DEFAULT_MODEL}) on both scans: `compare` "
          f"{np.mean(seconds):.1f} s per pair")
    for status in TRUE_STATUSES:
        total = sum(table[status].values())
        others = ", ".join(f"{k} {v}" for k, v in table[status].most_common() if k != status) or "-"
        share = f"{table[status][status] / total:6.1%}" if total else "   n/a"
        print(f"   true {status:22s} {table[status][status]:3d}/{total:<3d} classified right ({share}); "
              f"the others: {others}")
    print(f"   detections of no true CMB: {sum(false.values())}"
          + (" (" + ", ".join(f"{k} {v}" for k, v in false.most_common()) + ")" if false else ""))
    print(f"   pairs with the right number of new CMBs {right_count}/{n}, with the right ARIA-H grade {right_grade}/{n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=50, help="random pairs with the CMBs from the truth")
    parser.add_argument("--model-pairs", type=int, default=5, help="random pairs with detection (0: none)")
    parser.add_argument("--model", metavar="NAME|DIR", help="model for detection (default: the default model)")
    parser.add_argument("--threads", type=int, default=2, help="ITK threads (the budget is for two CPU cores)")
    args = parser.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    print(f"ITK threads: {sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}; {_load()}")
    full_size_registration()
    if args.pairs:
        truth_pairs(args.pairs)
    if args.model_pairs:
        model_pairs(args.model_pairs, args.model)
    print(f"end: {_load()}")


if __name__ == "__main__":
    main()
