"""Answer checkers for every task.

* Multiple choice (LogiQA, BIG-bench multiple choice): :func:`parse_choice` reads a letter from "B", "b",
  "(b)", "[B]", "B.", "B)", "B. option text", "Option B", "the answer is (B)", or the exact text of one option
  (when the question is given), also followed by a reason ("A is correct", "B, because City B ..."); a hedge
  ("A or B", "A, B, C or D") or the article "a" ("a nice guess") names no option. :func:`check_choice`
  compares it with the gold letter.
* MATH: :func:`check_math` (boxed extraction, normalisation and numeric equivalence live in ``math_equiv``).
* Free text (BIG-bench free): SQuAD normalisation (lower case, no punctuation, no articles a/an/the, single
  spaces); :func:`exact_match` and token :func:`f1_score`.
* Integers (arithmetic): :func:`check_number` accepts "42", "42.0", "$42", "1,042", "42 apples", "= 42";
  a fraction "84/2" is its value (so "1/2" is not 2).
* Code (MBPP): :func:`check_code` runs the candidate against the asserts in the sandbox.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from fractions import Fraction

from .math_equiv import is_equiv

__all__ = ["parse_choice", "check_choice", "parse_options", "squad_normalize", "exact_match", "f1_score",
           "parse_number", "check_number", "check_math", "check_code"]

_OPTION_LINE = re.compile(r"^\s*\(?([A-Ha-h])\s*[\.\):]\s*(.*\S)\s*$")
_OPTIONS_HEADER = re.compile(r"^\s*(?:answer\s+)?(?:options|choices)\s*:\s*$", flags=re.I)


def parse_options(question: str | None) -> dict[str, str]:
    """Map lower-case letter -> option text for lines like "A. text", "(B) text", "C) text" in a question.

    The options are the last block of lettered lines (blank lines inside allowed; a repeated letter starts a
    new block) after the last "Options:" line when there is one, so that dialogue lines ("A: ...", "B: ...")
    and lettered sentences of the passage are not taken for options."""
    lines = (question or "").splitlines()
    header = [i for i, line in enumerate(lines) if _OPTIONS_HEADER.match(line)]
    if header:
        lines = lines[header[-1] + 1:]
    blocks: list[list[tuple[str, str]]] = []
    block: list[tuple[str, str]] = []
    for line in lines:
        m = _OPTION_LINE.match(line)
        if m is None:
            if line.strip() and block:
                blocks.append(block)
                block = []
            continue
        letter = m.group(1).lower()
        if letter in {b[0] for b in block}:
            blocks.append(block)
            block = []
        # the official few-shot blocks repeat the letter ("A. A. text"); "A.A.B and C ..." is text
        block.append((letter, re.sub(r"^\(?" + m.group(1) + r"[\.\)]\s+", "", m.group(2))))
    if block:
        blocks.append(block)
    strict = dict(blocks[-1]) if blocks else {}
    loose = _trailing_loose_options(lines)
    return loose if len(loose) > len(strict) else strict


_LOOSE_OPTION_LINE = re.compile(r"^\s*([A-H])(?:\s*[\.\):?]\s*|\s+)(\S.*?)\s*$")


def _trailing_loose_options(lines: list[str]) -> dict[str, str]:
    """Options written without punctuation ("A Shannan") or with a stray "?" ("A? text"), as some official
    LogiQA items have them: accepted only as the question's last lines, upper-case letters A, B, C, ... in
    order, so that a sentence starting with the article "A" is never taken for an option."""
    tail = [line for line in lines if line.strip()]
    found: list[tuple[str, str]] = []
    for line in reversed(tail):
        m = _LOOSE_OPTION_LINE.match(line)
        if m is None:
            break
        found.append((m.group(1), m.group(2)))
    found.reverse()
    while found and found[0][0] != "A":
        found.pop(0)
    if len(found) < 2 or [letter for letter, _ in found] != [chr(ord("A") + i) for i in range(len(found))]:
        return {}
    return {letter.lower(): re.sub(r"^\(?" + letter + r"[\.\)]\s+", "", text) for letter, text in found}


def _strip_wrappers(s: str) -> str:
    s = s.strip().strip("`'\"*").strip()
    s = re.sub(r"^(?:the\s+)?(?:final\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is|:)?\s*:?\s*", "", s,
               flags=re.I)
    return s.strip()


def _text_norm(text: str) -> str:
    """Lower case, every non-alphanumeric character a space, single spaces (articles kept: "a" may be a letter)."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def _starts(a: str, b: str) -> bool:
    """One of two normalised texts is the other or starts it at a word boundary."""
    return a == b or a.startswith(b + " ") or b.startswith(a + " ")


def _other_letter(rest: str, letters: str) -> bool:
    """True when ``rest`` names an option letter on its own ("or B", "C and D"): a hedge, not an answer. A
    lower-case "a" before a word is the article; a letter followed by ".x" is an abbreviation (e.g.)."""
    for m in re.finditer(r"(?<![\w'’.])([" + letters + letters.upper() + r"])(?![\w'’])", rest):
        after = rest[m.end():]
        if m.group(1) == "a" and re.match(r"\s+[A-Za-z]", after):
            continue
        if re.match(r"\.[A-Za-z]", after):
            continue
        return True
    return False


