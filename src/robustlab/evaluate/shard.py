"""Sharding an evaluation over the processes of a ``torchrun`` job.

An evaluation is a sequence of stages (one attack at one eps); a stage attacks a list
of points fixed when it starts, in batches of ``batch_size`` whose composition and seed
depend only on the list and the batch's position in it. Sharding hands whole batches to
processes round-robin (batch k to rank k mod world size), so every batch is computed
exactly as a single process computes it, and after each stage the processes exchange
which points their batches broke: every process then holds the same per-point state,
and the report is the single-process one (only the timings differ).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

from robustlab.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's share of an evaluation: rank ``rank`` of ``world`` (0 of 1 alone)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls, distributed: bool) -> Shard:
        """The default process group's shard when ``distributed``, else the whole job."""
        if not distributed:
            return cls()
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError(
                "distributed=True needs torch.distributed's default process group: launch "
                "with torchrun and call torch.distributed.init_process_group() first "
                "(`torchrun ... -m robustlab eval RUN` does both)"
            )
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, k: int) -> bool:
        """Whether batch ``k`` (position in a stage) is this process's."""
        return k % self.world == self.rank

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (a collective: every process calls it)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` computed on rank 0 and handed to every process; an error raised there
        is raised on every process (instead of leaving the others waiting forever)."""
        if self.world == 1:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as err:  # handed to every process, then raised on each
                box[0] = ("error", err)
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            if self.is_main:
                raise value
            raise type(value)(*value.args) if _rebuildable(value) else RuntimeError(str(value))
        return value


#: the shard of a process evaluating alone
ALONE = Shard()


def _rebuildable(err: BaseException) -> bool:
    try:
        type(err)(*err.args)
    except Exception:
        return False
    return True
