"""Final-answer extraction and cheap normalisation, shared by rewards, metrics and data loading.

Everything here is plain string work with linear cost in the input length, so it is safe
to run in the trainer process on arbitrary model output (callers cap the length first).
The answer policy it implements is documented on ``MathReward``.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_HASH_MARKER = "####"
# A number as models write it: optional sign, digits with optional thousands commas, decimals.
# The look-behind keeps it from starting inside a word, a decimal or another number.
_NUMBER_RE = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")
# Characters next to a number that make it part of a larger expression (``2^{10}``, ``x_3``,
# ``\frac{1}{2}``, ``3/4``): the fallback never reads such a fragment as the answer.
_EMBEDDED_BEFORE = frozenset("^_{/")
_EMBEDDED_AFTER = frozenset("^_}/")
_PLAIN_NUMBER_RE = re.compile(r"([+-]?)([1-9]\d{0,2}(?:,\d{3})+|\d*)(?:\.(\d*))?")
# ``1, 234`` is a list of two numbers, not 1234 (``canonical_text`` removes the space).
_LIST_COMMA_RE = re.compile(r",\s")
_SCIENTIFIC_RE = re.compile(r"(.+?)(?:[eE]|(?:\\times|\\cdot|\*|×)10\^)\{?([+-]?\d{1,4})\}?")
_FRACTION_RE = re.compile(r"([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}|([+-]?\d+)/(\d+)")
# A whole answer wrapped in one text command: ``\text{265}`` is the number 265.
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
# Units that never change a number: a percent sign (``-4\%`` answers ``-4``) and degrees.
_UNIT_SUFFIXES = ("\\%", "%", "^\\circ", "^{\\circ}")
# Digits allowed before a number is converted to an exact fraction (int() on huge strings is slow).
_MAX_FRACTION_DIGITS = 64
# Decimal exponents allowed in scientific notation (10**1000 is still cheap to build).
_MAX_EXPONENT = 1000
_SUBSCRIPT_BRACES_RE = re.compile(r"_\{(\w)\}")
_CANON_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "$", "{,}")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), or None.

    Only the last box command counts: when it is empty, has no brace, or its braces never
    close (output cut off), there is no boxed answer, and earlier boxes are not consulted.
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip() or None
    return None


def after_hash_marker(text: str) -> str | None:
    """Text after the last ``####`` up to the end of its line (GSM8K convention), or None."""
    pos = text.rfind(_HASH_MARKER)
    if pos < 0:
        return None
    rest = text[pos + len(_HASH_MARKER) :].lstrip(" \t")
    line = rest.split("\n", 1)[0].strip()
    return line or None


def last_number(text: str) -> str | None:
    """The last number in ``text`` (thousands commas allowed) when it stands on its own.

    None when there is no number, or when the last one is a fragment of a larger expression
    (an exponent, a subscript, part of a fraction): reading ``10`` out of ``2^{10}`` would
    pay a wrong answer.
    """
    found = None
    for found in _NUMBER_RE.finditer(text):  # noqa: B007 - keep the last match
        pass
    if found is None:
        return None
    before = text[: found.start()].rstrip()
    after = text[found.end() :].lstrip()
    if (before and before[-1] in _EMBEDDED_BEFORE) or (after and after[0] in _EMBEDDED_AFTER):
        return None
    return found.group(0)


def extract_answer(text: str, number_fallback: bool = False) -> tuple[str | None, str]:
    """Final answer of a completion and how it was found.

    The last ``\\boxed{}``/``\\fbox{}``; in text without any box command, the ``#### N`` line
    (GSM8K). A broken last marker (an empty or unclosed box, an empty ``####`` line) means
    no answer. Only when the text has no marker at all and ``number_fallback`` is on is the
    last stand-alone number taken. Returns ``(answer, source)`` with source in
    {"boxed", "hash", "number", "none"}.
    """
    if any(cmd in text for cmd in _BOX_COMMANDS):
        boxed = last_boxed(text)
        return (boxed, "boxed") if boxed is not None else (None, "none")
    if _HASH_MARKER in text:
        hashed = after_hash_marker(text)
        return (hashed, "hash") if hashed is not None else (None, "none")
    if number_fallback:
        number = last_number(text)
        if number is not None:
            return number, "number"
    return None, "none"


def has_final_marker(text: str) -> bool:
    """True when the last non-empty line holds ``#### X`` or a complete non-empty ``\\boxed{X}``."""
    stripped = text.rstrip()
    last_line = stripped[stripped.rfind("\n") + 1 :]
    if last_boxed(last_line):
        return True
    return last_line.lstrip().startswith(_HASH_MARKER) and after_hash_marker(last_line) is not None


def canonical_text(answer: str) -> str:
    """Answer with spacing, ``$``, ``\\left``/``\\right``, braces around a one-character
    subscript and a trailing period removed: equal canonical texts are the same answer."""
    out = _SUBSCRIPT_BRACES_RE.sub(r"_\1", answer.replace("\\$", ""))
    for token in _CANON_DROP:
        out = out.replace(token, "")
    out = out.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    out = "".join(out.split())
    return out.rstrip(".")


def exact_number(answer: str) -> Fraction | str | None:
    """The exact value of a plain numeric answer, or None when it is not one.

    Plain numbers are integers (thousands commas allowed), decimals, ``a/b``,
    ``\\frac{a}{b}`` and scientific notation (``4.5e33``, ``4.5\\times10^{33}``), optionally
    wrapped in ``\\text{}`` and followed by a percent or degree sign, which are dropped as
    units. Numbers longer than 64 digits come back as their canonical digit string, never
    converted (no quadratic ``int()`` on adversarial input): equal strings, equal numbers.
    Thousands commas must group three digits after a non-zero lead (``0,234`` is a list).
    """
    if _LIST_COMMA_RE.search(answer):
        return None
    text = canonical_text(answer)
    wrapped = _TEXT_WRAPPER_RE.fullmatch(text)
    if wrapped:
        text = wrapped.group(1)
    for unit in _UNIT_SUFFIXES:
        if text.endswith(unit):
            text = text[: -len(unit)]
            break
    if not text:
        return None
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
