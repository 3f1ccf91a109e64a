"""Agreement statistics (SHIVACMBLib.rating.agreement) against published and hand-computed cases."""

import sys

import numpy as np
import pytest

from SHIVACMBLib.rating import agreement, review
from SHIVACMBLib.rating.agreement import Reader
from SHIVACMBLib.errors import RuntimeFailure
from SHIVACMBLib.findings import Finding, write_tsv

# Shrout and Fleiss (1979), Table 2: 6 targets rated by 4 judges; ICC(2,1) = 0.29.
SHROUT_FLEISS = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]


def test_icc_of_the_published_example():
    assert agreement.icc_a1(SHROUT_FLEISS) == pytest.approx(0.2898, abs=1e-4)


def test_icc_by_hand():
    # counts (0, 2), (1, 1), (3, 4): grand mean 11/6; row means 1, 1, 3.5; column means 4/3, 7/3
    # SS rows = 2*(25/36 + 25/36 + 100/36) = 25/3, MSR = 25/6; SS columns = 3*(1/4 + 1/4) = 3/2 = MSC;
    # SS total = (121+1+25+25+49+169)/36 = 65/6, SSE = 65/6 - 50/6 - 9/6 = 1, MSE = 1/2;
    # ICC = (25/6 - 1/2) / (25/6 + 1/2 + 2*(3/2 - 1/2)/3) = (22/6) / (32/6) = 11/16
    assert agreement.icc_a1([[0, 2], [1, 1], [3, 4]]) == pytest.approx(11 / 16)
    assert agreement.icc_a1([[1, 1], [1, 1]]) is None  # no variance at all
    assert agreement.icc_a1([[1, 2]]) is None


def test_kappa_of_the_textbook_example():
    # 50 items: both yes 20, first only 5, second only 10, both no 15: p_o = 0.7, p_e = 0.5, kappa = 0.4
    first = ["yes"] * 25 + ["no"] * 25
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert agreement.cohen_kappa(first, second) == pytest.approx(0.4)
    assert agreement.cohen_kappa(["a", "a"], ["a", "a"]) is None  # chance agreement 1
    assert agreement.cohen_kappa([], []) is None
    with pytest.raises(ValueError):
        agreement.cohen_kappa(["a"], [])


def test_count_categories_and_bland_altman():
    assert [agreement.count_category(n) for n in (0, 1, 2, 4, 5, 30)] == ["0", "1", "2-4", "2-4", ">=5", ">=5"]
    # differences 1, -1, 3: bias 1, SD 2, limits 1 -+ 3.92
    assert agreement.bland_altman([0, 2, 1], [1, 1, 4]) == pytest.approx(
        {"bias": 1.0, "sd": 2.0, "lower": -2.92, "upper": 4.92})
    assert agreement.bland_altman([1], [3]) == {"bias": 2.0, "sd": None, "lower": None, "upper": None}


def test_compare_matches_findings_within_5_mm():
    first = Reader("a", {"s1": np.array([[0, 0, 0], [20, 0, 0]]), "s2": np.zeros((0, 3)), "s3": np.array([[0, 0, 0]])})
    second = Reader("b", {"s1": np.array([[4, 0, 0], [20, 5.5, 0], [40, 0, 0]]), "s2": np.array([[1, 1, 1]]),
                          "s3": np.array([[0, 0, 3]])})
    result = agreement.compare(first, second, ["s1", "s2", "s3"])
    assert result["findings"] == {"n_true": 3, "n_pred": 5, "tp": 2, "fn": 1, "fp": 3, "sensitivity": 2 / 3,
                                  "precision": 2 / 5, "f1": 0.5}
    counts = result["counts"]  # (2, 3), (0, 1), (1, 1)
    assert counts["kappa_presence"] == pytest.approx((2 / 3 - 2 / 3) / (1 - 2 / 3))
    assert counts["pearson_r"] == pytest.approx(np.corrcoef([2, 0, 1], [3, 1, 1])[0, 1])
    assert counts["bland_altman"]["bias"] == pytest.approx(2 / 3)


def finding(cmb_id, ras):
    return Finding(cmb_id, *ras, 1, 1, 1, 5.0, 5)


def test_readers_across_sessions_and_certainty(tmp_path):
    ai = tmp_path / "ai.tsv"
    write_tsv([finding(1, (0, 0, 0)), finding(2, (30, 0, 0))], ai)
    scans = [("s1", tmp_path / "s1.nii.gz"), ("s2", tmp_path / "s2.nii.gz")]
    for mode in review.MODES:
        review.create_session(tmp_path / mode, scans, mode, {"s1": ai})
    with review.RatingSession(tmp_path / "assisted", "ann") as rating:
        rating.set_status("s1", 1, "definite")
        rating.set_status("s1", 2, "possible")
        rating.submit("s1")
        rating.add("s2", (5, 5, 5))  # s2 not submitted: not compared
    with review.RatingSession(tmp_path / "blind", "ann") as rating:
        rating.add("s1", (1, 0, 0), "possible")
        rating.submit("s1")
        rating.not_ratable("s2", "artefact")
    result = agreement.agree([tmp_path / "assisted", tmp_path / "blind"], "definite")
    assert result["readers"] == ["ann@assisted", "ann@blind", "AI"]
    by_pair = {(p["first"], p["second"]): p for p in result["pairs"]}
    intra = by_pair[("ann@assisted", "ann@blind")]
    assert (intra["scans"], intra["findings"]["n_true"], intra["findings"]["n_pred"]) == (1, 1, 0)
    assert by_pair[("ann@assisted", "AI")]["findings"]["tp"] == 1
    everything = agreement.agree([tmp_path / "blind"], "all")
    assert everything["pairs"][0]["findings"] == {**everything["pairs"][0]["findings"], "n_true": 1, "n_pred": 2,
                                                  "tp": 1}
    table = agreement.summary_table(everything)
    assert table.splitlines()[2].split()[:6] == ["ann", "AI", "1", "1", "2", "1"]


def test_plots_need_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RuntimeFailure, match=r"shivacmb\[plots\]"):
        agreement.plot_bland_altman({"pairs": []}, [], tmp_path)


def test_summary_table_prints_whole_reader_names():
    # rater@session names of one rater differ only at the end
    names = ("ann@study-2025-assisted", "ann@study-2025-blind")
    points = {"s1": np.zeros((1, 3)), "s2": np.zeros((0, 3))}
    result = {"certainty": "all", "readers": list(names),
              "pairs": [agreement.compare(Reader(names[0], points), Reader(names[1], points), ["s1", "s2"])]}
    lines = agreement.summary_table(result).splitlines()
    assert lines[2].split()[:6] == [*names, "2", "1", "1", "1"]
    assert lines[1].index("scans") + len("scans") == lines[2].index(" 2 ") + 2  # columns line up
