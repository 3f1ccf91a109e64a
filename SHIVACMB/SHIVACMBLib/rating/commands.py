"""The `shivacmb review` command: rating sessions made, followed, exported and compared (SHIVACMBLib.rating)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def add_review_parser(commands: Any, epilog: str) -> None:
    review = commands.add_parser(
        "review", help="rating sessions: make one, follow progress, export ratings, agreement statistics",
        description="Rating sessions (docs/rating.md): raters review every CMB of a list of scans, blind or "
                    "assisted by the AI, in 3D Slicer or through SHIVACMBLib.rating.review. Each rater's changes are "
                    "saved one by one in SESSION/raters/<rater>/.", epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = review.add_subparsers(dest="action", metavar="ACTION", required=True)
    new = actions.add_parser("new", help="make a session from a scan list or folder and optional AI results")
    new.add_argument("session", metavar="SESSION", help="folder of the new session")
    new.add_argument("--scans", metavar="LIST|DIR", required=True,
                     help="TSV/CSV list with a 'path' column (optional 'scan_id'), or a folder of scans "
                          "(searched recursively, BIDS-like folders included)")
    new.add_argument("--ai", metavar="DIR", help="AI results: DIR/<scan_id>/findings.tsv (shivacmb segment) or "
                                                 "DIR/<scan_id>.tsv; copied into the session")
    new.add_argument("--mode", choices=("assisted", "blind"), default="assisted",
                     help="assisted: raters review the AI findings; blind: raters mark CMBs without the AI, "
                          "which is shown only after each scan is submitted (default: %(default)s)")
    new.set_defaults(handler=_review_new)
    status = actions.add_parser("status", help="progress per rater")
    status.add_argument("session", metavar="SESSION")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_review_status)
    export = actions.add_parser("export", help="one row per scan per rater, and one row per finding (TSV)")
    export.add_argument("sessions", nargs="+", metavar="SESSION")
    export.add_argument("--out", metavar="DIR", required=True,
                        help="writes DIR/ratings_scans.tsv and DIR/ratings_findings.tsv")
    export.set_defaults(handler=_review_export)
    agree = actions.add_parser(
        "agree", help="agreement of raters with each other and with the AI",
        description="For every pair of readers (raters and the AI) over the scans both rated: findings matched "
                    "by centroids within 5 mm (sensitivity, precision, F1 with the first as reference), count "
                    "ICC(A,1), Pearson R, Cohen's kappa of presence and of the count categories 0, 1, 2-4, >=5, "
                    "Bland-Altman bias and limits of agreement.", epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    agree.add_argument("sessions", nargs="+", metavar="SESSION")
    agree.add_argument("--certainty", choices=("all", "definite"), default="all",
                       help="count definite and possible CMBs, or definite only (default: %(default)s)")
    agree.add_argument("--plots", metavar="DIR", help="write one Bland-Altman PNG per pair (needs matplotlib)")
    agree.add_argument("--out", metavar="JSON", help="also write every number to this JSON file")
    agree.set_defaults(handler=_review_agree)


def _review_new(args: argparse.Namespace) -> int:
    from .review import ai_results, create_session, scans_from

    scans = scans_from(args.scans)
    ai = ai_results(args.ai, [scan_id for scan_id, _ in scans]) if args.ai else {}
    session = create_session(args.session, scans, args.mode, ai)
    print(f"{session.mode} session of {len(session.scans)} scan(s), {len(ai)} with AI findings -> "
          f"{session.folder}{os.sep}")
    return 0


def _review_status(args: argparse.Namespace) -> int:
    from .export import status_rows
    from .review import Session

    session = Session.load(args.session)
    rows = status_rows(session)
    if args.json:
        print(json.dumps({"mode": session.mode, "scans": len(session.scans), "raters": rows}, indent=2))
        return 0
    print(f"{session.mode} session, {len(session.scans)} scan(s), {len(rows)} rater(s)")
    for row in rows:
        done = row["submitted"] + row["not_ratable"]
        print(f"{row['rater']}: {done}/{row['scans']} done ({row['not_ratable']} not ratable), "
              f"{row['definite']} definite and {row['possible']} possible CMB(s), {row['hours']:.2f} h; "
              f"next: {row['next_scan'] or '-'}")
        for problem in row["problems"]:
            print(f"warning: {row['rater']}: {problem}")
    return 0


def _review_export(args: argparse.Namespace) -> int:
    from .export import export

    scans, findings, n_scans, n_findings, problems = export(args.sessions, args.out)
    print(f"{n_scans} scan rating(s) -> {scans}\n{n_findings} finding rating(s) -> {findings}")
    for problem in problems:
        print(f"warning: {problem}")
    return 0


def _review_agree(args: argparse.Namespace) -> int:
    from .agreement import agree, plot_bland_altman, summary_table

    result = agree(args.sessions, args.certainty)
    print(summary_table(result))
    if args.plots:
        for path in plot_bland_altman(result, args.sessions, args.plots, args.certainty):
            print(f"figure -> {path}")
    if args.out:
        from ..cli import write_json

        write_json(result, args.out)
    return 0
