"""Arithmetic word problems with terse step-by-step solutions, generated from a seed.

A task small models can learn on a CPU in minutes: SFT teaches the answer format and some
of the arithmetic, RL has room to improve the rest. Example (``num_steps=2``)::

    Mia has 47 marbles. She finds 18 more, then loses 25. How many marbles does Mia have now?
    47 + 18 = 65
    65 - 25 = 40
    #### 40
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal

from egspo.data.records import Example

DEFAULT_NAMES = (
    "Mia/she", "Leo/he", "Ava/she", "Noah/he", "Zoe/she", "Omar/he", "Lina/she", "Ravi/he",
    "Emma/she", "Yuki/she", "Sam/he", "Nora/she", "Ivan/he", "Lucia/she", "Tom/he", "Aisha/she",
)  # fmt: skip
DEFAULT_OBJECTS = (
    "marbles", "apples", "stickers", "coins", "books", "pencils", "cards", "shells",
    "stamps", "beads", "cookies", "balloons", "candles", "buttons", "tickets", "stones",
)  # fmt: skip
_ADD_PHRASES = ("finds {x} more", "gets {x} more", "buys {x} more", "receives {x} more")
_SUB_PHRASES = ("loses {x}", "gives away {x}", "sells {x}")
_MUL_PHRASES = ("ends up with {x} times as many",)
_MAX_TRIES_PER_EXAMPLE = 200


@dataclass(frozen=True)
class SyntheticArithmetic:
    """Generator settings; ``generate`` is a pure function of them and its arguments.

    Difficulty knobs: ``num_steps`` (operations chained), ``min_digits``/``max_digits``
    (operand sizes: the digit count is drawn first, so short numbers are as common as
    long ones), ``operations`` (any of ``+-*``; a ``*`` operand is in [2, ``max_multiplier``]).
    Values never go negative: a subtraction never exceeds the running total.

    Train and test are disjoint by construction: each problem (start value, operations,
    operands) belongs to one split through a seeded hash, ``test_fraction`` of the space
    to test, whatever the number of examples drawn. Names are ``"Name/pronoun"`` or a bare
    name (then repeated as the subject).
    """

    seed: int = 0
    num_steps: int = 2
    min_digits: int = 1
    max_digits: int = 2
    operations: str = "+-"
    max_multiplier: int = 9
    train_size: int = 20000
    test_size: int = 500
    test_fraction: float = 0.1
    names: tuple[str, ...] = DEFAULT_NAMES
    objects: tuple[str, ...] = DEFAULT_OBJECTS

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        if not self.operations or set(self.operations) - set("+-*"):
            raise ValueError(f"operations must be a non-empty subset of '+-*', got {self.operations!r}")
        if self.max_multiplier < 2:
            raise ValueError(f"max_multiplier must be >= 2, got {self.max_multiplier}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not self.names or not self.objects:
            raise ValueError("names and objects must be non-empty")

    def config(self) -> dict:
        """The settings as plain data (for cache keys and logging)."""
        return asdict(self)

    def generate(self, n: int | None = None, split: Literal["train", "test"] = "train") -> list[Example]:
        """``n`` distinct problems of ``split`` (default: ``train_size`` / ``test_size``)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        n = (self.train_size if split == "train" else self.test_size) if n is None else n
        rng = random.Random(f"egspo-synthetic/{self.seed}/{split}")
        seen: set[tuple] = set()
        examples: list[Example] = []
        for _ in range(_MAX_TRIES_PER_EXAMPLE * max(n, 1)):
            if len(examples) >= n:
                break
            problem = self._draw_problem(rng)
            if problem is None or problem in seen or self._split_of(problem) != split:
                continue
            seen.add(problem)
            examples.append(self._render(problem, rng))
        if len(examples) < n:
            raise ValueError(
                f"only {len(examples)} distinct {split} problems found for n={n}: the problem space "
                "is too small; raise max_digits or num_steps, or lower n"
            )
        return examples

    def corpus(self, n: int = 4000) -> Iterator[str]:
        """Questions and solutions of ``n`` train problems (text for tokenizer training)."""
        for example in self.generate(n, "train"):
            yield example.prompt
            yield example.response

    def _draw_number(self, rng: random.Random, upper: int | None = None) -> int | None:
        top_digits = self.max_digits if upper is None else min(self.max_digits, len(str(upper)))
        if top_digits < self.min_digits:
            return None
        digits = rng.randint(self.min_digits, top_digits)
        low = 1 if digits == 1 else 10 ** (digits - 1)
        high = 10**digits - 1 if upper is None else min(10**digits - 1, upper)
        return rng.randint(low, high) if low <= high else None

    def _draw_problem(self, rng: random.Random) -> tuple | None:
        """``(start, ((op, operand), ...))`` or None when no legal operation is left."""
        start = value = self._draw_number(rng)
        steps = []
        for _ in range(self.num_steps):
            op = rng.choice(self.operations)
            if op == "+":
                operand = self._draw_number(rng)
                new = value + operand
            elif op == "-":
                operand = self._draw_number(rng, upper=value)
                if operand is None:
                    return None
                new = value - operand
            else:
                operand = rng.randint(2, self.max_multiplier)
                new = value * operand
            steps.append((op, operand))
            value = new
        return start, tuple(steps)

    def _split_of(self, problem: tuple) -> str:
        digest = hashlib.blake2b(f"{self.seed}/{problem}".encode(), digest_size=8).digest()
        return "test" if int.from_bytes(digest, "little") / 2**64 < self.test_fraction else "train"

    def _render(self, problem: tuple, rng: random.Random) -> Example:
        start, steps = problem
        name, _, pronoun = rng.choice(self.names).partition("/")
        subject = pronoun.capitalize() if pronoun else name
        obj = rng.choice(self.objects)
        phrases, lines = [], []
        value = start
        for op, operand in steps:
            if op == "+":
                result, template = value + operand, rng.choice(_ADD_PHRASES)
            elif op == "-":
                result, template = value - operand, rng.choice(_SUB_PHRASES)
            else:
                result, template = value * operand, rng.choice(_MUL_PHRASES)
            phrases.append(template.format(x=operand))
            lines.append(f"{value} {op} {operand} = {result}")
            value = result
        actions = ", then ".join(phrases)
        question = f"{name} has {start} {obj}. {subject} {actions}. How many {obj} does {name} have now?"
        lines.append(f"#### {value}")
        return Example(prompt=question, response="\n".join(lines), answer=str(value))
