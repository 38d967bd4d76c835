"""Probing inside ``torch.distributed``: every rank's statistics merged exactly into one report.

How it works. Each rank probes its own shard of the batch exactly as a single process would (the
probe unwraps ``DistributedDataParallel`` and runs the inner module, so no collective runs during
the passes). At the end :func:`merge_across_ranks` gathers every rank's :class:`Report` (one
``all_gather_object``; the per-unit moments travel as float64 arrays) and folds them in rank order
with Chan's formula (:meth:`Report.merge`): counts add, means and M2 merge exactly, extremes take the
max/min, zero counts and per-parameter gradient sums add. Every rank returns the same merged report,
so the diagnosis that follows gives the same verdict everywhere; print or save it on rank 0.

What the merged report equals:

* Activation statistics: those of one process on the concatenated batch (up to float64 rounding),
  for any model whose samples do not interact. BatchNorm in train mode normalises each rank's
  shard with that shard's statistics (as DDP training does), so its outputs, and everything after,
  differ from a single process on the whole batch; use ``mode="eval"`` or a model without batch
  statistics when you need that equality.
* Gradients with respect to module outputs: the same, for a per-sample loss. The default ``"randn"``
  cotangent (and ``"mse"``/``"ce"`` targets) is drawn from the probe's seed on every rank, so each
  rank's samples get the same random pattern; the statistics are the same in distribution, not
  bitwise those of one process drawing for the whole batch.
* Parameter gradients: each rank's gradient comes from its own shard, so ``grad_rms`` is the
  average over the ranks' batches, as for a single-process probe over the list of per-rank batches.

FSDP2 (``torch.distributed.fsdp.fully_shard``): outside forward the parameters are ``DTensor``
shards. The probe then works on the model as built (``init="keep"``; any other initializer raises
:class:`~gradprobe.errors.UsageError`, since FSDP2 gathers its own shards and would ignore new
parameters); parameter statistics are summed over the shards (one small ``all_reduce`` each);
activation and output-gradient statistics are recorded as usual. Not available on sharded models:
parameter-gradient norms (the sharded parameters are not in the autograd graph of
``torch.autograd.grad``), the symmetry analysis and the gate check (both need whole weight
matrices and a private copy of them).

Run the example on 2 CPU processes (gloo) with::

    torchrun --nproc_per_node=2 -m gradprobe.distributed --wrap ddp
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradprobe.errors import UsageError
from gradprobe.report import Report

__all__ = [
    "merge_across_ranks",
    "is_distributed",
    "any_rank",
    "is_sharded",
    "sharded_parameters",
    "check_supported",
    "shard_groups",
]


def is_distributed() -> bool:
    """True inside an initialised ``torch.distributed`` process group with more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def merge_across_ranks(report: Report, group: Any = None) -> Report:
    """Merge every rank's report exactly (Chan) and return the merged report on every rank.

    Outside ``torch.distributed`` (or with one rank) the report is returned unchanged. Run
    metadata comes from rank 0, with ``batch_size``, ``batches`` and ``samples`` summed and
    ``world_size`` added; per-layer analysis in ``layer.extra`` (symmetry, gate check) is rank 0's.
    A collective: every rank of ``group`` must call it.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return report
    world = dist.get_world_size(group)
    if world == 1:
        return report
    gathered: list[Report | None] = [None] * world
    dist.all_gather_object(gathered, report, group=group)
    reports = [r for r in gathered if r is not None]
    if len(reports) != world:  # pragma: no cover - all_gather_object fills every slot
        raise RuntimeError("all_gather_object returned fewer reports than ranks")
    names = [layer.name for layer in reports[0].layers]
    for rank, other in enumerate(reports[1:], start=1):
        if [layer.name for layer in other.layers] != names:
            raise UsageError(
                f"rank {rank} recorded different layers than rank 0",
                hint="probe the same model with the same include/exclude options on every rank",
            )
    merged = reports[0]
    for other in reports[1:]:
        merged = merged.merge(other)
    merged.meta["world_size"] = world
    return merged


def any_rank(flag: bool, group: Any = None) -> bool:
    """``flag`` OR-ed over the ranks (one tiny all_reduce), so data-dependent extra passes (the exact
    non-finite re-run) happen on every rank or on none: under FSDP2 every forward is a collective.
    Outside ``torch.distributed`` it is ``flag``."""
    if not is_distributed():
        return flag
    dist = torch.distributed
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def _dtensor_type() -> type | None:
    """``DTensor``, if anything in this process could have made one: a DTensor exists only once
    ``torch.distributed.tensor`` was imported, and importing it here would cost every first probe ~1 s
    (it pulls in sympy)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_sharded(t: Any) -> bool:
    """True for a ``DTensor`` (FSDP2/tensor-parallel parameter)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def sharded_parameters(model: nn.Module) -> list[str]:
    """Names of the model's parameters that are ``DTensor`` shards (FSDP2, tensor parallel)."""
    return [name for name, p in model.named_parameters() if is_sharded(p)]


