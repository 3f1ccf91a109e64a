"""Rating sessions (SHIVACMBLib.rating.review): create, rate, blind invariants, crash and resume, concurrent
raters, export; `shivacmb review` commands."""

import datetime as dt
import json
import math
import os
import signal
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr
from scipy.stats.contingency import crosstab

import review_sim
from helpers import run_cli
from SHIVACMBLib.rating import review
from SHIVACMBLib.rating.export import SCAN_COLUMNS
from SHIVACMBLib.errors import InputError, RuntimeFailure
from SHIVACMBLib.findings import Finding, write_tsv
from SHIVACMBLib.mars import AREAS, UNKNOWN
from SHIVACMBLib.rating.review import RatingSession

POSIX_ONLY = pytest.mark.skipif(os.name != "posix", reason="kills with SIGKILL")


def ai_finding(cmb_id, ras, area="lobar"):
    return Finding(cmb_id, *ras, 1, 2, 3, 10.0, 10, 0.9, 0.8, 1.0, mars_area=area, side="left")


class Clock:
    """Seconds from a fixed start, advanced by the test."""

    def __init__(self):
        self.now = dt.datetime(2025, 3, 1, 9, 0, tzinfo=dt.timezone.utc)

    def __call__(self):
        return self.now

    def tick(self, seconds):
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture()
def scans(tmp_path):
    """Three fake scans in a BIDS-like folder, and AI results for the first two."""
    for sub in ("01", "02", "03"):
        folder = tmp_path / "bids" / f"sub-{sub}" / "anat"
        folder.mkdir(parents=True)
        (folder / f"sub-{sub}_swi.nii.gz").touch()
    (tmp_path / "bids" / ".hidden.nii.gz").touch()
    ai = tmp_path / "ai"
    (ai / "sub-01_swi").mkdir(parents=True)
    write_tsv([ai_finding(1, (10, 20, 30)), ai_finding(2, (-30, 5, 0), "deep")], ai / "sub-01_swi" / "findings.tsv")
    write_tsv([ai_finding(1, (0, 0, -30), "infratentorial")], ai / "sub-02_swi.tsv")
    return tmp_path


def new_session(scans, mode):
    found = review.scans_from(scans / "bids")
    return review.create_session(scans / mode, found, mode, review.ai_results(scans / "ai", [s for s, _ in found]))


def test_session_from_a_bids_folder_or_a_list(scans):
    session = new_session(scans, "assisted")
    assert session.scan_ids == ["sub-01_swi", "sub-02_swi", "sub-03_swi"]
    assert [s.ai for s in session.scans] == ["ai/sub-01_swi.tsv", "ai/sub-02_swi.tsv", None]
    assert Path(session.scans[2].path) == (scans / "bids" / "sub-03" / "anat" / "sub-03_swi.nii.gz").resolve()
    assert [f.cmb_id for f in session.ai_findings("sub-01_swi")] == [1, 2]
    listing = scans / "list.tsv"
    listing.write_text("scan_id\tpath\nfirst\tbids/sub-02/anat/sub-02_swi.nii.gz\n\tbids/sub-01/anat/sub-01_swi.nii.gz\n")
    assert [(i, p.name) for i, p in review.scans_from(listing)] == [("first", "sub-02_swi.nii.gz"),
                                                                     ("sub-01_swi", "sub-01_swi.nii.gz")]
    (scans / "bad.csv").write_text("file\nx.nii\n")
    with pytest.raises(InputError, match="'path' column"):
        review.scans_from(scans / "bad.csv")
    with pytest.raises(InputError, match="already holds"):
        new_session(scans, "assisted")
    with pytest.raises(InputError, match="given twice"):
        review.create_session(scans / "twice", [("a", "x"), ("a", "y")], "blind")
    with pytest.raises(InputError, match="not in the list"):
        review.create_session(scans / "unknown", [("a", "x")], "blind", {"b": scans / "ai" / "sub-02_swi.tsv"})
    assert not (scans / "unknown").exists() and not (scans / "twice").exists()


