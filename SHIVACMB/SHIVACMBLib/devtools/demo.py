"""``shivacmb demo``: a phantom scan in, segments + table + report out, scored against the truth."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..evaluate import evaluate_pair
from ..pipeline import SegmentOptions, segment
from .synthetic import make_phantom, write_phantom

DEMO_SEED = 424242  # never used for training (training seeds: see models/README.md)
DEMO_SCAN = "demo-swi"
DEMO_CMBS = 8
DEMO_SPACING = (0.9, 0.9, 1.5)


def run_demo(out: Path, model: Optional[str] = None, device: str = "auto") -> dict:
    """Make (or reuse) the demo phantom, segment it, score it and print where everything is."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False, highlight=False)
    phantom_dir = out / "phantom"
    paths = write_phantom(make_phantom(DEMO_SEED, "swi", DEMO_SPACING, n_cmb=DEMO_CMBS), phantom_dir, DEMO_SCAN)
    console.print(f"phantom scan: {paths['image']} ({DEMO_CMBS} CMBs planted; truth in {paths['cmb'].parent})")
    result = segment(paths["image"], out / "results", SegmentOptions(model=model, device=device))
    labels = result.output_dir / result.files[0]  # cmb_labels in the scan's format

    table = Table("rule", "true CMBs", "found", "TP", "FN", "FP", "sensitivity", "precision")
    scores = {}
    for rule in ("overlap", "centroid5mm"):
        metrics = evaluate_pair(labels, paths["cmb"], rule=rule).as_dict()
        scores[rule] = metrics
        table.add_row(rule, str(metrics["n_true"]), str(metrics["n_pred"]), str(metrics["tp"]), str(metrics["fn"]),
                      str(metrics["fp"]), _fmt(metrics["sensitivity"]), _fmt(metrics["precision"]))
    console.print(table)
    model_summary = result.run.model
    console.print(f"model: {model_summary['name']} {model_summary['version']} ({model_summary['description']})")
    console.print(f"provider: {result.run.provider}, {result.run.timings_s['total']:.1f} s")
    console.print(f"outputs: {result.output_dir}: " + ", ".join(result.files))
    console.print(f"open {result.output_dir / 'report.html'} in a browser, or load {paths['image']} and "
                  f"{result.output_dir / 'cmb.seg.nrrd'} in 3D Slicer")
    return scores


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"