def check_supported(model: nn.Module, *, keep: bool) -> bool:
    """Raise :class:`UsageError` for what the probe cannot do on a sharded model; return whether the
    model has sharded parameters."""
    names = sharded_parameters(model)
    if names and not keep:
        raise UsageError(
            f"the model has DTensor-sharded parameters (FSDP2 / tensor parallel), e.g. `{names[0]}`; "
            "it can only be probed as built",
            hint="use init='keep' (and no device=), or probe the unsharded model before fully_shard()",
        )
    return bool(names)


def shard_groups(t: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
    """The local shard of a ``DTensor`` and the process groups over which its sums must be added.

    For a plain tensor: the tensor itself and no group. Mesh dimensions with a ``Shard`` placement
    hold disjoint pieces (their sums add); ``Replicate`` dimensions hold copies (nothing to add). A
    ``Partial`` placement (pending sum) is materialised first.
    """
    if not is_sharded(t):
        return t, []
    placements = t.placements  # type: ignore[attr-defined]
    if any(p.is_partial() for p in placements):
        from torch.distributed.tensor import Replicate

        t = t.redistribute(placements=[Replicate() if p.is_partial() else p for p in placements])  # type: ignore[attr-defined]
        placements = t.placements  # type: ignore[attr-defined]
    mesh = t.device_mesh  # type: ignore[attr-defined]
    groups = [mesh.get_group(dim) for dim, p in enumerate(placements) if p.is_shard()]
    return t.to_local(), groups  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# `torchrun --nproc_per_node=N -m gradprobe.distributed`: a worked example
# --------------------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node=2 -m gradprobe.distributed",
        description="Probe a reference model on every rank (each rank gets its shard of one batch) "
        "and report the exactly merged statistics on rank 0.",
    )
    parser.add_argument("--model", default="mlp", help="a gradprobe.zoo catalog name (default: mlp)")
    parser.add_argument("--batch", type=int, default=64, help="global batch, split over the ranks")
    parser.add_argument("--wrap", choices=("none", "ddp", "fsdp2"), default="ddp", help="how to wrap the model")
    parser.add_argument("--init", default="keep", help="initializer (only 'keep' with --wrap fsdp2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="rank 0 writes the merged report here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m gradprobe.distributed`` under torchrun (RANK, WORLD_SIZE set)."""
    args = _parse(argv)
    from gradprobe import zoo
    from gradprobe.probing import probe

    dist = torch.distributed
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        model, inputs = zoo.example(args.model, batch=args.batch, seed=args.seed)  # same weights everywhere
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        model = model.to(device)
        per_rank = math.ceil(args.batch / world)

        def shard(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == args.batch:
                return t[rank * per_rank : (rank + 1) * per_rank].to(device)
            if isinstance(t, dict):
                return {k: shard(v) for k, v in t.items()}
            if isinstance(t, tuple):
                return tuple(shard(v) for v in t)
            return t

        local = shard(inputs)
        if args.wrap == "ddp":
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        elif args.wrap == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (world,))
            for module in model.modules():
                if module is not model and any(p.dim() >= 2 for p in module.parameters(recurse=False)):
                    fully_shard(module, mesh=mesh)
            fully_shard(model, mesh=mesh)
        report = probe(model, local, init=args.init, seed=args.seed)
        if rank == 0:
            from rich.console import Console

            from gradprobe.render.console import render_report

            Console().print(render_report(report))
            print(
                f"merged over {report.meta.get('world_size', 1)} ranks: "
                f"{report.meta['samples']} samples, verdict {report.verdict}"
            )
            if args.json:
                report.to_json(args.json)
        return 0 if report.verdict == "stable" else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover - exercised through torchrun in tests
    sys.exit(main())