def test_assisted_rating_counts_time_and_rules(scans):
    new_session(scans, "assisted")
    clock = Clock()
    with RatingSession(scans / "assisted", "Dr Ann Lee", clock) as rating:
        assert rating.current_index() == 0
        rating.open_scan("sub-01_swi")
        clock.tick(10)
        rating.set_status("sub-01_swi", 1, "definite", side="right")
        clock.tick(5)
        assert rating.add("sub-01_swi", (1, 2, 3)) == 3  # numbered after the AI findings
        with pytest.raises(InputError, match="CMB 2 not reviewed"):
            rating.submit("sub-01_swi")
        with pytest.raises(InputError, match="status 'maybe'"):
            rating.set_status("sub-01_swi", 2, "maybe")
        with pytest.raises(InputError, match="no CMB 9"):
            rating.set_status("sub-01_swi", 9, "definite")
        rating.set_status("sub-01_swi", 2, "possible", mars_area="deep", note="near  a\tvein")
        clock.tick(5)
        rating.submit("sub-01_swi")
        clock.tick(100)  # idle between scans: not rating time
        rating.open_scan("sub-02_swi")
        clock.tick(7)
        rating.not_ratable("sub-02_swi", "motion", note="severe")
        with pytest.raises(InputError, match="reopen it first"):
            rating.set_status("sub-01_swi", 1, "rejected")
        with pytest.raises(InputError, match="reopen it first"):
            rating.open_scan("sub-02_swi")
        assert rating.current_index() == 2
        shown = rating.findings("sub-01_swi")
        assert [(f.cmb_id, f.status, f.side, f.note, f.rater) for f in shown] == [
            (1, "definite", "right", "", "Dr Ann Lee"), (2, "possible", "left", "near a vein", "Dr Ann Lee"),
            (3, "added", "n/a", "", "Dr Ann Lee")]
        one = rating.rating("sub-01_swi")
        assert one.counts() == {"definite": 2, "possible": 1, "total": 3}
        assert rating.ratings.seconds("sub-01_swi") == 20 and rating.ratings.seconds("sub-02_swi") == 7
        rating.reopen("sub-01_swi")
        assert rating.current_index() == 0
    assert (scans / "assisted" / "raters" / "Dr_Ann_Lee" / "state.json").is_file()


def test_statuses_in_the_ai_file_are_not_the_raters(scans):
    """AI results that were reviewed before (a saved, corrected findings.tsv): the rater still reviews each."""
    reviewed = [replace(ai_finding(1, (10, 20, 30)), status="definite", rater="someone", note="seen"),
                replace(ai_finding(2, (-30, 5, 0)), status="rejected")]
    write_tsv(reviewed, scans / "ai" / "sub-01_swi" / "findings.tsv")
    new_session(scans, "assisted")
    with RatingSession(scans / "assisted", "ann") as rating:
        assert [(f.status, f.rater, f.note) for f in rating.findings("sub-01_swi")] == [("unreviewed", "n/a", "")] * 2
        with pytest.raises(InputError, match="CMB 1, 2 not reviewed"):
            rating.submit("sub-01_swi")
        rating.set_status("sub-01_swi", 2, "possible")
        assert [f.status for f in rating.findings("sub-01_swi")] == ["unreviewed", "possible"]


def test_blind_mode_hides_the_ai_until_submit_and_keeps_the_marks(scans):
    new_session(scans, "blind")
    with RatingSession(scans / "blind", "bob") as rating:
        with pytest.raises(InputError, match="only after the scan is submitted"):
            rating.ai_findings("sub-01_swi")
        assert rating.findings("sub-01_swi") == []
        with pytest.raises(InputError, match="no CMB 1"):
            rating.set_status("sub-01_swi", 1, "definite")  # an AI id is not the rater's to rate
        assert rating.add("sub-01_swi", (10.5, 20, 30), "definite") == 1  # the AI's count does not show
        assert rating.add("sub-01_swi", (50, 50, 50)) == 2
        rating.set_status("sub-01_swi", 2, "rejected")
        assert [(f.cmb_id, f.status) for f in rating.findings("sub-01_swi")] == [(1, "definite"), (2, "rejected")]
        rating.submit("sub-01_swi")
        assert [f.cmb_id for f in rating.ai_findings("sub-01_swi")] == [1, 2]
        assert [f.cmb_id for f in rating.findings("sub-01_swi")] == [1, 2]  # still only the blind marks
        for change in (lambda: rating.add("sub-01_swi", (0, 0, 0)),
                       lambda: rating.set_status("sub-01_swi", 1, "possible"), lambda: rating.reopen("sub-01_swi")):
            with pytest.raises(InputError, match="blind"):
                change()
        with pytest.raises(InputError, match="only after"):
            rating.ai_findings("sub-02_swi")
    files = scans / "blind" / "raters" / "bob"
    text = (files / "log.jsonl").read_text() + (files / "state.json").read_text()
    assert "-30" not in text and "infratentorial" not in text  # nothing of the AI in the rater's files


