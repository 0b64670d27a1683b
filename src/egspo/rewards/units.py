"""Units, words and letters in an answer: what may follow a number, and what may not.

Only known unit words are units (``_UNIT_SPELLINGS``); any other word after a number changes
or qualifies it ("thousand", "squared", "below zero") and makes the answer equal to no bare
number. Plain string work, linear in the answer's length (a unit is looked for in the last
``_UNIT_WINDOW`` characters only). The policy that uses it is documented on ``MathReward``.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# Only these words are units. Each canonical unit lists its spellings; plurals are accepted
# for the full words (``minutes``, ``inches``). Anything else after a number ("thousand",
# "squared", "below zero", "apples") is a word that changes or qualifies the answer.
_UNIT_SPELLINGS: dict[str, tuple[str, ...]] = {
    "mm": ("mm", "millimeter", "millimetre"),
    "cm": ("cm", "centimeter", "centimetre"),
    "m": ("m", "meter", "metre"),
    "km": ("km", "kilometer", "kilometre"),
    "in": ("in", "inch"),
    "ft": ("ft", "foot", "feet"),
    "yd": ("yd", "yard"),
    "mi": ("mi", "mile"),
    "s": ("s", "sec", "second"),
    "min": ("min", "minute"),
    "h": ("h", "hr", "hour"),
    "day": ("day",),
    "week": ("week", "wk"),
    "month": ("month",),
    "year": ("year", "yr"),
    "mg": ("mg", "milligram"),
    "g": ("g", "gram"),
    "kg": ("kg", "kilogram"),
    "lb": ("lb", "pound"),
    "oz": ("oz", "ounce"),
    "ton": ("ton", "tonne"),
    "ml": ("ml", "milliliter", "millilitre"),
    "l": ("l", "liter", "litre"),
    "gal": ("gal", "gallon"),
    "qt": ("qt", "quart"),
    "pt": ("pint",),
    "cup": ("cup",),
    "dollar": ("dollar", "usd"),
    "cent": ("cent", "¢"),
    "euro": ("euro", "eur", "€"),
    "deg": ("degree", "deg", "°"),
    "rad": ("rad", "radian"),
    "%": ("percent", "%", "\\%"),
    "unit": ("unit",),
    "mph": ("mph",),
    "km/h": ("kph", "kmh"),
}
_UNIT_BY_SPELLING: dict[str, str] = {}
for _unit, _spellings in _UNIT_SPELLINGS.items():
    for _spelling in _spellings:
        _UNIT_BY_SPELLING[_spelling] = _unit
        if len(_spelling) > 3 and _spelling.isalpha():  # plurals of full words only ("ms" is not "m")
            _UNIT_BY_SPELLING[_spelling + ("es" if _spelling.endswith(("ch", "sh")) else "s")] = _unit
_UNIT_BY_SPELLING.update({"lbs": "lb", "hrs": "h", "yrs": "year", "secs": "s", "mins": "min", "feet": "ft"})
_POWER_WORDS = {"square": 2, "sq": 2, "cubic": 3, "cu": 3}
_LENGTHS = frozenset({"mm", "cm", "m", "km", "in", "ft", "yd", "mi", "unit"})
# Text commands whose argument is words, not math.
_TEXT_GROUP_RE = re.compile(r"\\(?:text(?:rm|normal|it|bf|sf|tt|up)?|mbox|hbox|mathrm)\s*\{([^{}]*)\}")
_POWER_RE = r"(?:\s*\^\s*(?:\{\s*([23])\s*\}|([23])))?"
_TRAILING_TEXT_RE = re.compile(_TEXT_GROUP_RE.pattern + _POWER_RE + r"$")
# Up to four trailing words (math mode), possibly with a power: ``5 square feet``, ``5 ft^2``.
_TRAILING_WORDS_RE = re.compile(r"(?P<words>(?:[A-Za-z]++\.?\s*){1,4}?)" + _POWER_RE + r"$")
_WORD_RE = re.compile(r"[A-Za-z]+")
_SYMBOL_UNIT_RE = re.compile(r"(\\%|%|\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|°)$")
_DOLLAR_PREFIX_RE = re.compile(r"([+-]?)\s*\\\$\s*")
_MATH_DOLLAR_RE = re.compile(r"(?<!\\)\$")
_BACKSLASH_SPACE_RE = re.compile(r"(?<!\\)\\ ")
_SPACING_COMMANDS = ("\\,", "\\;", "\\:", "\\!", "\\ ", "~", "\\quad", "\\qquad")
# Units are short: only this many trailing characters are searched for one (linear cost).
_UNIT_WINDOW = 80
# Words inside an answer that only separate list items (math-verify reads them as commas).
_SEPARATOR_WORDS = frozenset({"and", "or", ","})
# Upright constants, not words: ``\mathrm{i}``, ``\text{e}``.
_CONSTANT_WORDS = frozenset({"i", "e"})
_LETTER_RE = re.compile(r"[A-Za-z]")
_COMMAND_NAME_RE = re.compile(r"\\[A-Za-z]+")


def unit_name(phrase: str, power: int = 1) -> str | None:
    """Canonical name of a unit phrase (``cm``, ``square feet`` -> ``ft^2``, ``miles per
    hour`` -> ``mi/h``), or None when the phrase is not a known unit."""
    words = phrase.replace(".", " ").split()
    if not words:
        return None
    lowered = [w if len(w) == 1 else w.lower() for w in words]  # "L" stays a litre, "M" is no metre
    if lowered[0] == "L":
        lowered[0] = "l"
    if "per" in lowered[1:-1] and lowered.count("per") == 1:
        cut = lowered.index("per")
        num, den = unit_name(" ".join(lowered[:cut])), unit_name(" ".join(lowered[cut + 1 :]))
        return None if num is None or den is None or power != 1 else _speed(num, den)
    if len(lowered) == 1 and "/" in lowered[0]:
        num_text, _, den_text = lowered[0].partition("/")
        num, den = unit_name(num_text), unit_name(den_text)
        return None if num is None or den is None or power != 1 else _speed(num, den)
    if lowered[0] in _POWER_WORDS and len(lowered) > 1 and power == 1:
        base = unit_name(" ".join(lowered[1:]))
        return f"{base}^{_POWER_WORDS[lowered[0]]}" if base in _LENGTHS else None
    if len(lowered) != 1:
        return None
    unit = _UNIT_BY_SPELLING.get(lowered[0])
    if unit is None or power == 1:
        return unit
    return f"{unit}^{power}" if unit in _LENGTHS else None


def _speed(num: str, den: str) -> str:
    return {"mi/h": "mph", "km/h": "km/h"}.get(f"{num}/{den}", f"{num}/{den}")


def _power(match: re.Match, first_group: int) -> int:
    digit = match.group(first_group) or match.group(first_group + 1)
    return int(digit) if digit else 1


class AnswerParts(NamedTuple):
    """An answer split into its value and a trailing unit.

    ``core``: the answer without the unit (as written otherwise); ``unit``: the canonical
    unit (``cm``, ``ft^2``, ``%``, ``deg``, ``dollar``) or None; ``words``: the words in the
    answer that are not units ("" when none). See ``split_answer``.
    """

    core: str
    unit: str | None
    words: str


def split_answer(answer: str) -> AnswerParts:
    """Split off a trailing unit and find the words that are not units.

    A unit is a known unit word (``_UNIT_SPELLINGS``) at the end of the answer: in a text
    command (``5\\text{ cm}^2``, ``\\frac{270}7\\text{ degrees}``), bare after a space when it
    is unambiguous (``5 feet``, ``5 sq ft``; a bare word of one or two letters such as ``cm``
    is a product of variables in math mode), a symbol (``\\%``, ``^\\circ``), or a leading
    ``\\$``. Any other word in a text command, or in a whole-text answer that has digits
    (``5\\text{ thousand}``, ``\\text{5 apples}``, ``x + 1\\text{ squared}``), is reported in
    ``words``: such an answer equals no bare number. A whole-text answer without digits
    (``\\text{Evelyn}``, ``\\text{(C)}``) is a text answer and has no words to report. The
    separator words ``and``/``or`` and the upright constants ``i``/``e`` are not words.
    Linear time: the unit is looked for in the last ``_UNIT_WINDOW`` characters only.
    """
    text = _BACKSLASH_SPACE_RE.sub(" ", _MATH_DOLLAR_RE.sub(" ", answer)).strip()
    if text.endswith(".") and not text.endswith("\\."):  # a sentence's full stop
        text = text.rstrip(".").rstrip()
    whole = _TEXT_GROUP_RE.fullmatch(text)
    if whole:
        inner = whole.group(1).strip()
        if not any(ch.isdigit() for ch in inner):
            return AnswerParts(text, None, "")
        return _split_plain_text(inner)
    unit: str | None = None
    dollar = _DOLLAR_PREFIX_RE.match(text)
    if dollar:
        text, unit = dollar.group(1) + text[dollar.end() :], "dollar"
    stripped, trailing = _strip_trailing_unit(text)
    if unit is None or trailing == unit:  # "\$5 \text{ dollars}" says it twice
        text, unit = stripped, trailing
    text = _strip_spacing(text)
    if not text:  # only a unit: keep the answer whole
        return AnswerParts(answer.strip(), None, "")
    words = [
        group.strip()
        for group in _TEXT_GROUP_RE.findall(text)
        if _LETTER_RE.search(group) and group.strip().lower() not in _SEPARATOR_WORDS | _CONSTANT_WORDS
    ]
    return AnswerParts(text, unit, " ".join(words))


def _strip_spacing(text: str) -> str:
    """``text`` without trailing white space and spacing commands (``\\,``, ``\\ ``, ``~``);
    an index walks back, so a long run costs linear time."""
    end = len(text)
    while end:
        if text[end - 1].isspace():
            end -= 1
            continue
        for command in _SPACING_COMMANDS:
            if text.endswith(command, 0, end) and not text.endswith("\\" + command, 0, end):
                end -= len(command)
                break
        else:
            break
    return text[:end]


def _strip_trailing_unit(text: str) -> tuple[str, str | None]:
    """``(text without its trailing unit, canonical unit)``, or ``(text, None)``."""
    offset = max(0, len(text) - _UNIT_WINDOW)
    tail = text[offset:]
    symbol = _SYMBOL_UNIT_RE.search(tail)
    if symbol:
        return text[: offset + symbol.start()], unit_name("%" if "%" in symbol.group(1) else "°")
    grouped = _TRAILING_TEXT_RE.search(tail)
    if grouped:
        unit = unit_name(grouped.group(1), _power(grouped, 2))
        return (text[: offset + grouped.start()], unit) if unit is not None else (text, None)
    bare = _TRAILING_WORDS_RE.search(tail)
    if not bare:
        return text, None
    power, words_end = _power(bare, 2), offset + bare.end("words")
    for word in _WORD_RE.finditer(bare.group("words")):  # the longest phrase first
        start = offset + bare.start("words") + word.start()
        before = text[:start]
        if not (before[-1:].isspace() or before.endswith(("~", "\\,", "\\;", "\\:", "\\ "))):
            continue
        phrase = text[start:words_end]
        tokens = phrase.replace(".", " ").split()
        if any(len(token) < 2 for token in tokens) or sum(map(len, tokens)) < 3:
            continue
        unit = unit_name(phrase, power)
        if unit is not None:
            return before, unit
    return text, None


def _split_plain_text(inner: str) -> AnswerParts:
    """``\\text{5 feet}``: inside a text command every letter is a word, not a variable."""
    words = inner.split()
    for cut in range(max(1, len(words) - 3), len(words)):  # the longest unit phrase first
        unit = unit_name(" ".join(words[cut:]))
        if unit is not None:
            others = [w for w in words[:cut] if _LETTER_RE.search(w)]
            return AnswerParts(" ".join(words[:cut]), unit, " ".join(others))
    others = [w for w in words if _LETTER_RE.search(w) and w.lower() not in _SEPARATOR_WORDS]
    return AnswerParts(inner, None, " ".join(others))


def letters_of(answer: str) -> set[str]:
    """The ASCII letters an answer writes, command names (``\\frac``, ``\\text``) left out."""
    return set(_LETTER_RE.findall(_COMMAND_NAME_RE.sub(" ", answer)))


def letter_case_differs(pred: str, gold: str) -> bool:
    """True when a letter appears in one answer only in the other case (``2X`` vs ``2x``):
    letter case is significant, though latex2sympy folds it."""
    ours, theirs = letters_of(pred), letters_of(gold)
    return any(ch not in theirs and ch.swapcase() in theirs for ch in ours) or any(
        ch not in ours and ch.swapcase() in ours for ch in theirs
    )
