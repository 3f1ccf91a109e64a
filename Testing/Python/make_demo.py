"""Write the demo scan: a phantom head with eight planted CMBs, stored oblique and anisotropic.

    python Testing/Python/make_demo.py OUT_FOLDER

writes OUT_FOLDER/phantom_swi.nii.gz and OUT_FOLDER/phantom_truth.tsv (the planted CMBs,
RAS mm). Until the embedded default model lands, the README's main job segments this scan
with the fixed-weight test model in Testing/models/dark-blob-detector.
"""

from __future__ import annotations

import sys
from pathlib import Path

import phantoms

SPACING = (0.9, 0.9, 1.5)
TILT_DEGREES = 12.0


def main(out: Path) -> None:
    scene = phantoms.head_scene()
    grid = phantoms.grid_around((2.0, -3.0, 4.0), (200, 240, 170), SPACING,
                                phantoms.rotation((1.0, 0.0, 0.0), TILT_DEGREES))
    phantoms.write(phantoms.render(scene, grid, seed=2026), out / "phantom_swi.nii.gz")
    rows = ["cmb\tr\ta\ts\tradius_mm"] + [f"{n}\t{s.centre[0]}\t{s.centre[1]}\t{s.centre[2]}\t{s.radius}"
                                           for n, s in enumerate(scene.spheres, start=1)]
    (out / "phantom_truth.tsv").write_text("\n".join(rows) + "\n")
    print(f"wrote {out / 'phantom_swi.nii.gz'} ({len(scene.spheres)} planted CMBs in {out / 'phantom_truth.tsv'})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
