"""Plain numbers in an answer: canonical text, exact values and canonical forms.

Everything is exact (``fractions.Fraction``) and linear or bounded in the input: numbers
longer than ``_MAX_FRACTION_DIGITS`` digits are compared as digit strings, exponents are
bounded by ``_MAX_EXPONENT``. What counts as a plain number is documented on ``exact_number``;
the words and units allowed after one come from ``units.split_answer``.
"""

from __future__ import annotations

import re
from fractions import Fraction

from egspo.rewards.units import split_answer

_PLAIN_NUMBER_RE = re.compile(r"([+-]?)([1-9]\d{0,2}(?:,\d{3})+|\d*)(?:\.(\d*))?")
# ``1, 234`` is a list of two numbers, not 1234 (``canonical_text`` removes the space).
_LIST_COMMA_RE = re.compile(r",\s")
_SCIENTIFIC_RE = re.compile(r"(.+?)(?:[eE]|(?:\\times|\\cdot|\*|×)10\^)\{?([+-]?\d{1,4})\}?")
_FRACTION_RE = re.compile(r"([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}|([+-]?\d+)/(\d+)")
# A repeating decimal: ``0.\overline{3}`` = 1/3, ``1.1\overline{6}`` = 7/6.
_REPEATING_RE = re.compile(r"([+-]?)(\d*)\.(\d*)\\overline\s*(?:\{(\d+)\}|(\d))")
# Thousands written with thin spaces (``1\,000``) are one number; any other space or spacing
# command between two digits separates them (``1 2`` is not 12).
_THIN_THOUSANDS_RE = re.compile(r"(?<![\d.])\d{1,3}(?:\\,\d{3})+(?![\d])")
_DIGIT_SPACING_RE = re.compile(r"(?<=\d)(?:\s|\\[,;:! ]|~|\\q?quad(?![A-Za-z]))+(?=\d)")
_DIGIT_GAP = "\x00"  # stands for such a space inside ``canonical_text`` until the end
# Digits allowed before a number is converted to an exact fraction: below Python's limit on
# int() of a string (4300 digits); longer numbers are compared as digit strings.
_MAX_FRACTION_DIGITS = 4000
# Decimal exponents allowed in scientific notation (10**1000 is still cheap to build).
_MAX_EXPONENT = 1000
_SUBSCRIPT_BRACES_RE = re.compile(r"_\{(\w)\}")
_CANON_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "$", "{,}")


def canonical_text(answer: str) -> str:
    """Answer with spacing, ``$``, ``\\left``/``\\right``, braces around a one-character
    subscript and a trailing period removed: equal canonical texts are the same answer.

    A space between two digits is kept as one space (``1 2`` stays apart from ``12``);
    thousands written with thin spaces (``1\\,000``) are joined."""
    out = _THIN_THOUSANDS_RE.sub(_join_thousands, answer.replace("\\$", ""))
    out = _DIGIT_SPACING_RE.sub(_DIGIT_GAP, out)
    out = _SUBSCRIPT_BRACES_RE.sub(r"_\1", out)
    for token in _CANON_DROP:
        out = out.replace(token, "")
    out = out.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    out = "".join(out.split())
    return out.rstrip(".").replace(_DIGIT_GAP, " ")


