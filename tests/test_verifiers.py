"""Answer checkers: multiple choice, MATH equivalence, free text, numbers, and answer extraction."""
import pytest

from reflectevo.data import get_task
from reflectevo.data.math_equiv import is_equiv, last_boxed, normalize_answer, numeric_value
from reflectevo.data.prompts import DEFAULT as P, extract_answer
from reflectevo.data.verifiers import (check_choice, check_number, exact_match, f1_score, parse_choice,
                                       parse_options, squad_normalize)

QUESTION = "Is the claim supported?\nOptions:\nA. True\nB. False\nC. Neither"


@pytest.mark.parametrize("pred", ["B", "b", " B ", "(b)", "(B)", "[B]", "B.", "B)", "b:", "B. False",
                                  "B False", "(B) False", "Option B", "The answer is (B)", "answer: b",
                                  "False", "false.", "**B**"])
def test_choice_positive(pred):
    assert check_choice(pred, "b", QUESTION)


@pytest.mark.parametrize("pred", ["C", "A. True", "True", "", None, "None of the above", "Both", "E",
                                  "Neither of them is right"])
def test_choice_negative(pred):
    assert not check_choice(pred, "b", QUESTION)


def test_choice_without_question_and_options_parsing():
    assert parse_choice("d. The cost is too high") == "d"
    assert parse_choice("entailment") is None
    opts = parse_options("Q?\nA.one\nB.two\nC. C. three\n(D) four")
    assert opts == {"a": "one", "b": "two", "c": "three", "d": "four"}
    assert check_choice("three", "c", "Q?\nA.one\nB.two\nC. C. three")


