"""A pool of long-lived math-verify worker processes with a hard per-sample deadline.

math-verify bounds its own run time with ``signal.alarm``, which works only in the main
thread of the main process: not in DataLoader workers, callback threads or async rollout
code. Sympy can also block inside a single C call (``9^{9^{9^9}}``) where no signal helps.
So verification runs in child processes: each request gets ``timeout_seconds`` of wall
time, after which its worker is killed and replaced, and a whole call can be given a
budget after which the requests still queued or running are given up. The children are
plain scripts started with ``subprocess`` (fork + exec), which is safe from a process with
threads.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

_WORKER_SCRIPT = Path(__file__).with_name("_verify_worker.py")
# A request that kills this many workers in a row is reported as an error, not retried.
_MAX_ATTEMPTS = 2
# Thread pools a worker could start (OpenMP, MKL, OpenBLAS), and the OpenMP waiting knobs a
# user may have set. Verification is single-threaded Python (sympy loads no OpenMP or BLAS
# runtime today); the defaults keep it so if a dependency ever does.
_THREAD_KNOBS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_WAIT_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


GoldStatus = Literal["ok", "lossy", "unparsable"]


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of one request. ``gold``: "ok" (parsed without loss), "lossy" (parsed, but the
    parse drops meaning, ``reason`` says what) or "unparsable"; ``pred_parsed``: the
    prediction parsed without loss (only verified when the gold is "ok"). Both are known only
    when ``status`` is "ok"; "budget": not verified, the call's budget ran out first."""

    gold: GoldStatus
    correct: bool
    status: Literal["ok", "timeout", "error", "budget"]
    reason: str = ""
    pred_parsed: bool = False


@dataclass
class _Batch:
    """The requests of one ``VerifierPool.run`` call and how far they are."""

    payloads: list[bytes]  # one JSON line per request
    results: list[VerifyResult | None]
    attempts: list[int]  # workers each request has crashed
    queue: list[int]  # requests not sent yet, the next one last
    remaining: int  # requests without a result

    @classmethod
    def of(cls, requests: list[tuple[str | None, str]]) -> _Batch:
        payloads = [(json.dumps({"pred": p, "gold": g}) + "\n").encode() for p, g in requests]
        n = len(requests)
        return cls(payloads, [None] * n, [0] * n, list(range(n))[::-1], n)

    def finish(self, task: int, result: VerifyResult) -> None:
        self.results[task] = result
        self.remaining -= 1


def _worker_env() -> dict[str, str]:
    """The trainer's environment, with one thread per worker and passive OpenMP waiting unless
    the user chose otherwise: the workers share the cores with the trainer, and an idle OpenMP
    thread that spins holds a core the trainer waits for."""
    env = dict(os.environ)
    for knob in _THREAD_KNOBS:
        env.setdefault(knob, "1")
    if not any(knob in env for knob in _WAIT_KNOBS):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class _Worker:
    def __init__(self, soft_timeout: float, rel_tol: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(_WORKER_SCRIPT), f"{soft_timeout:.3f}", repr(rel_tol)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=_worker_env(),
        )
        self.fd = self.proc.stdout.fileno()
        self.buffer = b""
        self.ready = False
        self.task: int | None = None
        self.deadline = 0.0
        self.started = time.monotonic()

    def send(self, task: int, payload: bytes, deadline: float) -> bool:
        self.task, self.deadline = task, deadline
        try:
            self.proc.stdin.write(payload)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        return True

    def read_lines(self) -> list[dict] | None:
        """Complete reply lines available now; None at end of file (the worker died)."""
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            return None
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()


