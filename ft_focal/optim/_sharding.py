"""FSDP2 parameters (``torch.distributed.fsdp.fully_shard``: every parameter a DTensor sharded on dim 0).

The optimizers do their math on each rank's LOCAL shard (``to_local()``: a view of the shard's
storage, so an in-place perturbation or restore changes the parameter itself) and get every global
quantity from an explicit all-reduce: a global L2 norm is ``sqrt(all_reduce(sum of local squares))``
over the mesh's process group (docs/design.md, "Sharded training"). FSDP2 already averages every
backward's gradient over ranks (reduce-scatter), so a local gradient shard is the shard of the
global-batch gradient; the base optimizer gets it back as a DTensor (its state stays sharded and
torch.distributed.checkpoint saves it per rank).
"""
from __future__ import annotations

import torch

try:   # torch >= 2.5
    from torch.distributed.tensor import DTensor, Shard
except ImportError:   # pragma: no cover - older torch: nothing is ever sharded
    DTensor, Shard = (), ()


def is_sharded(t) -> bool:
    return bool(DTensor) and isinstance(t, DTensor)


def shard_group(params: list):
    """The process group the parameters are sharded over, or None when none is a DTensor.

    Raises ValueError (one line) for a mix of DTensor and plain trainable parameters (their norms
    would be counted once per rank) and for meshes other than one dimension of ``Shard`` (HSDP
    would need the squares summed over the shard dimension only)."""
    flags = [is_sharded(p) for p in params]
    if not any(flags):
        return None
    if not all(flags):
        raise ValueError("some trainable parameters are FSDP2 DTensors and some are not: apply fully_shard to "
                         "the root module as well, so that every trainable parameter is sharded")
    mesh = params[0].device_mesh
    for p in params:
        if p.device_mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in p.placements):
            raise ValueError("FSDP2 parameters must be sharded on a 1-D mesh (fully_shard without HSDP); got "
                             f"placements {p.placements} on a {p.device_mesh.ndim}-D mesh")
        if p.device_mesh != mesh:
            raise ValueError("the trainable parameters are sharded over different device meshes")
    return mesh.get_group()


def local_weights(params: list) -> list:
    """Detached views of the weights this rank holds (the whole tensor when not sharded)."""
    return [p.detach().to_local() if is_sharded(p) else p.detach() for p in params]


def local_grad(g: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a gradient (the gradient itself when not sharded)."""
    return g.to_local() if is_sharded(g) else g


def as_param_grad(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A local gradient shard back in the parameter's form (a DTensor laid out like ``p``)."""
    if not is_sharded(p) or is_sharded(g):
        return g
    return DTensor.from_local(g, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
