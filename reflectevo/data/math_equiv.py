"""MATH answers: boxed-answer extraction, Hendrycks-style string normalisation, numeric equivalence.

No computer-algebra dependency. Two answers are equivalent when, after :func:`normalize_answer`,

1. the strings are equal, or
2. both parse as exact rational numbers (integers, decimals, ``\\frac{a}{b}``, ``a/b``, mixed numbers
   ``2\\frac{1}{2}``, thousands separators, leading zeros, signs) with equal values, or
3. both are tuples/intervals/sets with the same brackets (or bare comma lists) whose items are pairwise
   equivalent in order (a number with thousands separators, ``10,000``, is never read as the list ``10, 0``).

The normalisation drops presentation noise: math-mode delimiters (``$``, ``\\(...\\)``, ``\\[...\\]``),
``\\displaystyle``, ``\\left``/``\\right``, degrees (``^\\circ``), dollar signs, trailing
units (a final ``\\text{...}`` or ``\\mbox{...}`` group starting with a space or of letters only: ``\\text{ cm}``,
``\\text{cm}``), ``\\text{X}`` wrappers, percent signs, LaTeX spacing, spaces and a trailing period;
``dfrac``/``tfrac`` become ``frac``; ``\\frac12`` -> ``\\frac{1}{2}``; ``\\sqrt2`` -> ``\\sqrt{2}``; ``0.5`` ->
``\\frac{1}{2}``; ``x^{2}`` -> ``x^2`` (a one-character group after ``^`` or ``_``); ``a/b`` (integers) ->
``\\frac{a}{b}``; a short ``x =`` prefix is dropped; a capital letter in
parentheses (a multiple-choice answer, ``\\text{(E)}``) is the letter alone.
"""
from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["last_boxed", "strip_boxed", "normalize_answer", "numeric_value", "is_equiv"]

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at ``text[start] == '{'`` and the index after it; None if unclosed."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def last_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces allowed), or ``\\boxed 5``; else None."""
    if not text:
        return None
    best = -1
    for cmd in _BOX_COMMANDS:
        pos = text.rfind(cmd)
        while pos != -1 and text[pos + len(cmd) : pos + len(cmd) + 1].isalpha():  # e.g. \boxedsomething
            pos = text.rfind(cmd, 0, pos)
        if pos > best:
            best, best_cmd = pos, cmd
    if best < 0:
        return None
    i = best + len(best_cmd)
    while i < len(text) and text[i] == " " and best_cmd == "\\boxed" and i + 1 < len(text) and text[i + 1] == "{":
        i += 1
    if i < len(text) and text[i] == "{":
        group = _braced(text, i)
        return None if group is None else group[0]
    if i < len(text) and text[i] == " ":  # "\boxed 5" form: up to the next "$" or whitespace
        m = re.match(r"\s+([^\s$]+)", text[i:])
        return m.group(1) if m else None
    return None


def strip_boxed(text: str) -> str:
    """The boxed content when ``text`` contains a box, else ``text`` unchanged."""
    inner = last_boxed(text)
    return text if inner is None else inner


def _replace_text_wrappers(s: str) -> str:
    """``\\text{X}``, ``\\textbf{X}``, ``\\mbox{X}``, ``\\mathrm{X}`` -> ``X`` (braces balanced)."""
    for cmd in ("\\text", "\\textbf", "\\mbox", "\\mathrm", "\\textnormal"):
        while True:
            pos = s.find(cmd + "{")
            if pos < 0:
                break
            group = _braced(s, pos + len(cmd))
            if group is None:
                break
            s = s[:pos] + group[0] + s[group[1]:]
    return s