def test_one_rater_one_open_session_and_raters_never_share_files(scans):
    new_session(scans, "blind")
    with RatingSession(scans / "blind", "ann"):
        with pytest.raises(InputError, match="open elsewhere"):
            RatingSession(scans / "blind", "ann")
        with RatingSession(scans / "blind", "bob") as other:
            other.add("sub-03_swi", (1, 1, 1))
    with RatingSession(scans / "blind", "ann") as again:  # the lock went with the session
        again.add("sub-03_swi", (2, 2, 2))
    assert sorted(p.name for p in (scans / "blind" / "raters").iterdir()) == ["ann", "bob"]
    with pytest.raises(InputError, match="holds the ratings of 'ann'"):
        RatingSession(scans / "blind", "ann.")  # another name, the same folder


@POSIX_ONLY
@pytest.mark.parametrize("phase, kept", [("before-log", 3), ("torn-log", 3), ("after-log", 4), ("after-state", 4)])
def test_kill_during_a_change_loses_at_most_that_change(scans, phase, kept):
    """A rater process killed during its fourth change (open, two statuses, then an added CMB)."""
    new_session(scans, "assisted")
    script = (f"import review_sim; review_sim.arm_kill(4, {phase!r}); "
              f"from SHIVACMBLib.rating.review import RatingSession\n"
              f"with RatingSession({str(scans / 'assisted')!r}, 'ann') as s:\n"
              "    s.open_scan('sub-01_swi'); s.set_status('sub-01_swi', 1, 'definite')\n"
              "    s.set_status('sub-01_swi', 2, 'rejected'); s.add('sub-01_swi', (5, 5, 5))\n"
              "raise SystemExit('not killed')\n")
    process = subprocess.run([sys.executable, "-c", script], cwd=Path(review_sim.__file__).parent,
                             capture_output=True, encoding="utf-8")
    assert process.returncode == -signal.SIGKILL, process.stderr
    log = scans / "assisted" / "raters" / "ann" / "log.jsonl"
    assert log.read_bytes().endswith(b"\n") == (phase != "torn-log")
    with RatingSession(scans / "assisted", "ann") as rating:
        assert rating.ratings.n == kept
        marks = rating.rating("sub-01_swi").marks
        assert [m.status for m in marks.values()] == ["definite", "rejected", "added"][: kept - 1]
        if kept == 3:  # the rater sees the CMB is not there and adds it again
            rating.add("sub-01_swi", (5, 5, 5))
        rating.submit("sub-01_swi")
    lines = log.read_text().splitlines()
    assert [json.loads(line)["n"] for line in lines] == [1, 2, 3, 4, 5]
    assert [json.loads(line)["event"] for line in lines] == ["open", "set", "set", "add", "submit"]
    assert review.Ratings.from_json(log.with_name("state.json").read_text()).n == 5


def test_damaged_files_are_named(scans):
    new_session(scans, "blind")
    with RatingSession(scans / "blind", "ann") as rating:
        for point in ((1, 1, 1), (2, 2, 2), (3, 3, 3)):
            rating.add("sub-01_swi", point)
    folder = scans / "blind" / "raters" / "ann"
    lines = (folder / "log.jsonl").read_text().splitlines(keepends=True)
    (folder / "log.jsonl").write_text(lines[0] + lines[2])
    with pytest.raises(InputError, match=r"log.jsonl: line 2 is numbered 3"):
        RatingSession(scans / "blind", "ann")
    (folder / "log.jsonl").write_text(lines[0] + "garbage\n" + lines[2])
    with pytest.raises(InputError, match="line 2 is not a rating event"):
        RatingSession(scans / "blind", "ann")
    (folder / "log.jsonl").write_text(lines[0])
    with pytest.raises(InputError, match="state.json: is ahead of log.jsonl"):
        RatingSession(scans / "blind", "ann")
    (folder / "state.json").unlink()  # a lost state is rebuilt from the log
    with RatingSession(scans / "blind", "ann") as rating:
        assert len(rating.rating("sub-01_swi").marks) == 1


