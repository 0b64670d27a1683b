"""LoRA adapters in PEFT format beside each checkpoint and at the end of training."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from egspo.callbacks.run_dir import run_dir
from egspo.distributed import full_state_dict, is_sharded


class AdapterExport(Callback):
    """Writes the policy's adapters to `<run_dir>/adapters/iteration=N/` whenever a checkpoint
    is saved, and to `<run_dir>/adapters/final/` when training ends.

    Each folder is what `peft` writes with `save_pretrained` (`adapter_config.json`,
    `adapter_model.safetensors`), loadable on top of the base model with
    `PeftModel.from_pretrained(base, folder)`, a few megabytes instead of a full checkpoint.
    `run_dir` is the logger's folder (`trainer.log_dir`), else `trainer.default_root_dir`.
    Under FSDP2 the adapters are gathered from all ranks first; rank 0 writes.
    """

    def __init__(self, save_final: bool = True) -> None:
        self.save_final = save_final
        self._saved_iteration: int | None = None
        self._warned = False

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        iteration = int(pl_module.iteration)
        if self._saved_iteration == iteration:  # several checkpoint files of one iteration
            return
        self._saved_iteration = iteration
        self.save(trainer, pl_module, f"iteration={iteration}")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_final:
            self.save(trainer, pl_module, "final")

    def save(self, trainer: Trainer, pl_module: LightningModule, name: str) -> Path | None:
        """Write the adapters to `<run_dir>/adapters/<name>/`; None when the policy has none."""
        policy = pl_module.policy
        if policy is None or not hasattr(policy, "peft_config"):
            if not self._warned:
                rank_zero_warn(
                    "AdapterExport: the policy has no LoRA adapters (`policy.lora`); nothing saved"
                )
                self._warned = True
            return None
        state = full_state_dict(policy) if is_sharded(policy) else None  # a collective: every rank
        path = run_dir(trainer) / "adapters" / name
        if trainer.is_global_zero:
            policy.save_pretrained(path, state_dict=state)
        trainer.strategy.barrier("adapter_export")
        return path
