"""Agreement between raters, and between raters and the AI, over the scans of rating sessions.

Readers: every rater of the sessions given (named ``rater``, or ``rater@session`` when a rater is
in several sessions) and ``AI`` (the AI findings of the sessions; for a scan in several sessions,
those of the first). Per pair of readers, over the scans both have rated (submitted, not "not
ratable"; the AI has rated every scan it has findings for):

- Findings are matched per scan by the centroid rule of ``evaluate`` (``centroid5mm``: one to one,
  at most 5 mm apart). A rater's marks are points, so the overlap rule (which needs voxels) does
  not apply. With the first reader as reference: pairs (TP), first only (FN), second only (FP),
  sensitivity, precision and F1 pooled over scans (``evaluate.pool``).
- Counts per scan (definite + possible, or definite only with ``certainty="definite"``; AI findings
  are all counted): ICC(A,1) (two-way random effects, absolute agreement, single rater: Shrout and
  Fleiss ICC(2,1)), Pearson R (``evaluate.pearson_r``), Cohen's kappa of presence (count > 0) and of
  the count categories 0, 1, 2-4, >=5, and Bland-Altman bias (second minus first), standard
  deviation of the differences and 95 % limits of agreement (bias +- 1.96 SD).

A statistic that is not defined (fewer than 2 scans, no variance, chance agreement 1) is None.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InputError, RuntimeFailure
from ..files import atomic_path
from .review import SUBMITTED, Session, all_ratings

PathLike = Union[str, Path]
CATEGORIES = ("0", "1", "2-4", ">=5")
CERTAINTIES = {"all": ("definite", "possible", "added"), "definite": ("definite", "added")}
AI = "AI"


@dataclass
class Reader:
    """Per scan id, the points (n, 3) a reader counts as CMBs."""

    name: str
    points: Dict[str, np.ndarray]

    def counts(self, scans: Sequence[str]) -> np.ndarray:
        return np.array([len(self.points[s]) for s in scans], dtype=float)


# --- statistics ---------------------------------------------------------------------------------


def icc_a1(table: Sequence[Sequence[float]]) -> Optional[float]:
    """ICC(A,1) of an n subjects x k raters table (two-way random, absolute agreement, single rater)."""
    y = np.asarray(table, dtype=float)
    n, k = y.shape
    if n < 2 or k < 2:
        return None
    grand = y.mean()
    ms_rows = k * ((y.mean(axis=1) - grand) ** 2).sum() / (n - 1)
    ms_cols = n * ((y.mean(axis=0) - grand) ** 2).sum() / (k - 1)
    residual = y - y.mean(axis=1, keepdims=True) - y.mean(axis=0, keepdims=True) + grand
    ms_error = (residual ** 2).sum() / ((n - 1) * (k - 1))
    denominator = ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n
    return None if np.isclose(denominator, 0.0) else float((ms_rows - ms_error) / denominator)


def cohen_kappa(first: Sequence[Any], second: Sequence[Any]) -> Optional[float]:
    """Cohen's kappa (unweighted) of two raters' categories of the same items."""
    if len(first) != len(second):
        raise ValueError("kappa needs the same items from both raters")
    if not first:
        return None
    labels = sorted(set(first) | set(second), key=str)
    observed = np.mean([a == b for a, b in zip(first, second)])
    expected = sum((list(first).count(c) / len(first)) * (list(second).count(c) / len(second)) for c in labels)
    return None if np.isclose(expected, 1.0) else float((observed - expected) / (1.0 - expected))


def count_category(count: float) -> str:
    """0, 1, 2-4 or >=5."""
    return "0" if count == 0 else "1" if count == 1 else "2-4" if count <= 4 else ">=5"


def bland_altman(first: Sequence[float], second: Sequence[float]) -> Dict[str, Optional[float]]:
    """Bias (second - first), SD of the differences (n - 1) and the 95 % limits of agreement."""
    difference = np.asarray(second, dtype=float) - np.asarray(first, dtype=float)
    if len(difference) < 2:
        return {"bias": float(difference.mean()) if len(difference) else None, "sd": None, "lower": None,
                "upper": None}
    bias, sd = float(difference.mean()), float(difference.std(ddof=1))
    return {"bias": bias, "sd": sd, "lower": bias - 1.96 * sd, "upper": bias + 1.96 * sd}


def compare(first: Reader, second: Reader, scans: Sequence[str]) -> Dict[str, Any]:
    """Every statistic of one pair of readers over ``scans``."""
    from ..evaluate import ScanMetrics, match_centroids, pearson_r, pool

    metrics = []
    for scan in scans:
        a, b = first.points[scan], second.points[scan]
        tp = match_centroids(b, a)
        metrics.append(ScanMetrics(tp=tp, fn=len(a) - tp, fp=len(b) - tp, n_true=len(a), n_pred=len(b)))
    counts_a, counts_b = first.counts(scans), second.counts(scans)
    pooled = pool(metrics)
    return {
        "first": first.name, "second": second.name, "scans": len(scans),
        "findings": {k: pooled[k] for k in ("n_true", "n_pred", "tp", "fn", "fp", "sensitivity", "precision", "f1")},
        "counts": {
            "first_total": int(counts_a.sum()), "second_total": int(counts_b.sum()),
            "icc_a1": icc_a1(np.stack([counts_a, counts_b], axis=1)) if len(scans) else None,
            "pearson_r": pearson_r(metrics),
            "kappa_presence": cohen_kappa(list(counts_a > 0), list(counts_b > 0)),
            "kappa_categories": cohen_kappa([count_category(c) for c in counts_a],
                                            [count_category(c) for c in counts_b]),
            "bland_altman": bland_altman(counts_a, counts_b),
        },
    }


# --- readers from sessions ----------------------------------------------------------------------


def readers(sessions: Sequence[PathLike], certainty: str = "all") -> List[Reader]:
    """The raters of the sessions (their finished, ratable scans) and the AI (when any session has AI findings)."""
    if certainty not in CERTAINTIES:
        raise InputError(None, f"certainty '{certainty}' is not one of {', '.join(CERTAINTIES)}")
    kept = CERTAINTIES[certainty]
    loaded = [Session.load(folder) for folder in sessions]
    names = [s.folder.resolve() for s in loaded]
    if len(set(names)) != len(names):
        raise InputError(None, "a session is given twice")
    found: List[Tuple[str, Session, Reader]] = []
    ai: Dict[str, np.ndarray] = {}
    for session in loaded:
        ai_findings = {s: session.ai_findings(s) for s in session.scan_ids}
        for scan, findings in ai_findings.items():
            if findings is not None and scan not in ai:
                ai[scan] = _points([f.ras for f in findings if f.status != "rejected"])
        for ratings in all_ratings(session):
            points = {}
            for scan, rating in ratings.scans.items():
                if rating.state != SUBMITTED:
                    continue
                by_id = {f.cmb_id: f for f in ai_findings[scan] or []}
                points[scan] = _points([m.ras if m.origin == "rater" else by_id[m.cmb_id].ras
                                        for m in rating.marks.values() if m.status in kept])
            found.append((ratings.rater, session, Reader(ratings.rater, points)))
    raters = [rater for rater, _, _ in found]
    result = []
    for rater, session, reader in found:
        if raters.count(rater) > 1:
            reader.name = f"{rater}@{session.folder.name}"
        result.append(reader)
    if ai:
        result.append(Reader(AI, ai))
    return result


def _points(ras: Sequence[Sequence[float]]) -> np.ndarray:
    return np.array(ras, dtype=float).reshape(-1, 3)


def agree(sessions: Sequence[PathLike], certainty: str = "all") -> Dict[str, Any]:
    """Statistics of every pair of readers: the JSON-able result of ``shivacmb review agree``."""
    found = readers(sessions, certainty)
    pairs = []
    for index, first in enumerate(found):
        for second in found[index + 1:]:
            scans = sorted(set(first.points) & set(second.points))
            pairs.append(compare(first, second, scans))
    return {"certainty": certainty, "readers": [r.name for r in found], "pairs": pairs}


def summary_table(result: Dict[str, Any]) -> str:
    """One line per pair of readers (names in full: ``rater@session`` names differ only at the end)."""

    def cell(value: Optional[float], digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    width = max([len("second")] + [len(name) for name in result["readers"]])
    header = (f"{'first':<{width}} {'second':<{width}} {'scans':>5} {'n1':>5} {'n2':>5} {'pairs':>5} {'F1':>6} "
              f"{'ICC':>6} {'R':>6} {'k_pres':>6} {'k_cat':>6} {'bias':>6} {'LoA':>15}")
    lines = [f"certainty: {result['certainty']}; findings matched by centroids within 5 mm", header]
    for pair in result["pairs"]:
        f, c = pair["findings"], pair["counts"]
        ba = c["bland_altman"]
        loa = "-" if ba["lower"] is None else f"{ba['lower']:.2f} to {ba['upper']:.2f}"
        lines.append(f"{pair['first']:<{width}} {pair['second']:<{width}} {pair['scans']:>5} {f['n_true']:>5} "
                     f"{f['n_pred']:>5} {f['tp']:>5} {cell(f['f1']):>6} {cell(c['icc_a1']):>6} "
                     f"{cell(c['pearson_r']):>6} {cell(c['kappa_presence']):>6} {cell(c['kappa_categories']):>6} "
                     f"{cell(ba['bias'], 2):>6} {loa:>15}")
    return "\n".join(lines)


def plot_bland_altman(result: Dict[str, Any], sessions: Sequence[PathLike], folder: PathLike,
                      certainty: str = "all") -> List[Path]:
    """One Bland-Altman PNG per pair of readers (needs matplotlib: the ``plots`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeFailure("Bland-Altman figures need matplotlib: pip install 'shivacmb[plots]'") from None
    by_name = {r.name: r for r in readers(sessions, certainty)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for pair in result["pairs"]:
        first, second = by_name[pair["first"]], by_name[pair["second"]]
        scans = sorted(set(first.points) & set(second.points))
        a, b = first.counts(scans), second.counts(scans)
        ba = pair["counts"]["bland_altman"]
        figure, axes = plt.subplots(figsize=(5, 4), dpi=100)
        axes.scatter((a + b) / 2, b - a, s=14, alpha=0.6)
        for value, style in ((ba["bias"], "-"), (ba["lower"], "--"), (ba["upper"], "--")):
            if value is not None:
                axes.axhline(value, color="k", linestyle=style, linewidth=1)
        axes.set_xlabel(f"mean CMB count of {first.name} and {second.name}")
        axes.set_ylabel(f"{second.name} - {first.name}")
        axes.set_title(f"Bland-Altman, {len(scans)} scans")
        figure.tight_layout()
        path = folder / f"bland_altman_{_file_part(first.name)}_vs_{_file_part(second.name)}.png"
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png")
        plt.close(figure)
        written.append(path)
    return written


def _file_part(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
