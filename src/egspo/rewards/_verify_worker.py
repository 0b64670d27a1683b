"""Answer-verification worker, run as a script in its own process by ``VerifierPool``.

It reads one JSON request per line on stdin (``{"gold": str, "pred": str | null}``) and
writes one JSON reply per line on stdout (``{"gold_ok", "correct", "status"}``). It is a
standalone script, not a package import, so the child starts without torch or egspo.

Timeouts: math-verify's own timeout uses ``signal.alarm`` and swallows the expiry, so it is
disabled here; an interval timer raises a ``BaseException`` that escapes math-verify's
``except Exception`` handlers instead, which lets the worker report a timeout and keep
running. Work stuck inside a C call ignores the timer: the parent kills the process then.
"""

import json
import os
import signal
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# Running a file as a script puts its folder first on sys.path; drop it so that nothing in
# this package shadows a top-level module in the imports below.
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path.pop(0)


class _SoftTimeout(BaseException):
    """Raised by the interval timer; a BaseException so library handlers do not swallow it."""


_armed = False


def _on_alarm(signum, frame):
    if _armed:
        raise _SoftTimeout


def _has_expression(parsed) -> bool:
    """math-verify falls back to the raw string when it cannot parse; that is not a parse."""
    return any(not isinstance(item, str) for item in parsed)


def main() -> None:
    global _armed
    soft_timeout = float(sys.argv[1])
    out = sys.stdout
    try:
        import logging
        from functools import lru_cache

        logging.disable(logging.CRITICAL)
        from math_verify import parse, verify
    except BaseException as exc:  # report why the worker cannot run, then exit
        out.write(json.dumps({"fatal": f"{type(exc).__name__}: {exc}"}) + "\n")
        out.flush()
        return

    @lru_cache(maxsize=4096)
    def parse_gold(gold: str):
        return parse(gold, parsing_timeout=None)

    signal.signal(signal.SIGALRM, _on_alarm)
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        reply = {"gold_ok": False, "correct": False, "status": "ok"}
        _armed = True
        signal.setitimer(signal.ITIMER_REAL, soft_timeout)
        try:
            gold = parse_gold(request["gold"])
            reply["gold_ok"] = _has_expression(gold)
            if reply["gold_ok"] and request["pred"] is not None:
                pred = parse(request["pred"], parsing_timeout=None, raise_on_error=True)
                errors = 0
                for g in gold:
                    for p in pred:
                        try:
                            if verify(g, p, timeout_seconds=None, raise_on_error=True):
                                reply["correct"] = True
                                break
                        except Exception:
                            errors += 1
                    if reply["correct"]:
                        break
                if errors and not reply["correct"]:
                    reply["status"] = "error"
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
