"""`python -m egspo fit|validate|test --config ...`: Lightning's CLI around the module and data.

`python -m egspo export CKPT --out DIR` writes a merged Hugging Face model (`egspo.export`).
Scripts and tests build the same CLI with `egspo.cli.run(args)`.

User errors (bad options, data, model paths, checkpoints) end the run with exit status 2 and one
line naming the option, file or line (`error: model.rollout.top_p=1.5: must be in (0, 1]`);
whatever the config alone decides is checked before any model loads. `--debug` (or
`EGSPO_DEBUG=1`) shows the traceback, or jsonargparse's full message, instead.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from pathlib import Path

import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from egspo.callbacks.checkpointing import LAST, IterationCheckpoint
from egspo.data import HybridDataModule
from egspo.data.records import DataError
from egspo.export import main as export_main
from egspo.model import HubUnreachableError
from egspo.module import HybridRLModule
from egspo.update import NonFiniteLossError
from egspo.validation import check_machine, union_reason, validate_fit_config
from egspo.validation_sources import check_checkpoint

TRAINER_DEFAULTS = {
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    # Each phase is one epoch with its own loader (warm-up demonstrations, then RL prompts).
    "reload_dataloaders_every_n_epochs": 1,
}
CHECKPOINT_CALLBACK = "egspo.callbacks.IterationCheckpoint"
THREADS_CALLBACK = "egspo.callbacks.AdaptiveThreads"
SUBCOMMANDS = ("fit", "validate", "test")
# jsonargparse raises instead of printing its usage text and exiting: `main` makes the error one line.
PARSER_KWARGS = {"exit_on_error": False, **{name: {"exit_on_error": False} for name in SUBCOMMANDS}}
DEBUG_HINT = "(run with --debug or EGSPO_DEBUG=1 for the traceback)"


class EGSPOCLI(LightningCLI):
    """LightningCLI with the data's phases tied to the module's, checks before any model loads,
    an `IterationCheckpoint` unless the config names its own, `AdaptiveThreads` unless
    `OMP_NUM_THREADS` is set, and `--ckpt_path last` resolved."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test: `predict` needs a `forward` that returns predictions, which an
        RL module has no use for (Lightning's own CLI would offer it, then fail with a traceback)."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in SUBCOMMANDS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for phase in ("sft_iterations", "rl_iterations"):
            target = f"data.init_args.{phase}" if self.subclass_mode_data else f"data.{phase}"
            parser.link_arguments(f"model.{phase}", target)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, then reject what cannot work while it costs microseconds, before the seed is set
        and anything is built.

        `--ckpt_path` is checked here (memory-mapped) and handed to the trainer only in
        `before_instantiate_classes`: between the two, LightningCLI would `torch.load` the whole
        checkpoint, weights and optimizer state on every process, to read hyperparameters egspo
        never stores (the config and command line win; `egspo.resume.check_resume` rejects a
        checkpoint the run cannot continue from), and a junk file would fail there with a raw
        unpickling traceback.
        """
        # `run(args)` always passes its arguments, so Lightning's warning about `args` together with
        # a command line (`sys.argv`) would fire on every start: the parse is done here instead.
        self.config = (
            parser.parse_args(args) if not isinstance(args, (dict, Namespace)) else parser.parse_object(args)
        )
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        if subcommand in (None, "fit"):
            warnings: list[str] = []
            errors = validate_fit_config(config, warnings) + check_machine(config)
            if errors:
                _fail(*errors)
            for line in warnings:
                sys.stderr.write(f"warning: {line}\n")
            _set_phase_epochs(config)
            _add_checkpoint_callback(config)
            _add_threads_callback(config)
        self.ckpt_path: str | None = None
        if subcommand is not None and config.get("ckpt_path"):
            self.ckpt_path = str(_resolve_checkpoint(config))
            config.ckpt_path = None

    def before_instantiate_classes(self) -> None:
        if self.ckpt_path is not None:
            self.config[self.subcommand].ckpt_path = self.ckpt_path


def _set_phase_epochs(config: Namespace) -> None:
    """One epoch per phase (a `trainer.max_epochs` that says otherwise failed validation)."""
    config.trainer.max_epochs = sum(n > 0 for n in (config.model.sft_iterations, config.model.rl_iterations))


def _add_checkpoint_callback(config: Namespace) -> None:
    """A resumable `last.ckpt` for every run, unless checkpointing is off or a ModelCheckpoint is named."""
    callbacks = config.trainer.callbacks or []
    named = [str(c.get("class_path", "")) for c in callbacks if isinstance(c, (dict, Namespace))]
    if config.trainer.enable_checkpointing is False or any(n.endswith("Checkpoint") for n in named):
        return
    config.trainer.callbacks = [*callbacks, Namespace(class_path=CHECKPOINT_CALLBACK, init_args=Namespace())]


def _add_threads_callback(config: Namespace) -> None:
    """Torch's thread count fitted to the free cores (`egspo.threads`: on a busy machine, spinning
    OpenMP threads made the demo 2.4-3.1x slower), unless `OMP_NUM_THREADS` fixes the count or the
    config already names the callback."""
    callbacks = config.trainer.callbacks or []
    named = [str(c.get("class_path", "")) for c in callbacks if isinstance(c, (dict, Namespace))]
    if "OMP_NUM_THREADS" in os.environ or any(n.endswith("AdaptiveThreads") for n in named):
        return
    config.trainer.callbacks = [*callbacks, Namespace(class_path=THREADS_CALLBACK, init_args=Namespace())]


def _resolve_checkpoint(config: Namespace) -> Path:
    """`last` -> the run's `last.ckpt`; any path is checked to be a readable egspo checkpoint."""
    path = config.ckpt_path
    if path == "last":
        dirpath = None
        for callback in config.trainer.callbacks or []:
            if str(callback.get("class_path", "")).endswith("IterationCheckpoint"):
                dirpath = (callback.get("init_args") or {}).get("dirpath")
        root = config.trainer.default_root_dir or os.getcwd()
        path = Path(dirpath) / LAST if dirpath else IterationCheckpoint.default_dirpath(root) / LAST
        if not path.exists():
            _fail(f"--ckpt_path last: no checkpoint at {path}")
    problem = check_checkpoint(Path(path))
    if problem:
        _fail(f"--ckpt_path {path}: {problem}")
    return Path(path)


