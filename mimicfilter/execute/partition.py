"""``--rank R --world-size W``: which work units this process takes (Slurm arrays, multi-node jobs
without an engine). Rank R takes every W-th unit of the expanded list, so the ranks are disjoint,
cover every unit, and need no coordination beyond a shared output directory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypeVar

from mimicfilter.errors import MimicfilterError

Unit = TypeVar("Unit")


@dataclass(frozen=True)
class Partition:
    """This process's share of the units: every ``world_size``-th unit starting at ``rank``."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        if self.world_size < 1:
            raise MimicfilterError(f"--world-size {self.world_size}: must be at least 1")
        if not 0 <= self.rank < self.world_size:
            raise MimicfilterError(
                f"--rank {self.rank} is outside 0..{self.world_size - 1}",
                hint="ranks count from 0; with Slurm arrays use --rank $SLURM_ARRAY_TASK_ID",
            )

    @classmethod
    def of(cls, rank: int | None, world_size: int | None) -> Partition:
        """From ``--rank`` and ``--world-size``, which go together (neither: the whole list)."""
        if (rank is None) != (world_size is None):
            raise MimicfilterError("--rank and --world-size go together", hint="e.g. --rank 3 --world-size 16")
        return cls() if rank is None else cls(rank, world_size)

    @property
    def partitioned(self) -> bool:
        return self.world_size > 1

    def select(self, units: Sequence[Unit]) -> list[Unit]:
        """Round-robin over the expanded list: balanced, deterministic, disjoint, complete."""
        return list(units[self.rank :: self.world_size])
