"""Final-answer extraction and cheap normalisation, shared by rewards and data loading.

Everything here is plain string work with linear cost in the input length, so it is safe
to run in the trainer process on arbitrary model output (callers cap the length first).
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_HASH_MARKER = "####"
# A number as models write it: optional sign, digits with optional thousands commas, decimals.
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_PLAIN_NUMBER_RE = re.compile(r"([+-]?)(\d+(?:,\d{3})*|\d*)(?:\.(\d*))?")
_FRACTION_RE = re.compile(r"([+-]?)\\[dt]?frac\{([+-]?\d+)\}\{([+-]?\d+)\}|([+-]?\d+)/(\d+)")
# Digits allowed before a number is converted to an exact fraction (int() on huge strings is slow).
_MAX_FRACTION_DIGITS = 64
_CANON_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "$", "{,}")
# Box commands tried from the end before giving up (bounds the cost on adversarial text).
_MAX_BOX_CANDIDATES = 16


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced.

    Scans backwards over box commands; an unterminated last box (truncated output) falls
    back to the previous complete one. Returns None when there is no complete box.
    """
    end = len(text)
    for _ in range(_MAX_BOX_CANDIDATES):
        start = max(text.rfind(cmd, 0, end) for cmd in _BOX_COMMANDS)
        if start < 0:
            return None
        cmd_len = len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox")
        i = start + cmd_len
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                ch = text[j]
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
        end = start
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
    """The last number in ``text`` (thousands commas allowed), or None."""
    found = None
    for found in _NUMBER_RE.finditer(text):  # noqa: B007 - keep the last match
        pass
    return found.group(0) if found else None


def extract_answer(text: str) -> tuple[str | None, str]:
    """Final answer of a completion and how it was found.

    Priority: last complete ``\\boxed{}``, else the ``#### N`` line, else the last number.
    Returns ``(answer, source)`` with source in {"boxed", "hash", "number", "none"}.
    """
    boxed = last_boxed(text)
    if boxed:
        return boxed, "boxed"
    hashed = after_hash_marker(text)
    if hashed:
        return hashed, "hash"
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
    """Answer with spacing, ``$``, ``\\left``/``\\right`` and a trailing period removed."""
    out = answer.replace("\\$", "")
    for token in _CANON_DROP:
        out = out.replace(token, "")
    out = out.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    out = "".join(out.split())
    return out.rstrip(".")


def canonical_number(answer: str) -> tuple[str, bool] | None:
    """Exact canonical form of a plain numeric answer, or None when it is not one.

    Handles integers (with thousands commas), decimals, ``a/b`` and ``\\frac{a}{b}``.
    Returns ``(canonical, is_integer)``: equal canonical strings mean equal numbers.
    Short numbers become reduced fractions ``p/q``; very long ones are compared as
    digit strings, never converted (no quadratic ``int()`` on adversarial input).
    """
    text = canonical_text(answer)
    if not text:
        return None
    frac = _FRACTION_RE.fullmatch(text)
    if frac:
        if frac.group(2) is not None:
            sign, num, den = frac.group(1), frac.group(2), frac.group(3)
        else:
            sign, num, den = "", frac.group(4), frac.group(5)
        if len(num) + len(den) > _MAX_FRACTION_DIGITS or int(den) == 0:
            return None
        value = Fraction(int(num), int(den)) * (-1 if sign == "-" else 1)
        return _fraction_key(value)
    plain = _PLAIN_NUMBER_RE.fullmatch(text)
    if not plain or not (plain.group(2) or plain.group(3)):
        return None
    sign, whole, decimals = plain.group(1), plain.group(2).replace(",", ""), plain.group(3) or ""
    whole = whole.lstrip("0") or "0"
    decimals = decimals.rstrip("0")
    if len(whole) + len(decimals) <= _MAX_FRACTION_DIGITS:
        value = Fraction(int(whole + decimals), 10 ** len(decimals))
        return _fraction_key(-value if sign == "-" else value)
    negative = sign == "-" and (whole != "0" or decimals)
    digits = whole + ("." + decimals if decimals else "")
    return ("-" if negative else "") + digits, not decimals


def _fraction_key(value: Fraction) -> tuple[str, bool]:
    if value.denominator == 1:
        return str(value.numerator), True
    return f"{value.numerator}/{value.denominator}", False