def _fail(*lines: str) -> None:
    sys.stderr.write("".join(f"error: {line}\n" for line in lines))
    raise SystemExit(2)


def run(args: list[str] | None = None, *, run: bool = True) -> EGSPOCLI:
    """The CLI on `args` (default: the command line); `run=False` builds model, data and trainer only
    (a leading subcommand is then dropped, so both forms take the same arguments).

    A bad option raises jsonargparse's `ArgumentError` (`main` prints it as one line)."""
    args = sys.argv[1:] if args is None else list(args)
    if not run and args[:1] and args[0] in SUBCOMMANDS:
        args = args[1:]
    return EGSPOCLI(
        HybridRLModule,
        HybridDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=PARSER_KWARGS,
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> EGSPOCLI | Path | None:
    """`python -m egspo`: the CLI, with user errors as one `error:` line and exit status 2 (a
    traceback would bury the one line that matters; `--debug` brings it back)."""
    args = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in args or os.environ.get("EGSPO_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        if args[:1] == ["export"]:  # not a Trainer entry point: handled before LightningCLI
            return export_main(args[1:])
        return run(args)
    except ArgumentError as error:
        if debug:
            raise
        sys.stderr.write(f"error: {clip(argument_error_line(str(error), args))}\n{DEBUG_HINT}\n")
        raise SystemExit(2) from None
    except (ValueError, OSError, RuntimeError, MisconfigurationException) as error:
        if debug or not _is_user_error(error):
            raise
        sys.stderr.write(f"error: {clip(_one_line(error))}\n{DEBUG_HINT}\n")
        raise SystemExit(2) from None


def _is_user_error(error: BaseException) -> bool:
    """Errors about inputs the user gave (options, files, data, model ids, the Trainer's
    options: Lightning's MisconfigurationException), not bugs."""
    return isinstance(
        error,
        (
            ValueError,
            DataError,
            HubUnreachableError,
            FileNotFoundError,
            NonFiniteLossError,
            MisconfigurationException,
        ),
    )


# One error line at most this long: some libraries put whole lists in a message (transformers
# names every model type it knows); the full text is one `--debug` away.
MAX_LINE = 400


def clip(line: str, limit: int = MAX_LINE) -> str:
    """`line` cut to `limit` characters, saying so."""
    return line if len(line) <= limit else line[: limit - 40].rstrip() + " ... (cut; --debug shows all)"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if text.startswith("Does not validate against any of the Union subtypes"):
        return union_reason(text)
    if isinstance(error, MisconfigurationException):
        return f"trainer: {text}"
    return text if text else type(error).__name__


# jsonargparse's messages nest one block per level of a typed option (a class's init_args, a union's
# alternatives), with the type tried, the value given and the reason at the innermost level.
_PARSER_KEY = re.compile(r'Parser key "([^"]+)":?')
_EXPECTED = re.compile(r"Expected an? (.+?)(?:\. Got value: (.*))?$")
_CLASS_PROBLEM = re.compile(r"Problem with given class_path '([^']+)':\s*(.*)$")
_BAD_SUBCOMMAND = re.compile(r"argument subcommand: invalid choice: '([^']*)'")
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_NOT_ACCEPTED_BY = re.compile(r"Subcommand '(\w+)' does not accept option '([^']+)'")
_GIVEN = re.compile(r"Given value: (.*?)(?:\. Got value: .*)?$")
_NESTED_VALUE = re.compile(r"NestedArg\(key='[^']*', val='(.*)'\)$")
_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Expected a path but",
    "Not a valid subclass of",
    "Subclass types expect one of",
    "a class path (str)",
    "a dict with",
    "a dict without",
)


def argument_error_line(message: str, args: list[str]) -> str:
    """jsonargparse's (often many-line) message as `option=value: why`, from the reasons it
    gives at the innermost level; a YAML syntax error names the `--config` file and line."""
    if message.startswith("Problems parsing config"):
        return _config_file_problem(args) or " ".join(message.split())
    if match := _BAD_SUBCOMMAND.match(message):
        return f"{match[1]}: no such subcommand (choose from {', '.join([*SUBCOMMANDS, 'export'])})"
    if message.startswith("unrecognized arguments: "):
        return f"{message.removeprefix('unrecognized arguments: ')}: no such option (see --help)"
    if match := _NOT_ACCEPTED_BY.match(message):
        return f"{match[2]}: no such option of `{match[1]}` (from a --config file)"
    keys = _PARSER_KEY.findall(message)
    if not keys:
        return " ".join(message.split())
    option = ".".join(keys) if keys != ["config"] else "--config"
    value, class_path, reasons = None, None, []
    expected: list[tuple[int, str]] = []  # (depth, type): only the innermost alternatives are kept
    for raw in message.splitlines():
        depth = len(raw) - len(raw.lstrip())
        line = raw.strip().removeprefix("- ").strip()
        if line.startswith("Type ") and "Parser key" in line:  # "Type <callable> expects ...: Parser key"
            continue
        line = _PARSER_KEY.sub("", line).strip()
        if not line or line.startswith(_NOISE):
            continue
        if match := _NOT_ACCEPTED.search(line):
            owner = f" of {class_path}" if class_path else ""
            return f"{option}.{match[1]}: no such option{owner}"
        if match := _CLASS_PROBLEM.match(line):
            class_path = match[1]
            if match[2]:
                reasons.append(match[2])
        elif line.startswith("Expected a dot import path string"):
            expected.append((depth, "a class path"))
        elif match := _EXPECTED.match(line):
            if match[2] is not None and value is None:
                value = match[2]
            expected.append((depth, _type_name(match[1])))
        elif match := _GIVEN.match(line):
            nested = _NESTED_VALUE.match(match[1])
            value = value if value is not None else (nested[1] if nested else match[1])
        else:
            reasons.append(line)
    if class_path and reasons:
        return f"{option}: cannot use class_path {class_path}: {reasons[0]}"
    named = option if value is None else f"{option}={value}"
    if expected:
        deepest = max(depth for depth, _ in expected)
        return f"{named}: expected {_alternatives([t for d, t in expected if d == deepest])}"
    return f"{named}: {'; '.join(reasons)}" if reasons else " ".join(message.split())


def _type_name(text: str) -> str:
    """`<class 'int'>` -> int, `<class 'NoneType'>` -> null, `typing.Literal['a', 'b']` -> `['a', 'b']`."""
    if text.startswith("typing.Literal[") and text.endswith("]"):
        return text.removeprefix("typing.Literal")
    match = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>", text)
    if match:
        return "null" if match[1] == "NoneType" else match[1]
    return text


def _alternatives(types: list[str]) -> str:
    """`int or null`; the values of every Literal alternative joined into one `one of ...`."""
    values = [t[1:-1] for t in types if t.startswith("[")]
    others = [t for t in dict.fromkeys(types) if not t.startswith("[")]
    return " or ".join(([f"one of {', '.join(values)}"] if values else []) + others)


def _config_file_problem(args: list[str]) -> str | None:
    """`file:line:column: problem` of the first `--config` file that is not valid YAML."""
    files = [b for a, b in itertools.pairwise(args) if a in ("--config", "-c")]
    files += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for name in files:
        try:
            yaml.safe_load(Path(name).read_text())
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark
            where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
            return f"{where}: invalid YAML: {error.problem}"
        except (OSError, yaml.YAMLError):
            continue
    return None