# words an article cannot precede: "A is correct", "A because ...", "a should be chosen" name option a
_NOT_AFTER_ARTICLE = re.compile(r"(?:is|was|because|since|as|should|would|must|seems|appears)\b", flags=re.I)


def _named(letter: str, rest: str, article_possible: bool, options: dict[str, str], letters: str) -> bool:
    """Whether a prediction that starts with option ``letter`` followed by ``rest`` names that option.

    Accepted: nothing or punctuation after it, the option's own text (or the start of it), or any other text
    without a second option letter ("B is correct", "B, because ..."). Rejected: the text of another option,
    a second standalone option letter ("A or B", "A, B, C or D") and the article "a" before a word ("a nice
    guess") unless the words are option a's text."""
    norm = _text_norm(rest)
    if not norm:
        return True
    matches = {k for k, text in options.items() if _text_norm(text) and _starts(_text_norm(text), norm)}
    if letter in matches:
        return True
    if matches or article_possible:
        return False
    # the named letter again ("B, because City B ...") is no second option
    return not _other_letter(rest, ("".join(sorted(options)) or letters).replace(letter, ""))


def parse_choice(prediction: str | None, question: str | None = None, letters: str = "abcdefgh") -> str | None:
    """The lower-case option letter a prediction names, or None (see module docstring for accepted forms)."""
    if prediction is None:
        return None
    s = _strip_wrappers(str(prediction))
    if not s:
        return None
    led = len(s) < len(str(prediction).strip().strip("`'\"*").strip())  # "Option A ...", "The answer is A ..."
    cls = f"[{letters}{letters.upper()}]"
    m = re.fullmatch(r"[\(\[]?\s*(" + cls + r")\s*[\)\]]?\s*[\.:,;!]?", s)
    if m:
        return m.group(1).lower()
    options = parse_options(question) if question else {}
    for norm_fn in (_text_norm, squad_normalize):
        if norm_fn is squad_normalize and re.match(r"[\(\[]?" + cls + r"(?!\w)", s):
            break  # "A. Dogs bark" must not become option text "dogs bark" by dropping the article
        norm = norm_fn(s)
        for letter, text in options.items():
            if norm and norm_fn(text) == norm:
                return letter
    m = re.match(r"^([\(\[]?)(" + cls + r")(\s*[\)\]\.:,;]|\s)", s)
    if m:
        article = (m.group(2) in "aA" and not m.group(1) and not m.group(3).strip()
                   and not (led and m.group(2) == "A") and not _NOT_AFTER_ARTICLE.match(s[m.end():]))
        letter = m.group(2).lower()
        return letter if _named(letter, s[m.end():], article, options, letters) else None
    m = re.search(r"\b(?:option|answer|choice)\s*(?:is\s*)?:?\s*[\(\[]?(" + cls + r")\b[\)\]]?", s, flags=re.I)
    if m:
        letter = m.group(1).lower()
        return letter if _named(letter, s[m.end():], False, options, letters) else None
    return None


def check_choice(prediction: str | None, gold: str, question: str | None = None) -> bool:
    """True when the prediction names the gold option letter (case-insensitive)."""
    letter = parse_choice(prediction, question)
    return letter is not None and letter == str(gold).strip().lower().strip("().")


_PUNCT = set(string.punctuation)


def squad_normalize(text: str | None) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD evaluation)."""
    text = (text or "").lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str | None, gold: str) -> bool:
    """SQuAD exact match: equal after :func:`squad_normalize`."""
    return prediction is not None and squad_normalize(prediction) == squad_normalize(gold)


def f1_score(prediction: str | None, gold: str) -> float:
    """SQuAD token F1 between the normalised prediction and gold (1.0 when both normalise to empty)."""
    pred_tokens = squad_normalize(prediction).split() if prediction is not None else []
    gold_tokens = squad_normalize(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens and prediction is not None)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?")


def parse_number(prediction: str | None) -> Fraction | None:
    """The number a short answer gives: the whole text when it is a number, else the last number in it."""
    if prediction is None:
        return None
    s = str(prediction).strip().replace("$", "").replace("\\", "").strip()
    s = s.rstrip(".").strip()
    found = _NUMBER.findall(s)
    if not found:
        return None
    num, _, den = found[-1].replace(",", "").replace(" ", "").partition("/")  # "1/2" is one half, not 2
    try:
        return Fraction(num) / Fraction(den) if den else Fraction(num)
    except (ValueError, ZeroDivisionError):
        return None


def check_number(prediction: str | None, gold) -> bool:
    """True when the prediction's number equals the gold number exactly."""
    value = parse_number(prediction)
    try:
        gold_value = Fraction(str(gold).replace(",", "").strip())
    except (ValueError, ZeroDivisionError):
        return False
    return value is not None and value == gold_value


def check_math(prediction: str | None, gold: str) -> bool:
    """MATH equivalence of a predicted answer and the gold answer (both may still carry a ``\\boxed``)."""
    return is_equiv(prediction, gold)


def check_code(code: str | None, test_list: list[str], test_setup_code: str = "", timeout: float = 5.0) -> bool:
    """True when ``code`` passes every assert of ``test_list`` inside the sandbox."""
    if not code or not code.strip():
        return False
    from .sandbox import run_program

    return run_program(code, test_list, test_setup_code=test_setup_code, timeout=timeout).passed