def _readable(fds: list[int], timeout: float | None) -> set[int]:
    """File descriptors with data or end of file (poll, unlike select, takes any fd number)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    millis = None if timeout is None else max(0, int(timeout * 1000) + 1)
    return {fd for fd, _ in poller.poll(millis)}


def _shutdown(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.kill()
    workers.clear()


class VerifierPool:
    """Runs ``(pred, gold)`` verification requests on ``num_workers`` child processes.

    Workers start on first use and stay alive between calls (start-up imports sympy,
    about a second). Each request has ``timeout_seconds`` of wall time; the worker's own
    timer fires at ``soft_fraction`` of it so most timeouts cost no restart. ``rel_tol`` is
    the relative tolerance for scalar numeric answers (0: exact). A pool used after
    ``fork`` starts fresh workers in the child and leaves the parent's alone.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_seconds: float = 2.0,
        soft_fraction: float = 0.8,
        startup_timeout: float = 120.0,
        rel_tol: float = 0.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be > 0, got {timeout_seconds}")
        if os.name != "posix":
            raise RuntimeError("VerifierPool needs a POSIX system (poll on pipes, SIGALRM).")
        self.num_workers = num_workers
        self.timeout_seconds = timeout_seconds
        self.soft_timeout = timeout_seconds * soft_fraction
        self.startup_timeout = startup_timeout
        self.rel_tol = rel_tol
        self.restarts = 0
        self._workers: list[_Worker] = []
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def run(
        self, requests: list[tuple[str | None, str]], budget_seconds: float | None = None
    ) -> list[VerifyResult]:
        """Verify each ``(pred, gold)``; ``pred=None`` only classifies the gold.

        With ``budget_seconds``, requests not finished that many seconds after the call
        starts (worker restarts included) come back with status "budget"; the workers
        still busy with them are replaced, so the next call starts clean.
        """
        if not requests:
            return []
        with self._lock:
            deadline = None if budget_seconds is None else time.monotonic() + budget_seconds
            self._ensure_workers()
            return self._run(requests, deadline)

    def close(self) -> None:
        """Stop the workers (they also exit on their own when this process ends)."""
        if os.getpid() == self._pid:
            _shutdown(self._workers)

    def _ensure_workers(self) -> None:
        if os.getpid() != self._pid:  # forked: the inherited workers belong to the parent
            self._workers = []
            self._pid = os.getpid()
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self.soft_timeout, self.rel_tol))

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self.soft_timeout, self.rel_tol)
        self.restarts += 1

    def _run(self, requests: list[tuple[str | None, str]], deadline: float | None) -> list[VerifyResult]:
        """One call's event loop: hand queued requests to idle workers, wait for a reply, a
        per-request deadline, a start-up deadline or the call's budget, then act on it."""
        batch = _Batch.of(requests)
        while batch.remaining:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self._give_up(batch)
                break
            self._dispatch(batch, now)
            readable = _readable([w.fd for w in self._workers], self._wait_seconds(deadline))
            for worker in [w for w in self._workers if w.fd in readable]:
                self._receive(worker, batch)
            self._enforce_deadlines(batch)
        return batch.results  # type: ignore[return-value]

    def _dispatch(self, batch: _Batch, now: float) -> None:
        """Send the next queued request to each idle worker, its deadline starting now."""
        for worker in list(self._workers):
            if worker.ready and worker.task is None and batch.queue:
                task = batch.queue.pop()
                if not worker.send(task, batch.payloads[task], now + self.timeout_seconds):
                    self._fail(worker, "error", batch)

    def _wait_seconds(self, deadline: float | None) -> float | None:
        """How long to wait for a reply: until the nearest deadline (None: no deadline)."""
        waits = [] if deadline is None else [deadline]
        for worker in self._workers:
            if not worker.ready:
                waits.append(worker.started + self.startup_timeout)
            elif worker.task is not None:
                waits.append(worker.deadline)
        return max(0.0, min(waits) - time.monotonic()) if waits else None

    def _receive(self, worker: _Worker, batch: _Batch) -> None:
        """Read what ``worker`` wrote: its ready line, replies, or its end (it died)."""
        lines = worker.read_lines()
        if lines is None:
            if not worker.ready:
                raise RuntimeError("math-verify worker exited during start-up")
            self._fail(worker, "error", batch)
            return
        for message in lines:
            if "fatal" in message:
                raise RuntimeError(f"math-verify worker cannot start: {message['fatal']}")
            if message.get("ready"):
                worker.ready = True
            elif worker.task is not None:
                result = VerifyResult(
                    message["gold"],
                    bool(message["correct"]),
                    message["status"],
                    message["reason"],
                    bool(message["pred_parsed"]),
                )
                batch.finish(worker.task, result)
                worker.task = None

    def _enforce_deadlines(self, batch: _Batch) -> None:
        """Replace the workers past their request's deadline; fail if one never starts."""
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.task is not None and now >= worker.deadline:
                self._fail(worker, "timeout", batch)
            elif not worker.ready and now >= worker.started + self.startup_timeout:
                raise RuntimeError(f"math-verify worker did not start within {self.startup_timeout:.0f} s")

    def _fail(self, worker: _Worker, status: Literal["timeout", "error"], batch: _Batch) -> None:
        """Replace ``worker``; its request is retried once after a crash (which may be
        unrelated to it), and reported as ``status`` after a timeout or a second crash."""
        task = worker.task
        worker.task = None
        self._replace(worker)
        if task is None:
            return
        batch.attempts[task] += 1
        if status == "error" and batch.attempts[task] < _MAX_ATTEMPTS:
            batch.queue.append(task)
        else:
            batch.finish(task, VerifyResult("unparsable", False, status))

    def _give_up(self, batch: _Batch) -> None:
        """Budget spent: mark the queued and running requests, replace the busy workers."""
        budget = VerifyResult("unparsable", False, "budget")
        for worker in list(self._workers):
            if worker.task is not None:
                batch.finish(worker.task, budget)
                worker.task = None
                self._replace(worker)
        for task in batch.queue:
            batch.finish(task, budget)
        batch.queue.clear()
