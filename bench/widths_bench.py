"""Network time of the project's U-Net at other channel widths, against the shipped widths, in one run.

Each width set is exported to ONNX with random weights (time does not depend on the weights) and run on
the model box (160x214x176) with the session settings ``segment`` uses on this machine's CPU provider;
the sets run in turn over the rounds, and the ratio to the reference (the first set, 8-16-32-64) is of
the medians. ``fit --widths`` takes the set chosen (issue 22: network time at most 1.5 times version
2.1's, whose network is 8-16-32-64).

    python bench/widths_bench.py [--widths 8-16-48-96 8-24-48-96 ...] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from SHIVACMBLib.devtools.train import BOX, export_onnx
from SHIVACMBLib.devtools.unet import WIDTHS, ResidualUNet3D
from SHIVACMBLib.inference import create_session, provider_plan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", nargs="+", default=["8-16-48-96", "8-16-32-96", "8-24-48-96", "10-20-40-80"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sets = [WIDTHS] + [tuple(int(c) for c in text.split("-")) for text in args.widths]
    plan, _ = provider_plan("cpu", ort.get_available_providers())
    image = np.random.default_rng(0).random((1, 1, *BOX), dtype=np.float32)
    sessions, parameters = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for widths in sets:
            torch.manual_seed(0)
            network = ResidualUNet3D(widths)
            parameters[widths] = sum(p.numel() for p in network.parameters())
            path = Path(folder) / f"{'-'.join(map(str, widths))}.onnx"
            export_onnx(network, path)
            sessions[widths] = create_session(str(path), plan, args.threads)
        seconds = {widths: [] for widths in sets}
        for _ in range(args.rounds):
            for widths, session in sessions.items():
                started = time.perf_counter()
                session.run(None, {"image": image})
                seconds[widths].append(time.perf_counter() - started)
    reference = float(np.median(seconds[WIDTHS]))
    print(f"{plan[0]}, {args.threads} threads, model box {'x'.join(map(str, BOX))}, medians of {args.rounds} rounds")
    print(f"{'widths':<14} {'parameters':>10} {'seconds':>8} {'ratio':>6}")
    for widths in sets:
        median = float(np.median(seconds[widths]))
        print(f"{'-'.join(map(str, widths)):<14} {parameters[widths]:>10,} {median:>8.2f} {median / reference:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
