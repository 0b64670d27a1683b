"""Final-answer extraction: which part of a completion is its answer, shared by rewards,
metrics and data loading.

The outermost last ``\\boxed{}``, else the ``####`` line, else (on request) the last
stand-alone number. Plain string work with linear cost in the input length, so it is safe
to run in the trainer process on arbitrary model output (``extract_answer`` reads at most
``MAX_COMPLETION_CHARS`` characters; the reward caps answers at ``max_answer_chars``).
Comparing answers once found is ``numeric`` (plain numbers) and ``units`` (units, words
and letters). The answer policy is documented on ``MathReward``.
"""

from __future__ import annotations

import re

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
