"""Rollout engines on an FSDP2-sharded policy in two CPU processes: lock-step decoding, unchanged output.

Under FSDP2 every forward pass all-gathers the weights, a collective. Each rank here gets prompts
whose greedy samples stop at different steps (rank 0's early, rank 1's at the length limit): a
rank that stopped calling the model when its own rows finished would leave the other waiting in
its next all-gather. The engines must keep the ranks in step until all are done, and each rank's
tokens must equal those of an unsharded run of the same model on the same prompts.
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

from egspo.rollout import HFGenerateEngine, SamplingParams, SharedPrefillEngine

pytestmark = pytest.mark.distributed

WORLD = 2
VOCAB = 96
MAX_NEW = 12
TIMEOUT_S = 180  # a hang shows as a timeout, not a stuck test run
ENGINES = {
    "shared": lambda: SharedPrefillEngine(),
    "shared_sync3": lambda: SharedPrefillEngine(compact_threshold=0.5, sync_every=3),
    "hf": lambda: HFGenerateEngine(),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_qwen2(vocab_size=VOCAB))).float()


def _prompts(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of 3 to 7 tokens (ids >= 2: 0 pads)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 7, 5])
    ids = torch.randint(2, VOCAB, (3, 7), generator=g)
    mask = (torch.arange(7)[None] >= 7 - lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def _uneven_case(model: torch.nn.Module) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], SamplingParams]:
    """Prompts per rank and a stop token with which rank 0's rows all stop by step 3, rank 1's never.

    Chosen from unsharded greedy runs: the stop tokens are the first two tokens of rank 0's rows
    minus any token that appears in rank 1's outputs; a few prompt seeds are tried.
    """
    free = SamplingParams(max_new_tokens=MAX_NEW, greedy=True)
    for seed in range(50):
        early, late = _prompts(2 * seed), _prompts(2 * seed + 1)
        early_out = HFGenerateEngine().generate(model, *early, free).completion_ids
        late_tokens = set(HFGenerateEngine().generate(model, *late, free).completion_ids.flatten().tolist())
        stops = {t for t in early_out[:, :2].flatten().tolist() if t not in late_tokens}
        if stops and all(any(t in stops for t in row[:2].tolist()) for row in early_out):
            params = SamplingParams(max_new_tokens=MAX_NEW, greedy=True, stop_token_ids=tuple(sorted(stops)))
            return [early, late], params
    raise AssertionError("no prompt seed gives uneven stops: change VOCAB or the prompt lengths")


def _rank_main(
    rank: int, port: int, state_path: str, prompts: list, params: SamplingParams, out_dir: str
) -> None:
    """One rank: shard the policy as egspo does under ModelParallelStrategy, sample, save the tokens."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from egspo.distributed import FSDPConfig, is_sharded, shard_policy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        model = _model()
        model.load_state_dict(torch.load(state_path))
        shard_policy(model, init_device_mesh("cpu", (WORLD,)), FSDPConfig())
        assert is_sharded(model)
        ids, mask = prompts[rank]
        out = {name: make().generate(model, ids, mask, params).input_ids for name, make in ENGINES.items()}
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sharded_ranks_decode_in_lockstep_and_match_unsharded_greedy(tmp_path):
    model = _model().eval()
    prompts, params = _uneven_case(model)
    expected = [HFGenerateEngine().generate(model, ids, mask, params) for ids, mask in prompts]
    lengths = [int(r.completion_mask.sum(1).max()) for r in expected]
    assert lengths[0] <= 3 < lengths[1] == MAX_NEW, (
        f"want rank 0 to stop early, rank 1 at the limit: {lengths}"
    )
    torch.save(model.state_dict(), tmp_path / "state.pt")
    run_ranks(
        _rank_main,
        (free_port(), str(tmp_path / "state.pt"), prompts, params, str(tmp_path)),
        WORLD,
        TIMEOUT_S,
    )

    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, input_ids in got.items():
            assert torch.equal(input_ids, expected[rank].input_ids), f"rank {rank}, engine {name}"