MATH_EQUIV = [
    ("\\frac{1}{2}", "0.5"), ("\\dfrac{1}{2}", "\\frac12"), ("1/2", "\\frac{1}{2}"), ("\\boxed{5}", "5"),
    ("x = 5", "5"), ("k=7", "7"), ("5^\\circ", "5"), ("90^{\\circ}", "90"), ("\\$5", "5"), ("$5$", "5"),
    ("5 \\text{ cm}", "5"), ("\\left( 1, 2 \\right)", "(1,2)"), ("\\sqrt2", "\\sqrt{2}"),
    ("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}"), ("1,000", "1000"), ("1{,}000", "1000"), ("007", "7"),
    ("-\\frac{11}{2}", "-5.5"), ("\\frac{-11}{2}", "-\\frac{11}{2}"), ("2.50", "\\frac{5}{2}"), ("10\\%", "10"),
    ("\\text{(A)}", "(A)"), ("\\tfrac{3}{4}", "0.75"), ("2\\frac{1}{2}", "\\frac{5}{2}"), ("+3", "3"),
    ("\\fbox{12}", "12"), ("(1.0, 2)", "(1,2)"), ("[-1, \\frac{1}{2})", "[-1,0.5)"), ("3.", "3"),
    ("\\frac{6}{8}", "\\frac{3}{4}"), ("2 \\pi", "2\\pi"), ("\\frac{1}{\\sqrt2}", "\\frac{1}{\\sqrt{2}}"),
    (".5", "\\frac12"), ("\\!1,\\!234", "1234"), ("-0.25", "-\\frac14"), ("\\left[0, 3\\right]", "[0,3]"),
    ("\\{1, 2\\}", "\\{1,2\\}"), ("10^{\\circ}", "10"), ("y = 2x + 3", "2x+3"),
    # LaTeX skips spaces before a command's arguments (the MATH test set has a gold "\\frac 9{20}")
    ("\\frac 9{20}", "\\frac{9}{20}"), ("\\frac 12", "0.5"), ("\\dfrac {3} {4}", "0.75"),
    ("\\begin{pmatrix} 6 \\\\ 3 \\\\ 0 \\end{pmatrix}", "\\begin{pmatrix}6\\\\3\\\\0\\end{pmatrix}"),
    # units are a trailing \\text{ ...} or \\mbox{ ...} group (both spellings are MATH test-set golds)
    ("864 \\mbox{ inches}^2", "864"), ("864 \\mbox{ inches}^2", "864 \\text{ inches}^2"),
    ("19 \\text{ and }43", "19 \\text{ and } 43"),
]
# a unit group without a leading space is still a unit when it holds letters only (optionally squared or cubed)
MATH_UNIT_NO_SPACE = [
    ("18\\text{integers}", "18"), ("5\\text{cm}", "5"), ("864\\mbox{inches}^2", "864"), ("10\\text{ cents}", "10"),
    ("18\\text{integers}", "18 \\text{ integers}"), ("45\\text{units}^{2}", "45 \\text{ units}^2"),
    ("8\\text{m}^3", "8"), ("5\\text{cm}.", "5"), ("\\frac{3}{4}\\pi\\text{inches}", "\\frac{3}{4}\\pi\\text{ inches}"),
    ("$5\\,\\text{cm}$", "5"), ("\\boxed{ \\text{Dana}}", "\\text{Dana}"),
]
# a sentence period after an interval or a tuple is not part of it
MATH_TRAILING_PERIOD = [
    ("(-\\infty, 3].", "(-\\infty,3]"), ("[2, 5).", "[2,5)"), ("(1, 2).", "(1,2)"), ("\\left( 1, 2 \\right).", "(1,2)"),
    ("(0.5, 1.5).", "(\\frac12,\\frac32)"), ("\\{1, 2\\}.", "\\{1,2\\}"), ("3.", "3"), ("0.5.", "\\frac12"),
    ("(1, 2) .", "(1,2)"), ("(-\\infty, \\tfrac37] \\cup [\\tfrac35, \\infty) .", "(-\\infty,\\frac37]\\cup[\\frac35,\\infty)"),
    ("x = .5", "\\frac12"), ("(.5, 1)", "(0.5,1)"),
]
MATH_DIFFERENT = [
    ("5", "6"), ("\\frac{1}{2}", "\\frac{1}{3}"), ("(1,2)", "(2,1)"), ("", "5"), (None, "5"), ("\\sqrt{2}", "2"),
    ("x^2", "x^3"), ("-5", "5"), ("1,000", "100"), ("0.333", "\\frac13"), ("5 \\text{ cm}", "6"),
    ("2\\frac{1}{2}", "2"), ("\\boxed{4}", "5"), ("12", "1,2"), ("[0,3]", "(0,3)"), ("\\frac{1}{0}", "1"),
    ("\\pi", "3.14"),
    # a matrix row separator is not LaTeX spacing: the entries stay apart
    ("\\begin{pmatrix} 1 \\\\ 23 \\end{pmatrix}", "\\begin{pmatrix} 12 \\\\ 3 \\end{pmatrix}"),
    # "\\text{ and }" between two numbers is not a unit: the second number counts
    ("19", "19 \\text{ and }43"), ("43", "19 \\text{ and }43"),
    # a text group followed by more of the answer, or not of letters only, is not a unit; units do not change values
    ("19\\text{and}43", "19"), ("19\\text{ and}43", "19"), ("18\\text{integers}", "19"), ("5\\text{cm}", "50"),
    ("3+4\\text{i}", "3+4"), ("2\\text{e}", "2"), ("5\\text{(A)}", "5"), ("5\\text{cm}", "cm"),
    # a trailing period does not change brackets or eat digits
    ("(1,2)", "[1,2]"), ("(1, 2).", "[1,2]"), ("[2, 5).", "[2,5]"), ("(-\\infty, 3].", "(-\\infty,3)"),
    ("3.5", "3"), ("0.5", "5"), ("1.2.", "12"), ("(1.5, 2)", "(15,2)"),
]


@pytest.mark.parametrize("pred,gold", MATH_EQUIV)
def test_math_equivalent(pred, gold):
    assert is_equiv(pred, gold) and is_equiv(gold, pred)


@pytest.mark.parametrize("pred,gold", MATH_UNIT_NO_SPACE)
def test_math_unit_without_space(pred, gold):
    assert is_equiv(pred, gold) and is_equiv(gold, pred)


@pytest.mark.parametrize("pred,gold", MATH_TRAILING_PERIOD)
def test_math_trailing_period(pred, gold):
    assert is_equiv(pred, gold) and is_equiv(gold, pred)


