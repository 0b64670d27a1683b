"""Answer-verification worker, run as a script in its own process by ``VerifierPool``.

It reads one JSON request per line on stdin (``{"gold": str, "pred": str | null}``, both the
bare answer text) and writes one JSON reply per line on stdout
(``{"gold": "ok" | "lossy" | "unparsable", "reason": str, "pred_parsed": bool, "correct": bool,
"status": str}``; ``pred_parsed``: the prediction parsed without loss).
It is a standalone script, not a package import, so the child starts without torch or egspo;
its heavy imports (sympy, math-verify) sit at the top of this file because only the worker
process ever runs it: the trainer starts it with ``subprocess`` and never imports it. If
they fail, the worker writes ``{"fatal": reason}`` and exits; the pool raises with it.

The answer policy (documented on ``MathReward``) lives in ``analyse`` and ``matches``:
math-verify parses and compares; this file only refuses what math-verify would get wrong.

- Units are never stripped here (math-verify's list drops "more", "less", "profit"...): the
  reward splits off the known units before it sends an answer, and words that are not units
  never reach this file as anything but text. A parse is *lossy* when it dropped meaning: a
  relation sign vanished, letters vanished, or two letters differing only in case (``N = n``)
  became one symbol (latex2sympy lower-cases symbols).
- Lists (top-level commas, semicolons, "and"/"or", a whole-answer set literal) are matched
  item by item as multisets: ``5, 5`` is not ``5``, ``5, 5, 6`` is not ``5, 6, 6``; a
  ``\\pm`` item counts as its two values; a bare value answers an ``x = 1`` item only in its
  place.
- Decimals are made exact rationals before comparing, so ``0.3333333 != 1/3``; a relative
  tolerance ``rel_tol`` (argv) optionally accepts rounded scalar answers. Expressions that
  sympy cannot simplify into each other are compared numerically to 60 significant digits.
- An equation answers a bare gold value only as ``variable = value`` (``x = 5``), and every
  link of a chain ``x = 2 + 3 = 5`` must hold.

Timeouts: math-verify's own timeout uses ``signal.alarm`` and swallows the expiry, so it is
disabled here; an interval timer raises a ``BaseException`` that escapes math-verify's
``except Exception`` handlers instead, which lets the worker report a timeout and keep
running. Work stuck inside a C call ignores the timer: the parent kills the process then.
"""

import json
import logging
import os
import re
import signal
import sys
from dataclasses import replace
from functools import lru_cache

_HERE = os.path.dirname(os.path.abspath(__file__))
# Running a file as a script puts its folder first on sys.path; drop it so that nothing in
# this package shadows a top-level module in the imports below.
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path.pop(0)

try:
    from math_verify import LatexExtractionConfig, parse, verify
    from math_verify.grader import is_assignment_relation, is_relation, take_last_relation
    from sympy import E, FiniteSet, Float, I, Rational, Set, exp
    from sympy.core.function import AppliedUndef
    from sympy.core.relational import Relational
    from sympy.logic.boolalg import Boolean
except Exception as exc:  # say why the worker cannot run (the pool raises with it), then exit
    sys.stdout.write(json.dumps({"fatal": f"{type(exc).__name__}: {exc}"}) + "\n")
    sys.stdout.flush()
    raise SystemExit(1) from None

# Commands whose braced argument is a name or a word, not variables: ``\text{cm}``, ``\mathbb{R}``.
_WORD_COMMAND_RE = re.compile(
    r"\\(?:text|textbf|textit|mbox|mathrm|mathbf|mathit|mathbb|mathcal|mathsf|mathfrak|operatorname"
    r"|begin|end)\s*\{[^{}]*\}"
)
_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
# ``1-5\mathrm{i}``: latex2sympy reads a text ``i`` as a variable, math-verify's unit
# stripping deletes it; written bare it is the imaginary unit (and ``e`` Euler's number).
_UPRIGHT_CONSTANT_RE = re.compile(r"\\(?:mathrm|text|mathit|operatorname)\s*\{\s*([ie])\s*\}")
# ``52_8``: a number in another base; latex2sympy keeps the digits and drops the base.
_BASE_SUBSCRIPT_RE = re.compile(r"\d+\s*_\s*\{?\s*\d+\}?")
_RELATION_RE = re.compile(r"=|<|>|\\(?:le|ge|leq|geq|leqslant|geqslant|neq|ne|lt|gt|not)(?![A-Za-z])")
# Words that separate the items of a list (math-verify reads them as commas), and a whole
# answer written as a set literal: its items are the list.
_SEPARATOR_WORD_RE = re.compile(r"\\text\s*\{\s*(?:and|or)\s*\}|(?<![A-Za-z\\])(?:and|or)(?![A-Za-z])")
_SET_LITERAL_RE = re.compile(r"\s*(?:\\left)?\\\{(.*?)(?:\\right)?\\\}\s*", re.S)
_LIST_TOKEN_RE = re.compile(r"\\begin\s*\{[^{}]*\}|\\end\s*\{[^{}]*\}|\\[{}]|[,;()\[\]{}]")
_PLUS_MINUS_RE = re.compile(r"\\(?:pm|mp)(?![A-Za-z])")
# Items beyond this many are not matched one by one (quadratic in the items): no match.
_MAX_ITEMS = 64
# Significant digits of math-verify's numeric last resort (its default, 15, lets an answer
# off by 1e-20 pass).
_NUMERIC_DIGITS = 60


