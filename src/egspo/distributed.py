"""Several processes: FSDP2 sharding of the policy, and gathering tensors of uneven size.

Sharding is applied in `HybridRLModule.configure_model` when Lightning's `ModelParallelStrategy`
has built a device mesh: every decoder layer becomes its own FSDP2 unit, and the causal LM
itself is the root unit that holds the embeddings, the final norm and the lm_head. The root
gathers its parameters in its forward pre-hook and, being the root, keeps them gathered until
backward, so scoring reads the lm_head weight inside the root's forward (`egspo.scoring`).

With Lightning's `FSDPStrategy` (FSDP1) the strategy wraps the model itself; no device mesh is
set then, and nothing is sharded here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from egspo.hf_names import DTYPES, unwrap_causal_lm


@dataclass
class FSDPConfig:
    """FSDP2 options, used under `ModelParallelStrategy`.

    Args:
        param_dtype: dtype of the gathered parameters in forward and backward (e.g. "bfloat16"
            for bf16 compute over float32 shards); None keeps the parameters' own dtype.
        reduce_dtype: dtype of the gradient reduce-scatter; None follows `param_dtype`.
        reshard_after_forward: free each decoder layer's gathered weights after its forward
            (ZeRO-3; gathered again in backward); False keeps them (ZeRO-2: faster, more memory).
        cpu_offload: keep parameter shards, gradients and optimizer state in CPU memory.
    """

    param_dtype: str | None = None
    reduce_dtype: str | None = "float32"
    reshard_after_forward: bool = True
    cpu_offload: bool = False

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"fsdp.{name}: {value!r} is not one of {sorted(DTYPES)}")


# Lightning runs training_step inside the FSDP1 root's forward, where the update's several backward
# passes are not allowed (Lightning issues #19626, #19685); FSDP2 has no such wrapper.
FSDP1_REFUSAL = (
    "FSDPStrategy (FSDP1) cannot run egspo's update; use "
    "lightning.pytorch.strategies.ModelParallelStrategy (FSDP2), see configs/fsdp_multinode.yaml"
)


def is_sharded(model: torch.nn.Module) -> bool:
    """True when an FSDP2 unit sits anywhere in `model`."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def sharding_mesh(mesh):
    """The mesh FSDP2 shards over, from Lightning's `(data_parallel, tensor_parallel)` mesh.

    egspo does no tensor parallelism: a dimension of size 1 is dropped, and when both have
    more than one process the 2-D mesh is used as is, which FSDP2 reads as hybrid sharding
    (replicated over `data_parallel`, by default the nodes; sharded over `tensor_parallel`,
    by default the devices of a node).
    """
    if mesh.ndim == 1:
        return mesh
    names = mesh.mesh_dim_names
    sizes = dict(zip(names, mesh.shape, strict=True))
    if sizes[names[1]] == 1:
        return mesh[names[0]]
    if sizes[names[0]] == 1:
        return mesh[names[1]]
    return mesh


def shard_policy(policy: torch.nn.Module, mesh, config: FSDPConfig) -> None:
    """Apply `fully_shard` to each decoder layer and to the causal LM (the root), in place.

    The root is the `transformers` model under any peft wrapper, so that both `forward` and
    `generate` (which calls the model, not the peft wrapper) go through its hooks. A policy
    that is already sharded is left alone.
    """
    if is_sharded(policy):
        return
    causal_lm = unwrap_causal_lm(policy)
    mp_policy = MixedPrecisionPolicy(
        param_dtype=DTYPES.get(config.param_dtype), reduce_dtype=DTYPES.get(config.reduce_dtype)
    )
    offload = CPUOffloadPolicy() if config.cpu_offload else OffloadPolicy()
    mesh = sharding_mesh(mesh)
    for layer in decoder_layers(causal_lm):
        fully_shard(
            layer,
            mesh=mesh,
            reshard_after_forward=config.reshard_after_forward,
            mp_policy=mp_policy,
            offload_policy=offload,
        )
    # The root's reshard_after_forward stays at its default: the root keeps its parameters
    # gathered from forward to backward, which scoring relies on (it uses the lm_head weight).
    fully_shard(causal_lm, mesh=mesh, mp_policy=mp_policy, offload_policy=offload)


def decoder_layers(causal_lm: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of transformer blocks of a `transformers` causal LM."""
    decoder = causal_lm.get_decoder()
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise TypeError(
        f"{type(causal_lm).__name__}: cannot find its decoder layers (looked for `layers`, `h`, "
        "`blocks` on the decoder) to shard them"
    )


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """Unsharded CPU copies of all weights, on every rank (a collective when sharded)."""
    if not is_sharded(model):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def gather_variable(values: Tensor) -> Tensor:
    """Concatenate 1-D tensors of different lengths from all ranks, in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    world = dist.get_world_size()
    count = torch.tensor([values.numel()], device=values.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    width = int(max(c.item() for c in counts))
    padded = values.new_zeros(width)
    padded[: values.numel()] = values
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts, strict=True)])


def all_ranks_agree(flag: bool) -> bool:
    """True only when `flag` is True on every process (a collective when distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def any_rank(flag: bool) -> bool:
    """True when `flag` is True on at least one process (a collective when distributed)."""
    return not all_ranks_agree(not flag)


def gather_objects(obj: object) -> list:
    """`obj` of every rank, in rank order (a collective when distributed; `[obj]` otherwise)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