def exact_number(answer: str) -> Fraction | str | None:
    """The exact value of a plain numeric answer, or None when it is not one.

    Plain numbers are integers (thousands commas or thin spaces allowed), decimals,
    repeating decimals (``0.\\overline{3}``), ``a/b``, ``\\frac{a}{b}`` and scientific notation
    (``4.5e33``, ``4.5\\times10^{33}``), optionally in ``\\text{}`` and followed by a known unit
    (``split_answer``), which is ignored here; a number followed by any other word is not a
    plain number. Numbers longer than ``_MAX_FRACTION_DIGITS`` digits come back as their
    canonical digit string, never converted (no quadratic ``int()`` on adversarial input):
    equal strings, equal numbers. Thousands commas must group three digits after a non-zero
    lead (``0,234`` is a list); digits separated by a space never join (``1 2``).
    """
    if _LIST_COMMA_RE.search(answer):
        return None
    parts = split_answer(answer)
    if parts.words:
        return None
    text = canonical_text(parts.core)
    if not text:
        return None
    repeating = _REPEATING_RE.fullmatch(text)
    if repeating:  # before scientific notation, which would read the "e" of "\overline"
        return _repeating_decimal(repeating)
    scientific = _SCIENTIFIC_RE.fullmatch(text)
    if scientific:
        mantissa = _plain_number(scientific.group(1))
        exponent = int(scientific.group(2))
        if not isinstance(mantissa, Fraction) or abs(exponent) > _MAX_EXPONENT:
            return None
        return mantissa * Fraction(10) ** exponent
    frac = _FRACTION_RE.fullmatch(text)
    if frac:
        if frac.group(2) is not None:
            sign, num, den = frac.group(1), frac.group(2), frac.group(3)
        else:
            sign, num, den = "", frac.group(4), frac.group(5)
        if len(num) + len(den) > _MAX_FRACTION_DIGITS or int(den) == 0:
            return None
        return Fraction(int(num), int(den)) * (-1 if sign == "-" else 1)
    return _plain_number(text)


def _repeating_decimal(match: re.Match) -> Fraction | None:
    """``a.b\\overline{c}`` = ``a.b + 0.0c / (1 - 10^-len(c))`` exactly:
    ``a + (bc - b) / (10^len(b) (10^len(c) - 1))``."""
    sign, whole, fixed = match.group(1), match.group(2) or "0", match.group(3)
    period = match.group(4) or match.group(5)
    if len(whole) + len(fixed) + len(period) > _MAX_FRACTION_DIGITS:
        return None
    value = int(whole) + Fraction(
        int(fixed + period) - int(fixed or "0"), 10 ** len(fixed) * (10 ** len(period) - 1)
    )
    return -value if sign == "-" else value


def repeating_to_fraction(answer: str) -> str:
    """``answer`` with each repeating decimal written as ``\\frac{p}{q}`` (for math-verify,
    which cannot read ``\\overline``)."""

    def fraction(match: re.Match) -> str:
        value = _repeating_decimal(match)
        if value is None:
            return match.group(0)
        sign = "-" if value < 0 else ""
        return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"

    return _REPEATING_RE.sub(fraction, answer)


def _plain_number(text: str) -> Fraction | str | None:
    plain = _PLAIN_NUMBER_RE.fullmatch(text)
    if not plain or not (plain.group(2) or plain.group(3)):
        return None
    sign, whole, decimals = plain.group(1), plain.group(2).replace(",", ""), plain.group(3) or ""
    whole = whole.lstrip("0") or "0"
    decimals = decimals.rstrip("0")
    if len(whole) + len(decimals) <= _MAX_FRACTION_DIGITS:
        value = Fraction(int(whole + decimals), 10 ** len(decimals))
        return -value if sign == "-" else value
    negative = sign == "-" and (whole != "0" or decimals)
    return ("-" if negative else "") + whole + ("." + decimals if decimals else "")


def canonical_number(answer: str) -> tuple[str, bool] | None:
    """Canonical form of a plain numeric answer (see ``exact_number``), or None.

    Returns ``(canonical, is_integer)``: equal canonical strings mean equal numbers.
    """
    value = exact_number(answer)
    if value is None:
        return None
    if isinstance(value, str):
        return value, "." not in value
    if value.denominator == 1:
        return str(value.numerator), True
    return f"{value.numerator}/{value.denominator}", False


def has_spaced_digits(answer: str) -> bool:
    """True when a space (or a spacing command) separates two digits: ``1 2`` is not 12.

    Thousands written with a thin space (``1\\,000``, ``12\\,345\\,678``) are one number."""
    return _DIGIT_SPACING_RE.search(_THIN_THOUSANDS_RE.sub(_join_thousands, answer)) is not None


def _join_thousands(match: re.Match) -> str:
    return match.group(0).replace("\\,", "")
