"""Final-answer extraction and cheap normalisation, shared by rewards, metrics and data loading.

Everything here is plain string work with linear cost in the input length, so it is safe
to run in the trainer process on arbitrary model output (``extract_answer`` reads at most
``MAX_COMPLETION_CHARS`` characters; the reward caps answers at ``max_answer_chars``).
The answer policy it implements is documented on ``MathReward``.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import NamedTuple

# Longest completion read (characters). Extraction is linear, so the whole text is read; a
# longer completion has no answer (counted by the reward), whatever its end says: where a
# window would cut must never decide which marker is the final answer.
MAX_COMPLETION_CHARS = 1 << 20

_BOX_COMMAND_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BOX_OR_BRACE_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])|[{}]")
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


def last_boxed(text: str) -> str | None:
    """Whole content of the outermost last ``\\boxed{...}`` (or ``\\fbox{...}``), or None.

    Only the last box command that is not inside another box counts: in
    ``\\boxed{7 \\cdot \\boxed{5}}`` the answer is ``7 \\cdot {5}`` (box commands inside the
    answer are unwrapped, their braces kept), never the inner ``5``; braces around the whole
    answer are dropped (``\\boxed{\\boxed{5}}`` is ``5``). When that last box is
    empty, has no brace, or its braces never close (output cut off), there is no boxed
    answer, and earlier boxes are not consulted. One pass over the braces: linear time.
    """
    answer: str | None = None
    open_at = -1  # index of the "{" of the top-level box being read, -1 outside boxes
    expect = -1  # index where the "{" of the last top-level box command must be
    depth = 0
    for match in _BOX_OR_BRACE_RE.finditer(text):
        token, pos = match.group(0), match.start()
        if open_at >= 0:  # inside a top-level box: only braces matter
            if token == "{":
                depth += 1
            elif token == "}":
                depth -= 1
                if depth == 0:
                    answer = _unwrap_braces(_BOX_COMMAND_RE.sub("", text[open_at + 1 : pos])) or None
                    open_at = -1
        elif token == "{":
            if pos == expect:
                open_at, depth = pos, 1
        elif token != "}":  # a box command at top level: the answer so far is its content
            answer = None
            expect = match.end()
            while expect < len(text) and text[expect].isspace():
                expect += 1
    if open_at >= 0:  # the last box never closes
        return None
    return answer


def _unwrap_braces(text: str) -> str:
    """``text`` stripped, without the brace pairs that enclose all of it (``{5}`` -> ``5``).
    One pass with a stack of open braces: linear time however deep the nesting."""
    text = text.strip()
    lead = len(text) - len(text.lstrip("{"))
    if not lead or not text.endswith("}"):
        return text
    stack: list[int] = []
    enclosing = lead  # leading braces whose partner is the matching trailing brace
    n = len(text)
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            opened = stack.pop()
            if opened < lead and opened != n - 1 - i:
                enclosing = min(enclosing, opened)
    if stack:  # unbalanced: leave it as written
        return text
    return text[enclosing : n - enclosing].strip() if enclosing else text


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


def extract_answer(
    text: str, number_fallback: bool = False, max_chars: int = MAX_COMPLETION_CHARS
) -> tuple[str | None, str]:
    """Final answer of a completion and how it was found.

    The outermost last ``\\boxed{}``/``\\fbox{}``; in text without any box command, the
    ``#### N`` line (GSM8K). A broken last marker (an empty or unclosed box, an empty
    ``####`` line) means no answer. Only when the text has no marker at all and
    ``number_fallback`` is on is the last stand-alone number taken. A text longer than
    ``max_chars`` is not read at all: no answer, source "too_long". Returns ``(answer,
    source)`` with source in {"boxed", "hash", "number", "none", "too_long"}.
    """
    if len(text) > max_chars:
        return None, "too_long"
    if _BOX_COMMAND_RE.search(text):
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


# --- units and words after an answer ------------------------------------------------------
#
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


def has_spaced_digits(answer: str) -> bool:
    """True when a space (or a spacing command) separates two digits: ``1 2`` is not 12.

    Thousands written with a thin space (``1\\,000``, ``12\\,345\\,678``) are one number."""
    return _DIGIT_SPACING_RE.search(_THIN_THOUSANDS_RE.sub(_join_thousands, answer)) is not None


def _join_thousands(match: re.Match) -> str:
    return match.group(0).replace("\\,", "")


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
