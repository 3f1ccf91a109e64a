"""Simulated raters for rating sessions, and the crash check: sessions of tiny fake scans rated by
seeded random raters that are killed (SIGKILL) at random points and resumed.

A scan here is only a path (an empty file) with a seeded "truth" (CMB centres) and AI findings
drawn from it; a rating session needs no more. Each rater's decisions for a scan are a pure
function of (seed, rater, scan), so a resumed rater makes exactly the decisions it would have
made without the kill: it skips what the session already holds, as a person reopening Slicer
would see their earlier marks and go on.

    python Testing/Python/review_sim.py check [--scans 50] [--raters 3] [--kills 20] [--seed 7]
    python Testing/Python/review_sim.py rate SESSION RATER --seed S [--die-after N --die-at PHASE]

Kill phases: ``before-log`` (nothing of the change written), ``torn-log`` (half a log line
written), ``after-log`` (log line written, state not), ``after-state`` (the change fully saved).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from SHIVACMBLib.rating import review
from SHIVACMBLib.findings import Finding, write_tsv
from SHIVACMBLib.mars import AREAS

PHASES = ("before-log", "torn-log", "after-log", "after-state")
RATERS = ("alice", "bob", "chen", "dana", "emre")
Action = Tuple[Any, ...]


def rng_for(seed: int, *names: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(n.encode()) for n in names)])


def scan_ids(n: int) -> List[str]:
    return [f"sub-{i:03d}_swi" for i in range(1, n + 1)]


def truth(seed: int, scan_id: str) -> np.ndarray:
    """CMB centres of a scan (RAS mm), at least 15 mm apart; most scans 0-2, some many."""
    rng = rng_for(seed, "truth", scan_id)
    n = int(rng.choice([0, 0, 1, 1, 2, 3, 5, 8]))
    return far_points(rng, n, [])


def far_points(rng: np.random.Generator, n: int, avoid: Sequence[np.ndarray]) -> np.ndarray:
    """``n`` random brain points at least 15 mm from each other and from ``avoid``."""
    points: List[np.ndarray] = list(avoid)
    new = []
    while len(new) < n:
        p = rng.uniform([-60, -80, -40], [60, 70, 60])
        if all(np.linalg.norm(p - q) >= 15 for q in points):
            points.append(p)
            new.append(p)
    return np.array(new).reshape(-1, 3)


def near(rng: np.random.Generator, point: np.ndarray) -> np.ndarray:
    """A point within 2 mm of ``point`` (how a reader places a mark or the AI a centroid)."""
    return point + rng.uniform(-1.1, 1.1, 3)


def ai_findings(seed: int, scan_id: str) -> List[Finding]:
    """AI findings: 80 % of the true CMBs, and 0-2 false positives."""
    rng = rng_for(seed, "ai", scan_id)
    centres = truth(seed, scan_id)
    found = [near(rng, c) for c in centres if rng.random() < 0.8]
    found += list(far_points(rng, int(rng.integers(0, 3)), list(centres)))
    return [Finding(k, *np.round(p, 2), 10, 10, 10, 8.0, 8, 0.9, 0.7, 1.0, mars_area=str(rng.choice(AREAS)),
                    side=str(rng.choice(("left", "right"))))
            for k, p in enumerate(found, start=1)]


def make_sessions(root: Path, n_scans: int, seed: int) -> Dict[str, Path]:
    """Fake scans, their AI results, and an assisted and a blind session made by `shivacmb review new`."""
    scans, ai = root / "scans", root / "ai"
    scans.mkdir(parents=True)
    ai.mkdir()
    for scan_id in scan_ids(n_scans):
        (scans / f"{scan_id}.nii.gz").touch()
        write_tsv(ai_findings(seed, scan_id), ai / f"{scan_id}.tsv")
    sessions = {}
    for mode in review.MODES:
        sessions[mode] = root / f"session-{mode}"
        completed = subprocess.run([sys.executable, "-m", "SHIVACMBLib.cli", "review", "new", str(sessions[mode]),
                                    "--scans", str(scans), "--ai", str(ai), "--mode", mode],
                                   capture_output=True, encoding="utf-8")
        if completed.returncode != 0:
            raise RuntimeError(completed.stderr)
    return sessions


def plan(seed: int, rater: str, scan_id: str, mode: str, ai: Sequence[Finding]) -> List[Action]:
    """The decisions of a rater on a scan, in order: ("set", cmb_id, status, area), ("add", ras, status, area),
    then ("submit",) or ("not_ratable", reason)."""
    rng = rng_for(seed, "rater", rater, scan_id)
    if rng.random() < 0.06:
        return [("not_ratable", str(rng.choice(review.REASONS)))]
    centres = truth(seed, scan_id)
    actions: List[Action] = []
    if mode == "assisted":
        for finding in ai:
            real = len(centres) and np.linalg.norm(centres - np.array(finding.ras), axis=1).min() < 5
            weights = [0.7, 0.2, 0.1] if real else [0.1, 0.2, 0.7]
            actions.append(("set", finding.cmb_id, str(rng.choice(("definite", "possible", "rejected"), p=weights)),
                            str(rng.choice(AREAS + ("n/a",)))))
        seen = np.array([f.ras for f in ai]).reshape(-1, 3)
        missed = [c for c in centres if len(seen) == 0 or np.linalg.norm(seen - c, axis=1).min() >= 5]
        marks = [near(rng, c) for c in missed if rng.random() < 0.5]
    else:
        marks = [near(rng, c) for c in centres if rng.random() < 0.75]
        marks += list(far_points(rng, int(rng.random() < 0.2), list(centres) + list(marks)))
    for point in marks:
        actions.append(("add", [round(float(v), 3) for v in point],
                        str(rng.choice(("added", "definite", "possible"), p=[0.3, 0.5, 0.2])),
                        str(rng.choice(AREAS + ("n/a",)))))
    return actions + [("submit",)]


# --- one rater, as a process --------------------------------------------------------------------


def pending(session: review.RatingSession, actions: Sequence[Action], scan_id: str) -> List[Action]:
    """The planned decisions the session does not hold yet (the rater sees what is already there)."""
    rating = session.rating(scan_id)
    added = sum(m.origin == "rater" for m in rating.marks.values())
    todo, adds = [], 0
    for action in actions:
        if action[0] == "set":
            mark = rating.marks.get(action[1])
            if mark is not None and (mark.status, mark.mars_area) == (action[2], action[3]):
                continue
        elif action[0] == "add":
            adds += 1
            if adds <= added:
                continue
        todo.append(action)
    return todo


def rate(folder: Path, rater: str, seed: int) -> None:
    """Rate every unfinished scan of the session, from the first unfinished one."""
    with review.RatingSession(folder, rater) as session:
        for scan_id in session.scan_ids[session.current_index():]:
            ai = session.session.ai_findings(scan_id) if session.mode == "assisted" else []
            session.open_scan(scan_id)
            for action in pending(session, plan(seed, rater, scan_id, session.mode, ai), scan_id):
                if action[0] == "set":
                    session.set_status(scan_id, action[1], action[2], mars_area=action[3])
                elif action[0] == "add":
                    session.add(scan_id, action[1], action[2], mars_area=action[3])
                elif action[0] == "not_ratable":
                    session.not_ratable(scan_id, action[1])
                else:
                    session.submit(scan_id)


def arm_kill(after: int, phase: str) -> None:
    """Make this process kill itself (SIGKILL) at the ``after``-th save, at ``phase`` of that save."""
    original = review.RatingSession._save
    count = [0]

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def save(self: review.RatingSession, event: Dict[str, Any]) -> None:
        count[0] += 1
        if count[0] != after:
            return original(self, event)
        if phase == "before-log":
            die()
        if phase == "torn-log":
            line = json.dumps({"n": self.ratings.n + 1, "t": "2000-01-01T00:00:00.000+00:00", **event}).encode()
            self._log.write(line[: len(line) // 2])
            die()
        if phase == "after-log":
            self._write_state = die
        original(self, event)
        die()

    review.RatingSession._save = save


# --- the check --------------------------------------------------------------------------------


def launch(folder: Path, rater: str, seed: int, kill: Optional[Tuple[int, str]]) -> subprocess.Popen:
    args = [sys.executable, str(Path(__file__).resolve()), "rate", str(folder), rater, "--seed", str(seed)]
    if kill:
        args += ["--die-after", str(kill[0]), "--die-at", kill[1]]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8")


def finished(folder: Path, rater: str) -> bool:
    session = review.Session.load(folder)
    state = session.folder / review.RATERS_DIR / review.rater_folder_name(rater)
    if not (state / review.LOG_NAME).is_file():
        return False
    ratings = review.read_ratings(session, state)
    return all(r.state in review.DONE for r in ratings.scans.values())


def run_with_kills(folder: Path, raters: Sequence[str], seed: int, kills: int) -> Dict[str, Any]:
    """Run the raters concurrently, killing them ``kills`` times at random points, then to the end."""
    rng = rng_for(seed, "kills", folder.name)
    done_kills, phases, rounds = 0, {p: 0 for p in PHASES}, 0
    while True:
        todo = [r for r in raters if not finished(folder, r)]
        if not todo:
            break
        rounds += 1
        processes = []
        for rater in todo:
            kill = None
            if done_kills + sum(k is not None for _, _, k in processes) < kills:
                kill = (int(rng.integers(1, 60)), str(rng.choice(PHASES)))
            processes.append((rater, launch(folder, rater, seed, kill), kill))
        for rater, process, kill in processes:
            _, err = process.communicate(timeout=300)
            if process.returncode == -signal.SIGKILL and kill is not None:
                done_kills += 1
                phases[kill[1]] += 1
            elif process.returncode != 0:
                raise RuntimeError(f"rater {rater} failed ({process.returncode}): {err}")
        if rounds > 10 * (kills + 1):
            raise RuntimeError("the raters do not finish")
    return {"kills": done_kills, "phases": phases, "rounds": rounds}


def expected(folder: Path, raters: Sequence[str], seed: int) -> Dict[str, Dict[str, List[Action]]]:
    """Every rater's planned decisions per scan."""
    session = review.Session.load(folder)
    return {rater: {s: plan(seed, rater, s, session.mode, session.ai_findings(s) if session.mode == "assisted"
                            else []) for s in session.scan_ids} for rater in raters}


