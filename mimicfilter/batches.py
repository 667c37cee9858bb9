"""Grouping one shard's decoded samples into batches.

Batches never span two shards: the contrastive loss couples the samples of a batch, so a sample's
score depends on its batch mates, and per-shard batches make every shard's scores independent of
which other shards exist, were already done (resume) or run elsewhere (Ray, Slurm ranks).

Tail rule: a shard's last batch would often be tiny (a batch of 3 has only 2 negatives per sample),
so a remainder smaller than half a batch joins the batch before it (that batch holds B + r < 1.5 B
samples); a larger remainder forms its own batch. Samples that are not ``ok`` ride along with the
batch being filled when they are read and take no part in its loss.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

META_FIELDS = ("shard", "key", "index", "uid", "status", "error", "label")


def _collate(shard: str | None, step: int, samples: list[dict], last: bool) -> dict[str, Any]:
    ok = [sample for sample in samples if sample["status"] == "ok"]
    images = torch.stack([sample["image"] for sample in ok]) if ok else None
    texts = torch.stack([sample["text"] for sample in ok]) if ok and ok[0]["text"] is not None else None
    labels = torch.tensor([sample["label"] for sample in ok]) if ok and ok[0]["label"] is not None else None
    return {
        "shard": shard,
        "step": step,
        "last": last,
        "rows": [{name: sample.get(name) for name in META_FIELDS} for sample in samples],
        "images": images,
        "texts": texts,
        "labels": labels,
    }


def _ok_count(samples: list[dict]) -> int:
    return sum(sample["status"] == "ok" for sample in samples)


def group_batches(
    samples: Iterable[dict], batch_size: int, shard: str | None, first_step: int = 0
) -> Iterator[dict[str, Any]]:
    """Collated batches of ``batch_size`` ok samples (tail rule above); the final one has ``last``.

    ``shard`` names the shard of a per-shard stream (static scoring) and is None for a stream that
    spans shards (trajectory epochs); every row carries its own shard either way. Steps count
    from ``first_step``. An empty stream still yields one empty ``last`` batch, so a shard without
    samples gets a (zero-row) part.
    """
    held: list[dict] | None = None  # a full batch kept back until we know whether the tail joins it
    current: list[dict] = []
    step = first_step
    for sample in samples:
        current.append(sample)
        if sample["status"] == "ok" and _ok_count(current) == batch_size:
            if held is not None:
                yield _collate(shard, step, held, last=False)
                step += 1
            held, current = current, []
    remainder = _ok_count(current)
    if held is not None and remainder < batch_size / 2:
        yield _collate(shard, step, held + current, last=True)
        return
    if held is not None:
        yield _collate(shard, step, held, last=False)
        step += 1
    yield _collate(shard, step, current, last=True)