class HalfWrites:
    """The rater's log on a full disk: half of each line reaches the file."""

    def __init__(self, log):
        self.log = log

    def write(self, data):
        return self.log.write(data[: len(data) // 2])

    def fileno(self):
        return self.log.fileno()


def test_a_change_that_fails_to_save_leaves_the_log_readable(scans):
    new_session(scans, "blind")
    with RatingSession(scans / "blind", "ann") as rating:
        rating.add("sub-01_swi", (1, 1, 1))
        log = rating._log
        rating._log = HalfWrites(log)
        with pytest.raises(RuntimeFailure, match="cannot save the change"):
            rating.add("sub-01_swi", (2, 2, 2))
        rating._log = log  # space again: the rater goes on
        assert rating.add("sub-01_swi", (3, 3, 3)) == 2
    with RatingSession(scans / "blind", "ann") as rating:
        assert [m.ras for m in rating.rating("sub-01_swi").marks.values()] == [(1, 1, 1), (3, 3, 3)]
        assert rating.ratings.n == 2


def test_concurrent_raters(tmp_path):
    """Three rater processes at once on one session: each finishes with exactly its own decisions, in its own
    files; the files they share are only read."""
    sessions = review_sim.make_sessions(tmp_path, 8, seed=3)
    raters = review_sim.RATERS[:3]
    shared = {p: p.read_bytes() for p in sessions["assisted"].rglob("*") if p.is_file()}
    processes = [review_sim.launch(sessions["assisted"], rater, 3, None) for rater in raters]
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read()
    assert review_sim.verify(sessions["assisted"], raters, 3)["decisions"] > 8 * 3
    assert {p: p.read_bytes() for p in shared} == shared
    written = {p.relative_to(sessions["assisted"]).parts[:2] for p in sessions["assisted"].rglob("*")
               if p.is_file() and p not in shared}
    assert written == {("raters", rater) for rater in raters}


def test_review_commands(scans):
    bids, ai = scans / "bids", scans / "ai"
    made = run_cli(["review", "new", scans / "s", "--scans", bids, "--ai", ai, "--mode", "blind"])
    assert made.returncode == 0 and "blind session of 3 scan(s), 2 with AI findings" in made.stdout
    again = run_cli(["review", "new", scans / "s", "--scans", bids])
    assert again.returncode == 2 and again.stderr.strip().endswith("already holds a rating session")
    assert len(again.stderr.strip().splitlines()) == 1
    missing = run_cli(["review", "status", scans / "nothing"])
    assert missing.returncode == 2 and "not a rating session" in missing.stderr
    with RatingSession(scans / "s", "ann") as rating:
        rating.add("sub-01_swi", (10, 20, 30), "possible", mars_area="lobar")
        rating.submit("sub-01_swi")
    status = run_cli(["review", "status", scans / "s", "--json"])
    row = json.loads(status.stdout)["raters"][0]
    assert (row["rater"], row["submitted"], row["possible"], row["next_scan"]) == ("ann", 1, 1, "sub-02_swi")
    export = run_cli(["review", "export", scans / "s", "--out", scans / "export"])
    assert export.returncode == 0 and "3 scan rating(s)" in export.stdout
    rows = (scans / "export" / "ratings_scans.tsv").read_text().splitlines()
    assert rows[0].split("\t") == list(SCAN_COLUMNS)
    first = dict(zip(SCAN_COLUMNS, rows[1].split("\t")))
    assert (first["state"], first["possible"], first["possible_lobar"], first["definite"]) == ("submitted", "1",
                                                                                                 "1", "0")
    found = (scans / "export" / "ratings_findings.tsv").read_text().splitlines()
    assert len(found) == 2 and found[1].split("\t")[5:8] == ["rater", "possible", "10.0"]


@POSIX_ONLY
def test_fifty_scans_three_raters_twenty_kills(tmp_path):
    """The crash check: every decision once, exports equal to the decisions, `review agree` as computed here."""
    raters = review_sim.RATERS[:3]
    report = review_sim.check(tmp_path, n_scans=50, raters=raters, kills=20, seed=7)
    sessions = [tmp_path / f"session-{mode}" for mode in review.MODES]
    for mode in review.MODES:
        assert report[mode]["kills"] == 20 and all(report[mode]["phases"].values()), report
    plans = {folder.name: review_sim.expected(folder, raters, 7) for folder in sessions}
    check_export(sessions, plans, 7, tmp_path / "export")
    check_agree_command(sessions, plans, 7, tmp_path, "all", plots=True)
    check_agree_command(sessions, plans, 7, tmp_path, "definite", plots=False)


# --- the export and `shivacmb review agree` against a computation from the raters' plans ------


CERTAINTY = {"added": "definite", "definite": "definite", "possible": "possible"}
KEPT = {"all": ("added", "definite", "possible"), "definite": ("added", "definite")}


def planned_rows(actions, ai):
    """(cmb status, MARS area column) of what a plan's decisions rate; ``ai``: the scan's AI findings by id."""
    rated = []
    for action in actions:
        if action[0] == "set":
            rated.append((action[2], ai[action[1]].mars_area if action[3] == "n/a" else action[3]))
        elif action[0] == "add":
            rated.append((action[2], "unknown" if action[3] == "n/a" else action[3]))
    return rated


def check_export(sessions, plans, seed, out):
    completed = run_cli(["review", "export", *sessions, "--out", out])
    assert completed.returncode == 0, completed.stderr
    lines = (out / "ratings_scans.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(lines) == 2 * 50 * 3
    areas = [f"{c}_{a}" for c in ("definite", "possible") for a in AREAS + (UNKNOWN,)]
    for line in lines:
        row = dict(zip(SCAN_COLUMNS, line.split("\t")))
        actions = plans[row["session"]][row["rater"]][row["scan_id"]]
        ai = {f.cmb_id: f for f in review_sim.ai_findings(seed, row["scan_id"])}
        expected = dict.fromkeys(areas, 0)
        for status, area in planned_rows(actions, ai):
            if status in CERTAINTY:
                expected[f"{CERTAINTY[status]}_{area}"] += 1
        definite = sum(v for k, v in expected.items() if k.startswith("definite"))
        possible = sum(v for k, v in expected.items() if k.startswith("possible"))
        assert {k: int(row[k]) for k in areas} == expected, row
        assert (int(row["definite"]), int(row["possible"]), int(row["total"])) == (definite, possible,
                                                                                   definite + possible)
        assert row["state"] == ("submitted" if actions[-1][0] == "submit" else "not ratable")
    rated = sum(len(planned_rows(actions, {f.cmb_id: f for f in review_sim.ai_findings(seed, scan)}))
                for by_rater in plans.values() for by_scan in by_rater.values() for scan, actions in by_scan.items())
    assert len((out / "ratings_findings.tsv").read_text(encoding="utf-8").splitlines()) - 1 == rated


def planned_points(actions, ai, kept):
    """The CMBs a rater's plan counts (None: the scan is not submitted)."""
    if actions[-1][0] != "submit":
        return None
    return ([list(ai[a[1]].ras) for a in actions if a[0] == "set" and a[2] in kept]
            + [a[1] for a in actions if a[0] == "add" and a[2] in kept])


def greedy_pairs(first, second):
    """Pairs within 5 mm, closest first (the plans' points are far apart, so this is the one-to-one optimum)."""
    candidates = sorted((math.dist(p, q), i, j) for i, p in enumerate(first) for j, q in enumerate(second))
    used_i, used_j = set(), set()
    for distance, i, j in candidates:
        if distance <= 5 and i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
    return len(used_i)


def icc_by_sums(a, b):
    n, rows = len(a), list(zip(a, b))
    grand = (sum(a) + sum(b)) / (2 * n)
    ss_rows = 2 * sum(((x + y) / 2 - grand) ** 2 for x, y in rows)
    ss_cols = n * ((statistics.mean(a) - grand) ** 2 + (statistics.mean(b) - grand) ** 2)
    ss_total = sum((v - grand) ** 2 for v in a + b)
    ms_rows, ms_cols = ss_rows / (n - 1), ss_cols
    ms_error = (ss_total - ss_rows - ss_cols) / (n - 1)
    return (ms_rows - ms_error) / (ms_rows + ms_error + 2 * (ms_cols - ms_error) / n)


def kappa_of_table(a, b):
    """Cohen's kappa from the contingency table of the two raters' labels."""
    labels = sorted(set(a) | set(b))
    table = crosstab(a, b, levels=(labels, labels)).count / len(a)
    chance = table.sum(axis=1) @ table.sum(axis=0)
    return (np.trace(table) - chance) / (1 - chance)


def category(n):
    return "0" if n == 0 else "1" if n == 1 else "2-4" if n < 5 else "5+"


def check_agree_command(sessions, plans, seed, tmp_path, certainty, plots):
    kept = KEPT[certainty]
    points = {}
    for session, by_rater in plans.items():
        for rater, by_scan in by_rater.items():
            points[f"{rater}@{session}"] = {s: planned_points(actions, {f.cmb_id: f for f in review_sim.ai_findings(
                seed, s)}, kept) for s, actions in by_scan.items()}
    points["AI"] = {s: [list(f.ras) for f in review_sim.ai_findings(seed, s)] for s in review_sim.scan_ids(50)}
    out = tmp_path / f"agree-{certainty}.json"
    command = ["review", "agree", *sessions, "--certainty", certainty, "--out", out]
    completed = run_cli(command + (["--plots", tmp_path / "figures"] if plots else []))
    assert completed.returncode == 0, completed.stderr
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["readers"] == list(points)
    assert len(result["pairs"]) == 21
    printed = {tuple(line.split()[:2]): line.split()[2:] for line in completed.stdout.splitlines()[2:23]}
    for pair in result["pairs"]:
        first, second = points[pair["first"]], points[pair["second"]]
        scans = [s for s in first if first[s] is not None and second.get(s) is not None]
        a = [len(first[s]) for s in scans]
        b = [len(second[s]) for s in scans]
        tp = sum(greedy_pairs(first[s], second[s]) for s in scans)
        f, c = pair["findings"], pair["counts"]
        assert (pair["scans"], f["n_true"], f["n_pred"], f["tp"]) == (len(scans), sum(a), sum(b), tp)
        assert f["f1"] == pytest.approx(2 * tp / (sum(a) + sum(b)))
        icc, r = icc_by_sums(a, b), pearsonr(a, b)[0]
        presence = kappa_of_table([x > 0 for x in a], [y > 0 for y in b])
        categories = kappa_of_table([category(x) for x in a], [category(y) for y in b])
        assert (c["icc_a1"], c["pearson_r"]) == (pytest.approx(icc), pytest.approx(r))
        assert (c["kappa_presence"], c["kappa_categories"]) == (pytest.approx(presence), pytest.approx(categories))
        differences = [y - x for x, y in zip(a, b)]
        bias, sd = statistics.mean(differences), statistics.stdev(differences)
        ba = c["bland_altman"]
        assert (ba["bias"], ba["sd"], ba["lower"], ba["upper"]) == (
            pytest.approx(bias), pytest.approx(sd), pytest.approx(bias - 1.96 * sd), pytest.approx(bias + 1.96 * sd))
        assert printed[pair["first"], pair["second"]] == [
            str(len(scans)), str(sum(a)), str(sum(b)), str(tp), f"{2 * tp / (sum(a) + sum(b)):.3f}", f"{icc:.3f}",
            f"{r:.3f}", f"{presence:.3f}", f"{categories:.3f}", f"{bias:.2f}", f"{bias - 1.96 * sd:.2f}", "to",
            f"{bias + 1.96 * sd:.2f}"]
    if plots:
        figures = sorted((tmp_path / "figures").iterdir())
        assert len(figures) == 21 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in figures)
        assert completed.stdout.count("figure -> ") == 21
