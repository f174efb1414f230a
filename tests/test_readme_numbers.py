"""The numbers README.md and docs/ quote from bench/results records equal the records (bench/readme_numbers.py
maps each table cell and quoted phrase to its value), and the check catches a changed number."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import readme_numbers as rn  # noqa: E402


@pytest.mark.parametrize("item", rn.CHECKS, ids=[c.name[:90] for c in rn.CHECKS])
def test_quoted_numbers_equal_their_records(item):
    assert rn.check(item) == []


def test_rounding_rule():
    assert rn.mismatch("0.997", 0.9968) is None
    assert rn.mismatch("84", 83.47) is not None  # "84%" of 0.8347
    assert rn.mismatch("83", 83.47) is None
    assert rn.mismatch("3,190", 3190) is None and rn.mismatch("3,190", 3191) is not None
    assert rn.mismatch("-0.066", -0.0664) is None and rn.mismatch("+0.066", -0.0664) is not None
    assert rn.mismatch("0.015", 0.0139, bound=True) is None and rn.mismatch("0.015", 0.0151, bound=True)


def test_a_changed_table_cell_or_quoted_number_is_caught():
    table = next(c for c in rn.CHECKS if isinstance(c, rn.Table) and c.doc == "README.md" and c.record == rn.DIST)
    text = rn.read_doc("README.md")
    row = "| 1 | 1.226 | 0.114 | 0.395 | 75% | 0.696 | 0.997 | 0.947 | 83% |"
    assert row in text and rn.check(table, text) == []
    problems = rn.check(table, text.replace(row, row.replace("83%", "84%")))
    assert len(problems) == 1 and "row '1' column 9: 84 != 83.47" in problems[0]
    # a row the map does not know, and a mapped row that is gone
    assert "not mapped" in rn.check(table, text.replace(row, row + "\n| 4 | 1 | 1 | 1 | 1% | 1 | 1 | 1 | 1% |"))[0]
    assert "not in the table" in rn.check(table, text.replace(row + "\n", ""))[0]

    quote = next(c for c in rn.CHECKS if isinstance(c, rn.Quote) and "3-hop thought NLLs are" in c.phrase)
    assert rn.check(quote, "the 3-hop\nthought NLLs are 0.108, 0.165 and 0.173.") == []  # lines wrap anywhere
    assert "number 2: 0.166 != 0.1652" in rn.check(quote, "the 3-hop thought NLLs are 0.108, 0.166 and 0.173")[0]
    assert "found 0 times" in rn.check(quote, "the 3-hop thought NLLs were 0.108, 0.165 and 0.173")[0]


def test_numbers_in_prose():
    import re

    assert re.findall(rn.NUMBER, "0.00-0.47, -7% to +9%, 3,190 steps; 0.108, 0.165 and 1,015") == \
        ["0.00", "0.47", "-7", "+9", "3,190", "0.108", "0.165", "1,015"]


def test_the_readme_every_results_page_and_the_bench_page_are_checked():
    pages = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs" / "results").glob("*.md"))
    assert pages and {"README.md", "bench/README.md", *pages} <= set(rn.DOCS)
    assert {c.doc for c in rn.CHECKS} <= set(rn.DOCS)
    assert rn.coverage_problems() == []


def test_an_unchecked_page_and_a_missing_record_are_reported(monkeypatch):
    page = "docs/results/new_experiment.md"
    texts = {page: "Held-out NLL 1.234 (`bench/results/no_such_record_cpu.json`)."}
    read = rn.read_doc
    monkeypatch.setattr(rn, "read_doc", lambda doc: texts[doc] if doc in texts else read(doc))
    monkeypatch.setattr(rn, "DOCS", [*rn.DOCS, page])
    assert rn.coverage_problems() == [
        f"{page}: no table or quote of it is checked",
        f"{page}: names bench/results/no_such_record_cpu.json, which does not exist"]
