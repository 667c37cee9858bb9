"""The local executor: worker processes produce items from work units, this process consumes them.

:func:`fan_out` hands every ``workers``-th unit to each DataLoader worker process, which runs a
picklable ``produce(unit) -> items`` (reading and decoding, in the pipeline) and sends the items
back through a bounded prefetch queue; with ``workers=0`` everything runs in this process. Items of
one unit arrive in order; items of different units interleave.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

Unit = TypeVar("Unit")
Item = TypeVar("Item")


class _Units(IterableDataset):
    """Each DataLoader worker takes every ``num_workers``-th unit and yields what ``produce`` makes of it."""

    def __init__(self, units: Sequence, produce: Callable[[object], Iterable]):
        self.units = list(units)
        self.produce = produce

    def __iter__(self):
        worker = get_worker_info()
        mine = self.units if worker is None else self.units[worker.id :: worker.num_workers]
        for unit in mine:
            yield from self.produce(unit)


def fan_out(units: Sequence[Unit], produce: Callable[[Unit], Iterable[Item]], workers: int,
            pin_memory: bool = False) -> Iterator[Item]:
    """The items ``produce`` makes of every unit, made in up to ``workers`` processes."""
    loader = DataLoader(_Units(units, produce), batch_size=None, num_workers=min(workers, len(units)),
                        pin_memory=pin_memory)
    yield from loader
