"""`python -m egspo fit|validate|test --config ...`: Lightning's CLI around the module and data.

`python -m egspo export CKPT --out DIR` writes a merged Hugging Face model (`egspo.export`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from egspo.callbacks.checkpointing import IterationCheckpoint
from egspo.data import HybridDataModule
from egspo.module import HybridRLModule
from egspo.validation import validate_fit_config

TRAINER_DEFAULTS = {
    "max_epochs": 1,  # the train loader yields exactly one batch per iteration
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    # Held-out evaluation during `fit` is the module's own (`eval_every_n_iterations`, and at
    # the end of each phase); Lightning's validation loop serves `validate` and `test`.
    "check_val_every_n_epoch": 2,
}


class EGSPOCLI(LightningCLI):
    """LightningCLI with the data's iteration count tied to the module's phases."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments(
            ("model.sft_iterations", "model.rl_iterations"),
            "data.init_args.num_iterations" if self.subclass_mode_data else "data.num_iterations",
            compute_fn=lambda sft, rl: sft + rl,
        )

    def before_instantiate_classes(self) -> None:
        """Reject configs that cannot work before the tokenizer and model are loaded."""
        if self.subcommand not in (None, "fit"):
            return
        errors = validate_fit_config(self.config[self.subcommand] if self.subcommand else self.config)
        if errors:
            sys.stderr.write("".join(f"error: {e}\n" for e in errors))
            raise SystemExit(2)

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        # Lightning's default checkpoint callback counts optimizer steps and, with the fit-time
        # validation loop off, never saves; a run without its own gets resumable `last.ckpt`s.
        configured = [*(config.get("callbacks") or []), *callbacks]
        if config.get("enable_checkpointing") is not False and not any(
            isinstance(c, ModelCheckpoint) for c in configured
        ):
            callbacks = [*callbacks, IterationCheckpoint()]
        return super()._instantiate_trainer(config, callbacks)


def main(args: list[str] | None = None) -> EGSPOCLI | Path:
    args = args if args is not None else sys.argv[1:]
    if args[:1] == ["export"]:  # not a Trainer entry point: handled before LightningCLI
        from egspo.export import main as export_main

        return export_main(args[1:])
    return EGSPOCLI(
        HybridRLModule,
        HybridDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
