"""LogiQA items whose options lack punctuation ("A Shannan", "A? text") still get their option texts."""
import json
from pathlib import Path

import pytest

from reflectevo.data.verifiers import check_choice, parse_options

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "reflectevo_test" / "logiqa_test.jsonl"


def test_unpunctuated_option_lines_are_options():
    q = "Who won?\nA Shannan\nB Jiangnan\nC Shanbei\nD Jiangbei"
    assert parse_options(q) == {"a": "Shannan", "b": "Jiangnan", "c": "Shanbei", "d": "Jiangbei"}
    assert check_choice("Shanbei", "c", q)
    assert not check_choice("Jiangnan", "c", q)


def test_question_mark_after_letter_and_mixed_block():
    q = "Which?\nA? Many buy homes\nB? Turnover rose\nC.Speculators exist\nD.Risk was small"
    assert parse_options(q) == {"a": "Many buy homes", "b": "Turnover rose", "c": "Speculators exist",
                                "d": "Risk was small"}
    q2 = "Which must be false?\nA All athletes want it.\nB.Some want it.\nC.One does not.\nD.Anyone wants it."
    assert parse_options(q2)["a"] == "All athletes want it."


def test_sentences_starting_with_article_a_are_not_options():
    assert parse_options("A man came in.\nHe left.\nWhy?") == {}
    assert parse_options("Intro.\nA man came in.\nBut he left.") == {}
    # punctuated options win when the loose reading finds no more letters
    assert parse_options("A man came.\nQ?\nA. one\nB. two") == {"a": "one", "b": "two"}
    # letters out of order are not a loose block
    assert parse_options("Q?\nB first\nA second") == {}


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")
def test_official_logiqa_items_have_four_options():
    items = [json.loads(line) for line in SHARED.read_text().splitlines() if line.strip()]
    short = [it["id"] if "id" in it else i for i, it in enumerate(items) if len(parse_options(it["question"])) != 4]
    # one item garbles two option letters into the text ("City A.B", "City D.B"): it cannot be read back
    assert len(short) <= 1, short
