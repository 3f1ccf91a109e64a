"""findings.tsv / JSON: exact columns, round trips, missing values, errors."""

import pytest

from SHIVACMBLib.errors import InputError
from SHIVACMBLib.findings import (COLUMNS, DELETED, EDITED, Finding, add_note, is_deleted, is_edited, read_findings,
                                  read_json, read_tsv, remove_note, to_tsv, write_json, write_tsv)

DESIGN_COLUMNS = ("cmb_id r a s i j k volume_mm3 voxels max_prob mean_prob fold_agreement region mars_area side "
                  "status rater note").split()


def sample():
    return [
        Finding(1, 12.345, -6.5, 30.0, 120, 88, 40, 23.456, 19, 0.99123, 0.81234, 1.0),
        Finding(2, -1.0, 2.0, -3.0, 5, 6, 7, 4.0, 3, None, None, None, status="added", rater="jd",
                note="missed\tby the\nmodel"),
    ]


def test_columns_are_exactly_the_design():
    assert list(COLUMNS) == DESIGN_COLUMNS
    assert to_tsv([]).splitlines() == ["\t".join(DESIGN_COLUMNS)]


def test_tsv_round_trip_with_missing_values(tmp_path):
    path = tmp_path / "findings.tsv"
    write_tsv(sample(), path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[1].split("\t")[:12] == ["1", "12.35", "-6.50", "30.00", "120", "88", "40", "23.46", "19",
                                         "0.9912", "0.8123", "1.000"]
    assert lines[2].split("\t")[9:12] == ["n/a", "n/a", "n/a"]
    assert lines[2].split("\t")[-1] == "missed by the model"  # no tab or newline inside a cell
    back = read_tsv(path)
    assert back[1].max_prob is None and back[1].status == "added" and back[1].rater == "jd"
    assert back[0].r == pytest.approx(12.35) and back[0].region == "n/a"


def test_json_round_trip(tmp_path):
    path = tmp_path / "findings.json"
    write_json(sample(), path)
    back = read_findings(path)
    assert back[0] == sample()[0]
    assert back[1].fold_agreement is None and back[1].note == "missed\tby the\nmodel"
    assert read_json(path) == back


def test_columns_in_another_order_are_read(tmp_path):
    text = to_tsv(sample()).splitlines()
    rows = [line.split("\t") for line in text]
    order = list(reversed(range(len(COLUMNS))))
    (tmp_path / "f.tsv").write_text("\n".join("\t".join(r[i] for i in order) for r in rows) + "\n")
    assert [f.cmb_id for f in read_tsv(tmp_path / "f.tsv")] == [1, 2]


def test_bad_tables_are_refused_with_the_line(tmp_path):
    path = tmp_path / "f.tsv"
    path.write_text("cmb_id\tr\n1\t2\n")
    with pytest.raises(InputError, match="lacks column"):
        read_tsv(path)
    write_tsv(sample(), path)
    path.write_text(path.read_text(encoding="utf-8").replace("unreviewed", "maybe"))
    with pytest.raises(InputError, match="line 2: status 'maybe'"):
        read_tsv(path)
    path.write_text("")
    with pytest.raises(InputError, match="empty findings table"):
        read_tsv(path)


def test_status_vocabulary():
    with pytest.raises(ValueError):
        Finding(1, 0, 0, 0, 0, 0, 0, 1.0, 1, status="deleted")


def test_notes():
    assert add_note("", EDITED) == "edited"
    assert add_note("small; edited", EDITED) == "small; edited"
    assert add_note("small", DELETED) == "small; segment deleted"
    assert remove_note("small; edited", EDITED) == "small"
    assert remove_note("edited", EDITED) == ""
    assert is_edited(Finding(1, 0, 0, 0, 0, 0, 0, 1.0, 1, note="small; edited"))
    assert is_deleted(Finding(1, 0, 0, 0, 0, 0, 0, 1.0, 1, note=DELETED)) and not is_deleted(sample()[0])
