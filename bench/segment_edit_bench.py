"""GUI-thread time of the Slicer module's table update after a segment is added or deleted.

    python bench/segment_edit_bench.py [--size 512 512 300] [--cmbs 30] [--edits 5] [--seed 0]

Runs SHIVACMB.py and SHIVACMBSlicer against the Slicer stand-ins of the test suite
(Testing/Python/slicer_standins.py) on a scan stand-in of the given grid (default 512x512x300, an
SWI's) holding ``--cmbs`` CMB segments. The stand-in of GenerateMergedLabelmapInReferenceGeometry
allocates and fills what Slicer's does (a VTK_SHORT image of the whole grid, or of the segments'
bounding box), so the times are those of the module's own work around it; Slicer's resampling of
each segment into the reference geometry is not in them.

Prints, in milliseconds (min / median / max over ``--edits`` edits of each kind):

- "Update table" (and loading a result): every segment exported over the whole grid and measured;
- a segment added (a sphere of radius 3 voxels), then the table update the widget runs 300 ms later
  (CorrectionsSection._autoUpdate, on the GUI thread): the new segment alone, in its bounding box;
- a segment deleted, and the same update;

and each update's ratio to the 0.2 s budget of issue 24. Never asserts: it prints.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Callable, List, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SHIVACMB"))
sys.path.insert(0, str(ROOT / "Testing" / "Python"))

import phantoms  # noqa: E402
import slicer_standins as standins  # noqa: E402
from SHIVACMBLib.findings import Finding, write_tsv  # noqa: E402
from SHIVACMBLib.segfile import ID_TAG, STATUS_TAG  # noqa: E402
from SHIVACMBLib.slicerside import corrections  # noqa: E402

BUDGET_S = 0.2
SPACING = (0.45, 0.45, 0.5)
RADIUS_VOXELS = 3


def sphere(centre_kji: Sequence[int]) -> standins.BoxMask:
    """A ball of RADIUS_VOXELS voxels around ``centre_kji``, as a bounding-box mask."""
    r = RADIUS_VOXELS
    k, j, i = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return standins.BoxMask(np.asarray(centre_kji) - r, k ** 2 + j ** 2 + i ** 2 <= r ** 2)


def result(module: types.SimpleNamespace, grid, centres: np.ndarray, folder: Path):
    """A run's findings table and segmentation with one segment per centre, as loadResults leaves them."""
    segmentation = standins.SegmentationNode()
    found = []
    for cmb_id, centre in enumerate(centres, start=1):
        mask = sphere(centre)
        segmentation.segmentation.segments[f"CMB_{cmb_id}"] = standins.Segment(
            f"CMB {cmb_id}", mask, {ID_TAG: str(cmb_id), STATUS_TAG: "unreviewed"})
        m = corrections.box_voxels(mask.array, mask.corner, grid).measurement
        found.append(Finding(cmb_id, *(round(v, 2) for v in m.ras), *m.ijk, round(m.volume_mm3, 2), m.voxels,
                             0.9, 0.8, 1.0))
    write_tsv(found, folder / "findings.tsv")
    (folder / "run.json").write_text(json.dumps({"model": {"name": "bench"}}) + "\n", encoding="utf-8")
    logic = module.SHIVACMBLogic()
    records = logic.segmentRecords(segmentation)
    voxels = {r.label: corrections.box_voxels(s.mask.array, s.mask.corner, grid)
              for r, s in zip(records, segmentation.segmentation.segments.values())}
    fingerprints = corrections.fingerprints_by_cmb({label: v.fingerprint for label, v in voxels.items()}, records)
    state = corrections.RunState.from_files(folder / "findings.tsv", folder / "run.json", fingerprints)
    table = standins.TableNode()
    table.SetAttribute(logic.RUN_STATE_ATTRIBUTE, state.to_json())
    logic.showFindings(table, state.findings)
    table.SetNodeReferenceID(logic.SEGMENTATION_ROLE, segmentation)
    table.SetNodeReferenceID(logic.VOLUME_ROLE, standins.VolumeNode(grid))
    module.scene.nodes.append(table)
    return logic, table, segmentation


def timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def line(what: str, seconds: List[float], budget: bool) -> str:
    ms = [1000 * s for s in seconds]
    text = f"{what:<44} {min(ms):8.1f} {statistics.median(ms):8.1f} {max(ms):8.1f} ms"
    return text + (f"   median / budget {statistics.median(seconds) / BUDGET_S:.2f}" if budget else "")


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 300), metavar=("I", "J", "K"))
    parser.add_argument("--cmbs", type=int, default=30)
    parser.add_argument("--edits", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv or None)

    module = standins.load_module(standins.Patch())
    grid = phantoms.grid_around((0.0, 0.0, 0.0), np.multiply(args.size, SPACING), SPACING)
    rng = np.random.default_rng(args.seed)
    margin = RADIUS_VOXELS + 1
    centres = rng.integers(margin, np.asarray(grid.array_shape) - margin, size=(args.cmbs + args.edits, 3))
    with tempfile.TemporaryDirectory() as work:
        logic, table, segmentation = result(module, grid, centres[:args.cmbs], Path(work))
        widget = module.SHIVACMBWidget()
        widget.logic, widget._observedTable = logic, table
        widget.ui = types.SimpleNamespace(statusLabel=types.SimpleNamespace(text=""))
        segments = segmentation.segmentation.segments

        def auto_update() -> None:  # what the single-shot timer runs on the GUI thread
            widget.onSegmentsAddedOrRemoved()
            module.timers.run()

        full = [timed(lambda: logic.updateFindings(table)) for _ in range(2)]
        added, deleted = [], []
        for n, centre in enumerate(centres[args.cmbs:]):
            segments[f"Segment_{n}"] = standins.Segment(f"Segment_{n}", sphere(centre))
            added.append(timed(auto_update))
            del segments[f"CMB_{n + 1}"]
            deleted.append(timed(auto_update))
        rows = table.GetNumberOfRows()
    print(f"scan stand-in {'x'.join(map(str, args.size))} voxels, {args.cmbs} CMB segments; "
          f"{args.edits} additions and {args.edits} deletions; {rows} rows at the end; "
          f"budget {BUDGET_S * 1000:.0f} ms of GUI-thread time per update")
    print(f"{'':<44} {'min':>8} {'median':>8} {'max':>8}")
    print(line("Update table (every segment, whole grid)", full, False))
    print(line("segment added: table updated", added, True))
    print(line("segment deleted: table updated", deleted, True))


if __name__ == "__main__":
    main(sys.argv[1:])
