"""`python -m egspo fit|validate|test --config ...`: Lightning's CLI around the module and data.

`python -m egspo export CKPT --out DIR` writes a merged Hugging Face model (`egspo.export`).
Scripts and tests build the same CLI with `egspo.cli.run(args)`.

User errors (bad options, data, model paths, checkpoints) end the run with one line naming the
option, file or line, before any model loads; `--debug` (or `EGSPO_DEBUG=1`) shows tracebacks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from egspo.callbacks.checkpointing import LAST, IterationCheckpoint
from egspo.data import HybridDataModule
from egspo.module import HybridRLModule
from egspo.validation import check_checkpoint, validate_fit_config

TRAINER_DEFAULTS = {
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    # Each phase is one epoch with its own loader (warm-up demonstrations, then RL prompts).
    "reload_dataloaders_every_n_epochs": 1,
}
CHECKPOINT_CALLBACK = "egspo.callbacks.IterationCheckpoint"


class EGSPOCLI(LightningCLI):
    """LightningCLI with the data's phases tied to the module's, checks before any model loads,
    an `IterationCheckpoint` unless the config names its own, and `--ckpt_path last` resolved."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for phase in ("sft_iterations", "rl_iterations"):
            target = f"data.init_args.{phase}" if self.subclass_mode_data else f"data.{phase}"
            parser.link_arguments(f"model.{phase}", target)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # `run(args)` always passes its arguments; the process's own command line is not for the CLI.
        self.config = (
            parser.parse_args(args) if not isinstance(args, (dict, Namespace)) else parser.parse_object(args)
        )

    def before_instantiate_classes(self) -> None:
        """Reject configs that cannot work before the tokenizer and model are loaded."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand in (None, "fit"):
            errors = validate_fit_config(config)
            if errors:
                _fail(*errors)
            _set_phase_epochs(config)
            _add_checkpoint_callback(config)
        if self.subcommand is not None and config.get("ckpt_path"):
            config.ckpt_path = str(_resolve_checkpoint(config))


def _set_phase_epochs(config: Namespace) -> None:
    phases = sum(n > 0 for n in (config.model.sft_iterations, config.model.rl_iterations))
    if config.trainer.max_epochs is None:
        config.trainer.max_epochs = phases
    elif config.trainer.max_epochs != phases:
        _fail(
            f"trainer.max_epochs={config.trainer.max_epochs}: each phase is one epoch, so this run "
            f"has {phases}; leave it unset"
        )


def _add_checkpoint_callback(config: Namespace) -> None:
    """A resumable `last.ckpt` for every run, unless checkpointing is off or a ModelCheckpoint is named."""
    callbacks = config.trainer.callbacks or []
    named = [str(c.get("class_path", "")) for c in callbacks if isinstance(c, (dict, Namespace))]
    if config.trainer.enable_checkpointing is False or any(n.endswith("Checkpoint") for n in named):
        return
    config.trainer.callbacks = [*callbacks, Namespace(class_path=CHECKPOINT_CALLBACK, init_args=Namespace())]


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
    (a leading subcommand is then dropped, so both forms take the same arguments)."""
    args = sys.argv[1:] if args is None else list(args)
    if not run and args[:1] and args[0] in ("fit", "validate", "test"):
        args = args[1:]
    return EGSPOCLI(
        HybridRLModule,
        HybridDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> EGSPOCLI | Path | None:
    args = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in args or os.environ.get("EGSPO_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        if args[:1] == ["export"]:  # not a Trainer entry point: handled before LightningCLI
            from egspo.export import main as export_main

            return export_main(args[1:])
        return run(args)
    except (ValueError, OSError, RuntimeError) as error:
        if debug or not _is_user_error(error):
            raise
        sys.stderr.write(
            f"error: {_one_line(error)}\n(run with --debug or EGSPO_DEBUG=1 for the traceback)\n"
        )
        raise SystemExit(2) from None


def _is_user_error(error: BaseException) -> bool:
    """Errors about inputs the user gave (options, files, data, model ids), not bugs."""
    from egspo.data.records import DataError
    from egspo.model import HubUnreachableError
    from egspo.update import NonFiniteLossError

    return isinstance(
        error, (ValueError, DataError, HubUnreachableError, FileNotFoundError, NonFiniteLossError)
    )


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if text else type(error).__name__
