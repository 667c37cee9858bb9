"""Grouping a stream of decoded samples into batches.

Static scoring batches each shard on its own: the contrastive loss couples the samples of a
batch, so a sample's score depends on its batch mates, and per-shard batches make every shard's
scores independent of which other shards exist, were already done (resume) or run elsewhere (Ray,
Slurm ranks). Trajectory epochs are one stream whose batches span shards.

Tail rule: a stream's last batch would often be tiny (a batch of 3 has only 2 negatives per
sample), so a remainder smaller than half a batch joins the batch before it (that batch holds
B + r < 1.5 B samples); a larger remainder forms its own batch. Samples that are not ``ok`` ride
along with the batch being filled when they are read and take no part in its loss. Anchors
(``score --trusted``) ride along too: they do not count towards the batch size, and are scored as
extra members of the pool's batch without changing any pool sample's score (mimic.losses).

Collation stacks the ok samples' uint8 images (and token ids) once, straight into page-locked
memory when the batch goes to a GPU (``pin_memory``), so the copy to the device is asynchronous.
Images keep the memory order the decoders leave them in — each pixel's three channels together
(``[B, H, W, 3]`` underneath a ``[B, 3, H, W]`` view) — so stacking is a plain copy; the scoring
device makes the batch contiguous (:mod:`mimicfilter.mimic.normalization`), where it costs nothing on a
GPU, instead of every decode worker transposing each image (a tenth of the fast path's time).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from mimicfilter.mimic.losses import Anchors
from mimicfilter.shards.records import DecodedSample, SampleInfo
from mimicfilter.store.schema import CONFUSABLE


@dataclass(frozen=True)
class Batch:
    """Collated model inputs of a batch's ok samples, and every sample's identity and status in order."""

    shard: str | None  # the shard of a per-shard stream; None for a stream that spans shards
    step: int
    last: bool  # the stream's final batch
    samples: list[SampleInfo]
    images: Any = None  # torch.Tensor uint8 [B, 3, H, W] (channels-last memory), None without ok samples
    texts: Any = None  # token ids [B, L] (image–text) ...
    labels: Any = None  # ... or labels [B] (classification)
    # --decoder gpu: (row of ``images``, JPEG bytes) of the images still to decode on the device;
    # their rows of ``images`` are zeros until then (pipeline.decoder.Decoder.decode_on_device)
    encoded: tuple[tuple[int, bytes], ...] = ()
    twins: Any = None  # image–text batches with anchors: bool [anchors, pool samples] sharing an image or caption

    @property
    def anchors(self) -> Anchors | None:
        """Which ok samples are anchors (over the rows of ``images``) and their twins, or None."""
        ok = [sample for sample in self.samples if sample.ok]
        flags = [sample.anchor is not None for sample in ok]
        confusable = [sample.anchor == CONFUSABLE for sample in ok]
        return Anchors(torch.tensor(flags), self.twins, torch.tensor(confusable) if any(confusable) else None) \
            if any(flags) else None

    @property
    def pool_samples(self) -> int:
        """Ok samples of the pool (not anchors): those the proxy learns from."""
        return sum(sample.ok and sample.anchor is None for sample in self.samples)

    @property
    def targets(self) -> Any:
        """Token ids for image–text batches, labels for classification batches."""
        return self.texts if self.texts is not None else self.labels


Allocate = Callable[[torch.dtype, tuple[int, ...]], Any]  # (dtype, shape) → an empty tensor to stack into


def stack_into(tensors: list, allocate: Allocate) -> Any:
    """``torch.stack`` straight into memory from ``allocate`` (page-locked, or shared with a worker)."""
    return torch.stack(tensors, out=allocate(tensors[0].dtype, (len(tensors), *tensors[0].shape)))


def stack_images(images: list, allocate: Allocate) -> Any:
    """``uint8 [3, H, W]`` images → ``[n, 3, H, W]`` in channels-last memory (see the module
    docstring): stacked as ``[n, H, W, 3]``, returned as a view of that."""
    return stack_into([image.permute(1, 2, 0) for image in images], allocate).permute(0, 3, 1, 2)


def _host_memory(pin_memory: bool) -> Allocate:
    return lambda dtype, shape: torch.empty(shape, dtype=dtype, pin_memory=pin_memory)


def _collate(shard: str | None, step: int, samples: list[DecodedSample], last: bool, pin_memory: bool = False) -> Batch:
    ok = [sample for sample in samples if sample.ok]
    images = texts = labels = None
    encoded = ()
    if ok:
        shape = next((sample.image.shape for sample in ok if sample.image is not None), None)
        if shape is None:  # every image of the batch waits for the GPU decoder
            shape = (3, 1, 1)
        blank = torch.zeros(shape, dtype=torch.uint8)
        images = stack_images([blank if sample.image is None else sample.image for sample in ok], _host_memory(pin_memory))
        encoded = tuple((row, sample.encoded) for row, sample in enumerate(ok) if sample.image is None)
        if ok[0].text is not None:
            texts = stack_into([sample.text for sample in ok], _host_memory(pin_memory))
        if ok[0].label is not None:
            labels = torch.tensor([sample.label for sample in ok])
    return Batch(shard, step, last, [sample.info for sample in samples], images, texts, labels, encoded, _twins(ok))


def _content(sample: DecodedSample) -> bytes:
    pixels = sample.encoded if sample.image is None else sample.image.numpy().tobytes()
    return hashlib.blake2b(pixels, digest_size=16).digest()


def _twins(ok: list[DecodedSample]) -> Any:
    """For an image–text batch with anchors: which pool samples share each anchor's image (the same
    pixels) or caption, so the anchor is not contrasted with its own copies (mimic.losses.Anchors)."""
    anchors = [sample for sample in ok if sample.anchor is not None]
    if not anchors or ok[0].caption is None:
        return None
    pool = [sample for sample in ok if sample.anchor is None]
    images = [_content(sample) for sample in pool]
    twins = torch.zeros((len(anchors), len(pool)), dtype=torch.bool)
    for row, anchor in enumerate(anchors):
        image = _content(anchor)
        twins[row] = torch.tensor([other == image or sample.caption == anchor.caption
                                   for other, sample in zip(images, pool)], dtype=torch.bool)
    return twins


def group_batches(
    samples: Iterable[DecodedSample], batch_size: int, shard: str | None, first_step: int = 0,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """Collated batches of ``batch_size`` ok pool samples (tail rule above); the final one has ``last``.

    ``shard`` names the shard of a per-shard stream (static scoring) and is None for a stream that
    spans shards (trajectory epochs); every sample carries its own shard either way. Steps count
    from ``first_step``. An empty stream still yields one empty ``last`` batch, so a shard without
    samples gets a (zero-row) part.
    """
    held: list[DecodedSample] | None = None  # a full batch kept back until we know whether the tail joins it
    current: list[DecodedSample] = []
    current_ok = 0
    step = first_step
    for sample in samples:
        current.append(sample)
        pool = sample.ok and sample.anchor is None
        current_ok += pool
        if pool and current_ok == batch_size:
            if held is not None:
                yield _collate(shard, step, held, False, pin_memory)
                step += 1
            held, current, current_ok = current, [], 0
    if held is not None and current_ok < batch_size / 2:
        yield _collate(shard, step, held + current, True, pin_memory)
        return
    if held is not None:
        yield _collate(shard, step, held, False, pin_memory)
        step += 1
    yield _collate(shard, step, current, True, pin_memory)
