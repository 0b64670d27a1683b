"""Answer-verification worker, run as a script in its own process by ``VerifierPool``.

It reads one JSON request per line on stdin (``{"gold": str, "pred": str | null}``, both the
bare answer text) and writes one JSON reply per line on stdout
(``{"gold": "ok" | "lossy" | "unparsable", "reason": str, "pred_parsed": bool, "correct": bool,
"status": str}``; ``pred_parsed``: the prediction parsed without loss).
It is a standalone script, not a package import, so the child starts without torch or egspo.

The answer policy (documented on ``MathReward``) lives in ``analyse`` and ``matches``:
math-verify parses and compares; this file only refuses what math-verify would get wrong.

- A parse is *lossy* when it dropped meaning: math-verify's unit stripping removed more than
  a unit (``1-5\\mathrm{i}`` -> ``1-5``, ``5\\text{ cm}, 6\\text{ cm}`` -> ``5``), a relation
  sign vanished, letters vanished, or two letters differing only in case (``N = n``) became
  one symbol (latex2sympy lower-cases symbols). Unit stripping is retried off before giving up.
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
import os
import re
import signal
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# Running a file as a script puts its folder first on sys.path; drop it so that nothing in
# this package shadows a top-level module in the imports below.
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path.pop(0)

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
# What math-verify's unit stripping may drop without changing the answer: ``\text{ cm}^2``
# (a word of two letters or more in a text command) or a bare unit word of three letters or
# more (``feet``); bare one- or two-letter "units" (``c``, ``ab``) are variables as often.
_TEXT_UNIT_RE = re.compile(r"\s*\\(?:text|mbox)\s*\{\s*([A-Za-z][A-Za-z .]*)\}\s*(?:\^\d|\{\^\d\})?")
_BARE_UNIT_RE = re.compile(r"\s*([A-Za-z]{3,})")
# Significant digits of math-verify's numeric last resort (its default, 15, lets an answer
# off by 1e-20 pass).
_NUMERIC_DIGITS = 60


class _SoftTimeout(BaseException):
    """Raised by the interval timer; a BaseException so library handlers do not swallow it."""


_armed = False


def _on_alarm(signum, frame):
    if _armed:
        raise _SoftTimeout


def _is_unit_suffix(dropped: str) -> bool:
    """True when ``dropped`` (what unit stripping removed) is only unit words."""
    pos = 0
    while pos < len(dropped):
        if not dropped[pos:].strip():
            return True
        match = _TEXT_UNIT_RE.match(dropped, pos)
        if match and sum(ch.isalpha() for ch in match.group(1)) >= 2:
            pos = match.end()
            continue
        match = _BARE_UNIT_RE.match(dropped, pos)
        if not match:
            return False
        pos = match.end()
    return True


def main() -> None:
    global _armed
    soft_timeout, rel_tol = float(sys.argv[1]), float(sys.argv[2])
    out = sys.stdout
    try:
        import logging
        from dataclasses import replace
        from functools import lru_cache

        logging.disable(logging.CRITICAL)
        from latex2sympy2_extended.latex2sympy2 import normalize_latex
        from math_verify import LatexExtractionConfig, parse, verify
        from math_verify.grader import is_assignment_relation, is_relation, take_last_relation
        from sympy import E, Float, I, Rational, Set, exp
        from sympy.core.function import AppliedUndef
        from sympy.core.relational import Relational
        from sympy.logic.boolalg import Boolean
    except BaseException as exc:  # report why the worker cannot run, then exit
        out.write(json.dumps({"fatal": f"{type(exc).__name__}: {exc}"}) + "\n")
        out.flush()
        return

    # The answer is already extracted: parse it as LaTeX only (no search for numbers in the
    # text, no string fallback), first with math-verify's unit stripping, then without.
    with_units = LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)
    without_units = replace(
        with_units, normalization_config=replace(with_units.normalization_config, units=False)
    )

    def letters_of(expr) -> set[str]:
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
        lost = sorted(ch for ch in letters if ch.lower() not in letters_of(expr))
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

    def exact(expr):
        """Decimals as exact rationals (``0.5`` -> 1/2), so equality is never approximate."""
        floats = expr.atoms(Float)
        return expr.xreplace({f: Rational(str(f)) for f in floats}) if floats else expr

    def parse_one(text: str, config):
        """``(expr or None, normalized text)`` of one LaTeX answer."""
        result = parse(
            "\\boxed{" + text + "}",
            extraction_config=[config],
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
        expr, normalized = parse_one(text, with_units)
        raw = normalize_latex("\\boxed{" + text + "}", without_units.normalization_config)
        dropped = raw[len(normalized) :] if raw.startswith(normalized) else raw
        if normalized != raw and not _is_unit_suffix(dropped):  # more than a unit went: retry
            retry, retry_normalized = parse_one(text, without_units)
            if retry is None and expr is not None:
                return exact(expr), "lossy", f"unit stripping dropped {dropped!r}"
            expr, normalized = retry, retry_normalized
        if expr is None:
            return None, "unparsable", "math-verify cannot parse it"
        reason = lossy_reason(normalized, expr)
        return exact(expr), ("lossy" if reason else "ok"), reason

    analyse_gold = lru_cache(maxsize=8192)(analyse)

    def same(gold, pred) -> bool:
        """math-verify's comparison, its numeric last resort at ``_NUMERIC_DIGITS`` digits."""
        return verify(
            gold, pred, numeric_precision=_NUMERIC_DIGITS, timeout_seconds=None, raise_on_error=True
        )

    def holds(relation) -> bool:
        """``variable = value``, or a chain ``variable = a = b`` whose every link holds; not
        ``6 = 5``, ``2x = 10``, ``x > 5`` or ``x = 6 = 5``."""
        if not is_assignment_relation(relation):
            return False
        links = list(getattr(relation, "_unsorted_args", [relation]))
        return all(same(link.lhs, link.rhs) for link in links[1:])

    def within(gold, pred) -> bool:
        """Relative tolerance for scalar numbers: ``|pred - gold| <= rel_tol * |gold|``."""
        try:
            if not (gold.is_number and pred.is_number):
                return False
            return bool(abs(pred - gold).evalf(30) <= rel_tol * abs(gold).evalf(30))
        except Exception:
            return False

    def matches(gold, pred) -> bool:
        if is_relation(pred) and not is_relation(gold):
            if not holds(pred):
                return False
            pred = take_last_relation(pred).rhs
        elif not gold.atoms(Relational) and any(
            not is_assignment_relation(r) for r in pred.atoms(Relational)
        ):
            return False  # an equation such as ``6 = 5`` inside a list answers no bare value
        if same(gold, pred):
            return True
        return rel_tol > 0 and within(gold, pred)

    signal.signal(signal.SIGALRM, _on_alarm)
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        reply = {"gold": "unparsable", "reason": "", "pred_parsed": False, "correct": False, "status": "ok"}
        _armed = True
        signal.setitimer(signal.ITIMER_REAL, soft_timeout)
        try:
            gold, reply["gold"], reply["reason"] = analyse_gold(request["gold"])
            if reply["gold"] == "ok" and request["pred"] is not None:
                pred, pred_status, _ = analyse(request["pred"])
                reply["pred_parsed"] = pred_status == "ok"
                reply["correct"] = reply["pred_parsed"] and matches(gold, pred)
        except _SoftTimeout:
            reply["status"] = "timeout"
        except Exception:
            reply["status"] = "error"
        finally:
            _armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        if reply["status"] != "ok":
            reply["correct"] = False
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