@pytest.mark.parametrize("answer", ["19\\text{ and }43", "\\text{Dana}", "\\boxed{ \\text{Dana}}", "\\text{(E)}",
                                    "3+4\\text{i}", "(-\\infty, 3]", "3.", "0.5"])
def test_math_answer_equals_itself(answer):
    assert is_equiv(answer, answer) and is_equiv(answer + ".", answer)


@pytest.mark.parametrize("pred,gold", MATH_DIFFERENT)
def test_math_different(pred, gold):
    assert not is_equiv(pred, gold)


def test_math_case_counts():
    assert len(MATH_EQUIV) + len(MATH_DIFFERENT) >= 30


def test_last_boxed():
    sol = "So $x = \\boxed{3}$ first, and finally $\\boxed{\\frac{1}{\\sqrt{2}}}$."
    assert last_boxed(sol) == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("the answer is $\\boxed 7$.") == "7"
    assert last_boxed("\\fbox{a+b}") == "a+b"
    assert last_boxed("no box here") is None
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert normalize_answer("\\boxed{\\dfrac{1}{2}}") == "\\frac{1}{2}"
    assert numeric_value("1,234.5") == numeric_value("1234.5")


def test_free_text():
    assert exact_match("The Soup.", "soup")
    assert exact_match("  a   railway station ", "railway station")
    assert not exact_match("the salad", "the soup")
    assert not exact_match(None, "x")
    assert squad_normalize("An Apple, the pie!") == "apple pie"
    assert f1_score("white noise machines", "white noise machines") == 1.0
    assert f1_score("noise machines", "white noise machines") == pytest.approx(0.8)
    assert f1_score("dog", "cat") == 0.0
    assert f1_score(None, "cat") == 0.0


@pytest.mark.parametrize("pred", ["42", "42.0", "$42", "42 apples", "= 42", "The answer is 42.", " 42 "])
def test_number_positive(pred):
    assert check_number(pred, "42")


@pytest.mark.parametrize("pred", ["41", "forty-two", "", None, "4.2", "-42"])
def test_number_negative(pred):
    assert not check_number(pred, "42")


def test_number_thousands():
    assert check_number("1,042", "1042")


def test_extract_answer_formats():
    assert extract_answer("logiqa", "Finish[B]") == "B"
    assert extract_answer("logiqa", "Finish[ b ]\nQuestion: next\nAction: Finish[C]") == "b"
    assert extract_answer("bigbench", "Finish[[1, 2]]") == "[1, 2]"
    assert extract_answer("logiqa", "Finish[B") == "B"
    assert extract_answer("logiqa", "I think B") is None
    assert extract_answer("math", "Finish<<<\\frac{1}{2}>>>") == "\\frac{1}{2}"
    assert extract_answer("math", "Finish<<<x^{2}>>> done") == "x^{2}"
    assert extract_answer("math", "Finish[12]") == "12"
    assert extract_answer("math", "so \\boxed{7}") == "7"
    assert extract_answer("math", "") is None
    code = "[BEGIN]\ndef f(x):\n    return x\n[END]"
    assert extract_answer("mbpp", code) == "def f(x):\n    return x"
    assert extract_answer("mbpp", "[BEGIN]\n```python\ndef f():\n    pass\n```\n") == "def f():\n    pass"
    assert extract_answer("mbpp", "```python\nprint(1)\n```") == "print(1)"
    assert extract_answer("mbpp", "no code") is None
    assert extract_answer("arithmetic", "Action: Finish[12]") == "12"


def test_math_action_with_a_short_closer():
    # SmolLM2 often closes the MATH action with two angles; the rest of the line must not keep them
    assert extract_answer("math", "Action: Finish<<<15>>\n") == "15"
    assert extract_answer("math", "Finish<<<\\frac{1}{2}>") == "\\frac{1}{2}"
    assert extract_answer("math", "Finish<<<x>3>>") == "x>3"
    assert extract_answer("math", "Finish<<<x>3>>>") == "x>3"
    trial = P.parse_trial(get_task("math"), " so it is 15.\nAction: Finish<<<15>>\n")
    assert trial.answer == "15" and trial.action == "Finish<<<15>>>"