class _SoftTimeout(BaseException):
    """Raised by the interval timer; a BaseException so library handlers do not swallow it."""


_armed = False


def _on_alarm(signum, frame):
    if _armed:
        raise _SoftTimeout


def _split_top(text: str) -> list[str] | None:
    """Pieces of ``text`` between commas and semicolons outside brackets, or None when its
    brackets do not balance (then it is one item)."""
    items, depth, start = [], 0, 0
    for match in _LIST_TOKEN_RE.finditer(text):
        token = match.group(0)
        if token[0] in "([{" or token.startswith(("\\begin", "\\{")):
            depth += 1
        elif token[0] in ")]}" or token.startswith(("\\end", "\\}")):
            depth -= 1
            if depth < 0:
                return None
        elif depth == 0:
            items.append(text[start : match.start()])
            start = match.end()
    if depth != 0:
        return None
    return [*items, text[start:]]


def list_items(text: str) -> list[str]:
    """The items of an answer read as a list: top-level commas, semicolons, "and"/"or", and
    the elements of a whole-answer set literal ``\\{1, 2\\}``. One item for anything else
    (a tuple ``(1, 2)`` or an interval is one item, compared in order by math-verify)."""
    text = _SEPARATOR_WORD_RE.sub(",", text)
    literal = _SET_LITERAL_RE.fullmatch(text)
    if literal and _split_top(literal.group(1)) is not None:
        text = literal.group(1)
    items = _split_top(text)
    return [item.strip() for item in items] if items is not None else [text.strip()]


# The answer is already extracted: parse it as LaTeX only (no search for numbers in the
# text, no string fallback) and never strip units: the reward splits off the known units
# before (math-verify's own list drops words such as "more", "less", "profit").
_CONFIG = LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)
_CONFIG = replace(_CONFIG, normalization_config=replace(_CONFIG.normalization_config, units=False))


def _expr_letters(expr) -> set[str]:
    """Lower-case letters the parsed expression still carries (symbols, functions, e, i)."""
    names = [str(s) for s in expr.free_symbols]
    names += [str(f.func) for f in expr.atoms(AppliedUndef)]
    if expr.has(E) or expr.has(exp):
        names.append("e")
    if expr.has(I):
        names.append("i")
    return set("".join(names).lower())


def lossy_reason(normalized: str, expr) -> str:
    """Why ``expr`` does not carry all of ``normalized``'s meaning, or "" when it does."""
    words_removed = _WORD_COMMAND_RE.sub(" ", normalized)
    letters = set(re.findall(r"[A-Za-z]", _COMMAND_RE.sub(" ", words_removed)))
    folded = sorted(ch for ch in letters if ch.islower() and ch.upper() in letters)
    if folded:
        return f"letters differing only in case become one symbol: {', '.join(folded)}"
    lost = sorted(ch for ch in letters if ch.lower() not in _expr_letters(expr))
    if lost:
        return f"letters lost in parsing: {', '.join(lost)}"
    if _RELATION_RE.search(words_removed) and not (
        isinstance(expr, (Relational, Boolean, Set)) or expr.atoms(Relational)
    ):
        return "relation sign lost in parsing"
    base = _BASE_SUBSCRIPT_RE.search(words_removed)
    if base:
        return f"the base of a number ({base.group(0)}) is lost in parsing"
    return ""


def _exact(expr):
    """Decimals as exact rationals (``0.5`` -> 1/2), so equality is never approximate."""
    floats = expr.atoms(Float)
    return expr.xreplace({f: Rational(str(f)) for f in floats}) if floats else expr


def _parse_one(text: str):
    """``(expr or None, normalized text)`` of one LaTeX answer."""
    result = parse(
        "\\boxed{" + text + "}",
        extraction_config=[_CONFIG],
        fallback_mode="first_match",
        parsing_timeout=None,
        raise_on_error=True,
    )
    exprs = [x for x in result if not isinstance(x, str)]
    strings = [x for x in result if isinstance(x, str)]
    return (exprs[0] if exprs else None), (strings[0] if strings else text)


def analyse(text: str):
    """``(exact expr or None, "ok" | "lossy" | "unparsable", reason)`` for one answer."""
    text = _UPRIGHT_CONSTANT_RE.sub(r"\1", text)
    expr, normalized = _parse_one(text)
    if expr is None:
        return None, "unparsable", "math-verify cannot parse it"
    reason = lossy_reason(normalized, expr)
    return _exact(expr), ("lossy" if reason else "ok"), reason


# A batch repeats its golds (a group shares one): each is parsed once.
_analyse_gold = lru_cache(maxsize=8192)(analyse)


def _same(gold, pred) -> bool:
    """math-verify's comparison, its numeric last resort at ``_NUMERIC_DIGITS`` digits."""
    return verify(gold, pred, numeric_precision=_NUMERIC_DIGITS, timeout_seconds=None, raise_on_error=True)