def _fix_short_commands(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{b}`` -> ``\\frac{1}{b}``, ``\\sqrt2`` -> ``\\sqrt{2}``."""
    s = re.sub(r"\\sqrt\s*([0-9a-zA-Z])", r"\\sqrt{\1}", s)
    out = []
    parts = s.split("\\frac")
    out.append(parts[0])
    for part in parts[1:]:
        out.append("\\frac")
        args = []
        rest = part
        for _ in range(2):
            rest = rest.lstrip()  # LaTeX skips spaces before an argument: "\\frac 9{20}"
            if rest.startswith("{"):
                group = _braced(rest, 0)
                if group is None:
                    break
                args.append("{" + group[0] + "}")
                rest = rest[group[1]:]
            elif rest:
                args.append("{" + rest[0] + "}")
                rest = rest[1:]
        out.append("".join(args) + rest)
    return "".join(out)


def _is_unit(text: str) -> bool:
    """A unit's text: one starting with a space (" cm", " children tickets "), or letters only ("cm", "integers");
    a lone "i" or "e" is the imaginary unit or Euler's number, not a unit."""
    return text.startswith(" ") or (re.fullmatch(r"[A-Za-z]+", text) is not None and text not in ("i", "e"))


def _drop_trailing_unit(s: str) -> str:
    """Drop a unit written as a final ``\\text{...}``/``\\mbox{...}`` group after the value: ``5 \\text{ cm}``,
    ``18\\text{integers}``, ``864\\mbox{inches}^2``; a group followed by more of the answer (``19\\text{ and }43``)
    or with nothing before it (``\\text{Dana}``) is kept."""
    for unit in re.finditer(r"\\(?:text|mbox)\{", s):
        group = _braced(s, unit.end() - 1)
        if group is None or not re.fullmatch(r"\s*(?:\^\s*\{?\s*\d\s*\}?)?\s*\.?\s*", s[group[1]:]):
            continue
        if s[:unit.start()].strip() and _is_unit(group[0]):
            return s[:unit.start()]
    return s


def normalize_answer(answer: str | None) -> str | None:
    """Canonical string form of a MATH answer (see module docstring); None stays None."""
    if answer is None:
        return None
    s = str(answer).strip()
    if last_boxed(s) is not None:
        s = last_boxed(s)
    s = s.replace("\n", "").replace("\\!", "")
    # math-mode delimiters around the whole answer, like "$...$": "\\(\\frac{1}{2}\\)", "\\[5\\]"
    m = re.fullmatch(r"\s*\\([(\[])((?:(?!\\[()\[\]]).)*)\\([)\]])\s*", s)
    if m and m.group(1) + m.group(3) in ("()", "[]"):
        s = m.group(2)
    s = re.sub(r"\\displaystyle(?![A-Za-z])", "", s)
    # one pass, so that a matrix row separator \\ before a space is not taken for the spacing command "\ "
    s = re.sub(r"\\\\|\\[,;:> ]", lambda m: "\\" if m.group() == "\\\\" else " ", s)
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}", "", s)
    s = s.replace("^\\circ", "").replace("\\circ", "").replace("\\degree", "")
    s = s.replace("\\$", "").replace("$", "")
    s = _drop_trailing_unit(s)
    s = _replace_text_wrappers(s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("{,}", ",")
    s = re.sub(r"^\s*\.", "0.", s)
    s = re.sub(r"\s+\.\s*$", "", s)  # a sentence period after a space is not a decimal point: "(1, 2) ."
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    # a short left-hand side ("x = 3", "k=7") is not part of the answer
    if s.count("=") == 1:
        left, right = s.split("=")
        if len(left.strip()) <= 2:
            s = right
    s = _fix_short_commands(s)
    s = s.replace(" ", "")
    s = re.sub(r"([\^_])\{([A-Za-z0-9])\}", r"\1\2", s)  # a one-character group: "x^{2}" is "x^2"
    s = s.rstrip(".")
    if s.startswith("{") and s.endswith("}") and _braced(s, 0) == (s[1:-1], len(s)):
        s = s[1:-1]
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    if s == "0.5":
        s = "\\frac{1}{2}"
    m = re.fullmatch(r"\(([A-Z])\)", s)  # a multiple-choice letter: "(E)", "\text{(E)}", "\textbf{(C)}" -> E
    if m:
        s = m.group(1)
    return s


_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _number(s: str) -> Fraction | None:
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if re.fullmatch(_NUM, s):
        try:
            return Fraction(s)
        except ValueError:  # past the int conversion limit (~4300 digits)
            return None
    return None


def numeric_value(answer: str | None) -> Fraction | None:
    """Exact value of a normalised answer that is a plain number, fraction or mixed number; else None (also for
    numbers past Python's int conversion limit, ~4300 digits: those compare as strings)."""
    if answer is None:
        return None
    try:
        return _numeric_value(answer)
    except ValueError:
        return None


def _numeric_value(answer: str) -> Fraction | None:
    s = answer.strip()
    if s.startswith("+"):
        s = s[1:]
    value = _number(s)
    if value is not None:
        return value
    sign = 1
    if s.startswith("-"):
        sign, s = -1, s[1:]
    m = re.fullmatch(r"(\d*)\\frac\{(" + _NUM + r")\}\{(" + _NUM + r")\}", s)
    if m:
        whole, num, den = m.group(1), _number(m.group(2)), _number(m.group(3))
        if num is None or den is None or den == 0:
            return None
        frac = num / den
        if whole:
            if frac < 0:
                return None
            frac += int(whole)
        return sign * frac
    m = re.fullmatch(r"(" + _NUM + r")/(" + _NUM + r")", s)
    if m:
        num, den = _number(m.group(1)), _number(m.group(2))
        if num is not None and den:
            return sign * num / den
    return None


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _equiv_normalized(a: str, b: str, depth: int = 0) -> bool:
    if a == b:
        return True
    va, vb = numeric_value(a), numeric_value(b)
    if va is not None and vb is not None:
        return va == vb
    if depth > 3:
        return False
    # tuples, intervals (also half-open) and sets: the same delimiters on both sides, items compared in order
    if a.startswith("\\{") and a.endswith("\\}") and b.startswith("\\{") and b.endswith("\\}"):
        a, b = a[2:-2], b[2:-2]
    elif a and b and a[:1] in "([" and a[-1:] in ")]" and a[:1] == b[:1] and a[-1:] == b[-1:]:
        a, b = a[1:-1], b[1:-1]
    if _THOUSANDS.fullmatch(a) or _THOUSANDS.fullmatch(b):  # "10,000" is one number, never the list 10, 0
        return a == b or (_number(a) is not None and _number(a) == _number(b))
    pa, pb = _split_top_level(a), _split_top_level(b)
    if len(pa) < 2 or len(pa) != len(pb):
        return False
    return all(_equiv_normalized(x, y, depth + 1) for x, y in zip(pa, pb))


def is_equiv(prediction: str | None, gold: str | None) -> bool:
    """True when the predicted MATH answer matches the gold answer (strings or numbers, see module docstring)."""
    if prediction is None or gold is None:
        return False
    a, b = normalize_answer(prediction), normalize_answer(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    # thousands separators are only a number's business when the whole answer is one number
    return _equiv_normalized(a, b)