def verify(folder: Path, raters: Sequence[str], seed: int) -> Dict[str, int]:
    """Each decision planned is in the session exactly once (state and log); problems raise AssertionError."""
    session = review.Session.load(folder)
    plans = expected(folder, raters, seed)
    decisions = 0
    for rater in raters:
        state_folder = session.folder / review.RATERS_DIR / review.rater_folder_name(rater)
        ratings = review.read_ratings(session, state_folder)
        events = [json.loads(line) for line in (state_folder / review.LOG_NAME).read_text().splitlines()]
        assert [e["n"] for e in events] == list(range(1, len(events) + 1))
        assert {e["rater"] for e in events} == {rater}  # no other rater wrote here
        assert review.Ratings.from_json((state_folder / review.STATE_NAME).read_text()).n == len(events)
        for scan_id, actions in plans[rater].items():
            rating = ratings.scans[scan_id]
            logged = [e for e in events if e["scan"] == scan_id and e["event"] != "open"]
            assert len(logged) == len(actions), (rater, scan_id, logged, actions)
            sets = [a for a in actions if a[0] == "set"]
            adds = [a for a in actions if a[0] == "add"]
            for _, cmb_id, status, area in sets:
                assert (rating.marks[cmb_id].status, rating.marks[cmb_id].mars_area) == (status, area)
            own = sorted((m for m in rating.marks.values() if m.origin == "rater"), key=lambda m: m.cmb_id)
            assert [(list(m.ras), m.status, m.mars_area) for m in own] == [(a[1], a[2], a[3]) for a in adds]
            assert len(rating.marks) == len(sets) + len(adds)
            final = actions[-1]
            assert rating.state == (review.SUBMITTED if final[0] == "submit" else review.NOT_RATABLE)
            decisions += len(actions)
    return {"decisions": decisions}


