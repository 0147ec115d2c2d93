"""FSDP2 for the toolkit's models: ``fully_shard`` per transformer block, then the root.

Every trainable parameter becomes a DTensor sharded on dim 0 over the default process group; the
optimizers of ``ft_focal.optim`` do their math on the local shards with explicit all-reduces of
the squared norms (ft_focal/optim/_sharding.py, docs/design.md "Sharded training"). Initialise
the head (text / class means) BEFORE sharding: afterwards each rank holds only its rows.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

# names of the ModuleList that holds a ViT's blocks in the backbones this toolkit builds
# (open_clip resblocks, transformers encoder.layer(s), timm blocks)
BLOCK_LIST_NAMES = ("resblocks", "layers", "layer", "blocks")


def transformer_blocks(model: nn.Module) -> list:
    """The transformer blocks of ``model``: every child of the ModuleLists named as in
    ``BLOCK_LIST_NAMES`` whose children are all of one class (open_clip's text tower is
    dropped at build time, so only the vision tower's blocks are found)."""
    blocks = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or name.rsplit(".", 1)[-1] not in BLOCK_LIST_NAMES:
            continue
        kids = list(module)
        if kids and len({type(k) for k in kids}) == 1:
            blocks.extend(kids)
    return blocks


def mixed_precision_policy(name: str):
    """FSDP2 policy of ``train.mixed_precision``: "bf16" = bf16 parameters in forward / backward,
    fp32 gradient reduction (and fp32 sharded master weights); "no" = None (everything in the
    parameters' dtype). fp16 is refused: FSDP2 would need a sharded grad scaler."""
    if name in (None, "no"):
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if name == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    raise ValueError(f"mixed_precision={name!r} is not supported under FSDP2 (use bf16 or no)")


def checkpoint_blocks(model: nn.Module) -> int:
    """Activation checkpointing of every transformer block (``train.activation_checkpointing``): a
    block keeps only its input and recomputes its activations in backward (same values; one more
    block forward per backward). The forward is replaced on the instance, so parameter names
    (checkpoints, final/) do not change. Returns the number of blocks."""
    from torch.utils.checkpoint import checkpoint

    blocks = transformer_blocks(model)
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return len(blocks)


def shard_model(model: nn.Module, reshard_after_forward: bool = True, mp_policy=None,
                blocks: Optional[list] = None) -> nn.Module:
    """Apply ``fully_shard`` to every transformer block, then to the root (in place; returns the
    model). Needs ``torch.distributed`` initialised; parameters must already hold their initial
    values. ``blocks`` overrides the automatic block search."""
    from torch.distributed.fsdp import fully_shard

    blocks = transformer_blocks(model) if blocks is None else blocks
    kw = {"reshard_after_forward": bool(reshard_after_forward)}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    if _stray_parameters(model):
        raise ValueError("FSDP2 cannot shard this model: peft's LoRA on nn.MultiheadAttention hands out a new "
                         "in_proj_weight object on every access; set tuning.lora_targets to [c_fc, c_proj] "
                         "(the MLP) or train without train.fsdp")
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    logger.info("FSDP2: %d transformer blocks and the root sharded (reshard_after_forward=%s)",
                len(blocks), reshard_after_forward)
    return model


def _stray_parameters(model: nn.Module) -> set:
    """Parameters ``named_parameters`` yields that sit in no module's ``_parameters`` under the same
    identity (peft's LoRA on nn.MultiheadAttention): FSDP2 cannot swap those for gathered copies."""
    registered = [p for m in model.modules() for p in m._parameters.values() if p is not None]
    ids = {id(p) for p in registered}   # the list keeps them alive: no id is reused meanwhile
    return {p for _, p in model.named_parameters() if id(p) not in ids}


def assert_sharded(model: nn.Module) -> int:
    """Raise AssertionError unless every trainable parameter is a DTensor; returns their number."""
    from torch.distributed.tensor import DTensor

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    plain = [n for n, p in trainable if not isinstance(p, DTensor)]
    if plain or not trainable:
        raise AssertionError(f"parameters not sharded by FSDP2: {plain[:3] or 'no trainable parameters'}")
    return len(trainable)


def full_state_dict(model: nn.Module) -> dict:
    """Every parameter and buffer as a full tensor (a collective: call it on every rank)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            for k, v in model.state_dict().items()}
