"""Grouping a stream of decoded samples into batches.

Static scoring batches each shard on its own: the contrastive loss couples the samples of a
batch, so a sample's score depends on its batch mates, and per-shard batches make every shard's
scores independent of which other shards exist, were already done (resume) or run elsewhere (Ray,
Slurm ranks). Trajectory epochs are one stream whose batches span shards.

Tail rule: a stream's last batch would often be tiny (a batch of 3 has only 2 negatives per
sample), so a remainder smaller than half a batch joins the batch before it (that batch holds
B + r < 1.5 B samples); a larger remainder forms its own batch. Samples that are not ``ok`` ride
along with the batch being filled when they are read and take no part in its loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from mimicfilter.shards.records import DecodedSample, SampleInfo


@dataclass(frozen=True)
class Batch:
    """Collated model inputs of a batch's ok samples, and every sample's identity and status in order."""

    shard: str | None  # the shard of a per-shard stream; None for a stream that spans shards
    step: int
    last: bool  # the stream's final batch
    samples: list[SampleInfo]
    images: Any = None  # torch.Tensor [B, 3, H, W], None without ok samples
    texts: Any = None  # token ids [B, L] (image–text) ...
    labels: Any = None  # ... or labels [B] (classification)

    @property
    def targets(self) -> Any:
        """Token ids for image–text batches, labels for classification batches."""
        return self.texts if self.texts is not None else self.labels

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True): page-locked tensors copy to the GPU asynchronously."""
        pinned = {name: None if value is None else value.pin_memory()
                  for name, value in (("images", self.images), ("texts", self.texts), ("labels", self.labels))}
        return dataclasses.replace(self, **pinned)


def _collate(shard: str | None, step: int, samples: list[DecodedSample], last: bool) -> Batch:
    ok = [sample for sample in samples if sample.ok]
    images = torch.stack([sample.image for sample in ok]) if ok else None
    texts = torch.stack([sample.text for sample in ok]) if ok and ok[0].text is not None else None
    labels = torch.tensor([sample.label for sample in ok]) if ok and ok[0].label is not None else None
    return Batch(shard, step, last, [sample.info for sample in samples], images, texts, labels)


def _ok_count(samples: list[DecodedSample]) -> int:
    return sum(sample.ok for sample in samples)


def group_batches(
    samples: Iterable[DecodedSample], batch_size: int, shard: str | None, first_step: int = 0
) -> Iterator[Batch]:
    """Collated batches of ``batch_size`` ok samples (tail rule above); the final one has ``last``.

    ``shard`` names the shard of a per-shard stream (static scoring) and is None for a stream that
    spans shards (trajectory epochs); every sample carries its own shard either way. Steps count
    from ``first_step``. An empty stream still yields one empty ``last`` batch, so a shard without
    samples gets a (zero-row) part.
    """
    held: list[DecodedSample] | None = None  # a full batch kept back until we know whether the tail joins it
    current: list[DecodedSample] = []
    step = first_step
    for sample in samples:
        current.append(sample)
        if sample.ok and _ok_count(current) == batch_size:
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