def planned_counts(actions: Sequence[Action]) -> Dict[str, int]:
    """Definite and possible CMBs the decisions give (a mark added without certainty counts as definite)."""
    statuses = [a[2] for a in actions if a[0] in ("set", "add")]
    definite = sum(s in ("definite", "added") for s in statuses)
    return {"definite": definite, "possible": statuses.count("possible")}


def check(root: Path, n_scans: int, raters: Sequence[str], kills: int, seed: int) -> Dict[str, Any]:
    """The whole crash check in ``root``; the report."""
    sessions = make_sessions(root, n_scans, seed)
    report: Dict[str, Any] = {"scans": n_scans, "raters": list(raters)}
    for mode, folder in sessions.items():
        start = time.monotonic()
        run = run_with_kills(folder, raters, seed, kills)
        report[mode] = {**run, **verify(folder, raters, seed), "seconds": round(time.monotonic() - start, 1)}
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("rate")
    one.add_argument("session", type=Path)
    one.add_argument("rater")
    one.add_argument("--seed", type=int, required=True)
    one.add_argument("--die-after", type=int)
    one.add_argument("--die-at", choices=PHASES)
    whole = commands.add_parser("check")
    whole.add_argument("--out", type=Path, default=Path("review_crash_check"))
    whole.add_argument("--scans", type=int, default=50)
    whole.add_argument("--raters", type=int, default=3)
    whole.add_argument("--kills", type=int, default=20)
    whole.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if args.command == "rate":
        if args.die_after:
            arm_kill(args.die_after, args.die_at)
        rate(args.session, args.rater, args.seed)
        return 0
    print(json.dumps(check(args.out, args.scans, RATERS[: args.raters], args.kills, args.seed), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