def _holds(relation) -> bool:
    """``variable = value``, or a chain ``variable = a = b`` whose every link holds; not
    ``6 = 5``, ``2x = 10``, ``x > 5`` or ``x = 6 = 5``."""
    if not is_assignment_relation(relation):
        return False
    links = list(getattr(relation, "_unsorted_args", [relation]))
    return all(_same(link.lhs, link.rhs) for link in links[1:])


def _within(gold, pred, rel_tol: float) -> bool:
    """Relative tolerance for scalar numbers: ``|pred - gold| <= rel_tol * |gold|``."""
    try:
        if not (gold.is_number and pred.is_number):
            return False
        return bool(abs(pred - gold).evalf(30) <= rel_tol * abs(gold).evalf(30))
    except Exception:
        return False


def matches(gold, pred, rel_tol: float) -> bool:
    """``pred`` answers ``gold`` (both parsed): whole, or as ``variable = value`` for a bare
    gold value, or within ``rel_tol`` for scalar numbers."""
    if is_relation(pred) and not is_relation(gold):
        if not _holds(pred):
            return False
        pred = take_last_relation(pred).rhs
    elif not gold.atoms(Relational) and any(not is_assignment_relation(r) for r in pred.atoms(Relational)):
        return False  # an equation such as ``6 = 5`` inside a list answers no bare value
    if _same(gold, pred):
        return True
    return rel_tol > 0 and _within(gold, pred, rel_tol)


def _values(items: list[str]):
    """Parsed values of list items, a ``\\pm`` item giving both of its values; None when
    an item does not parse in full."""
    out = []
    for item in items:
        expr, status, _ = analyse(item)
        if status != "ok":
            return None
        if _PLUS_MINUS_RE.search(item) and isinstance(expr, FiniteSet):
            out += list(expr.args)
        else:
            out.append(expr)
    return out


def lists_match(gold_text: str, pred_text: str, rel_tol: float) -> bool | None:
    """Item-by-item match of two answers read as lists (a multiset: ``5, 5`` is not ``5``
    and ``5, 5, 6`` is not ``5, 6, 6``); None when both are single items without
    ``\\pm`` (compared whole). A bare value answers a gold ``x = 1`` item only in its place."""
    gold_items, pred_items = list_items(gold_text), list_items(pred_text)
    if len(gold_items) == len(pred_items) == 1 and not (
        _PLUS_MINUS_RE.search(gold_text) or _PLUS_MINUS_RE.search(pred_text)
    ):
        return None
    if max(len(gold_items), len(pred_items)) > _MAX_ITEMS:
        return False
    golds, preds = _values(gold_items), _values(pred_items)
    if golds is None or preds is None or len(golds) != len(preds):
        return False
    partner: dict[int, int] = {}  # pred index -> gold index

    def allowed(g: int, p: int) -> bool:
        if is_relation(golds[g]) and not is_relation(preds[p]) and g != p:
            return False
        return matches(golds[g], preds[p], rel_tol)

    def assign(g: int, seen: set[int]) -> bool:  # augmenting path (bipartite matching)
        for p in range(len(preds)):
            if p not in seen and allowed(g, p):
                seen.add(p)
                if p not in partner or assign(partner[p], seen):
                    partner[p] = g
                    return True
        return False

    return all(assign(g, set()) for g in range(len(golds)))


def reply_to(request: dict, rel_tol: float, soft_timeout: float) -> dict:
    """The reply to one request, its work bounded by the interval timer: a ``_SoftTimeout``
    gives status "timeout", any other error status "error", and neither is correct."""
    global _armed
    reply = {"gold": "unparsable", "reason": "", "pred_parsed": False, "correct": False, "status": "ok"}
    _armed = True
    signal.setitimer(signal.ITIMER_REAL, soft_timeout)
    try:
        gold, reply["gold"], reply["reason"] = _analyse_gold(request["gold"])
        if reply["gold"] == "ok" and request["pred"] is not None:
            pred, pred_status, _ = analyse(request["pred"])
            reply["pred_parsed"] = pred_status == "ok"
            if reply["pred_parsed"]:
                as_lists = lists_match(request["gold"], request["pred"], rel_tol)
                reply["correct"] = matches(gold, pred, rel_tol) if as_lists is None else as_lists
    except _SoftTimeout:
        reply["status"] = "timeout"
    except Exception:
        reply["status"] = "error"
    finally:
        _armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
    if reply["status"] != "ok":
        reply["correct"] = False
    return reply


def _write(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> None:
    """Arguments: the soft timeout in seconds and ``rel_tol``. Says it is ready, then answers
    each request line until stdin closes."""
    soft_timeout, rel_tol = float(sys.argv[1]), float(sys.argv[2])
    logging.disable(logging.CRITICAL)  # math-verify logs each failed parse; nobody reads them here
    signal.signal(signal.SIGALRM, _on_alarm)
    _write({"ready": True})
    for line in sys.stdin:
        _write(reply_to(json.loads(line), rel_tol, soft_timeout))


if __name__ == "__main__":
    main()
