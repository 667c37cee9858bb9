"""Batch grouping: per-shard batches, the tail rule, bad samples riding along."""

import torch

from mimicfilter.mimic.normalization import ImageNormalization
from mimicfilter.pipeline.batches import group_batches, stack_images
from mimicfilter.shards.records import DecodedSample


def sample(index, status="ok"):
    ok = status == "ok"
    return DecodedSample(
        shard="s", key=f"{index:04d}", index=index, uid=None, status=status, error=None if ok else "bad",
        label=None, image=torch.full((3, 2, 2), float(index)) if ok else None,
        text=torch.tensor([index]) if ok else None,
    )


def sizes(batches):
    return [len(batch.samples) for batch in batches]


def test_full_batches_and_a_large_tail_keep_their_own_batches():
    batches = list(group_batches([sample(i) for i in range(10)], batch_size=4, shard="s"))
    assert sizes(batches) == [4, 4, 2]
    assert [batch.step for batch in batches] == [0, 1, 2]
    assert [batch.last for batch in batches] == [False, False, True]
    assert batches[0].images.shape == (4, 3, 2, 2)


def test_a_small_tail_joins_the_batch_before_it():
    batches = list(group_batches([sample(i) for i in range(9)], batch_size=4, shard="s"))
    assert sizes(batches) == [4, 5]
    assert batches[-1].last and batches[-1].images.shape[0] == 5


def test_bad_samples_ride_along_without_tensors():
    samples = [sample(0), sample(1, "decode_error"), sample(2), sample(3), sample(4, "missing_text")]
    (batch,) = list(group_batches(samples, batch_size=3, shard="s"))
    assert [row.index for row in batch.samples] == [0, 1, 2, 3, 4]
    assert batch.images.shape[0] == 3  # the trailing bad sample joined the full batch
    assert batch.texts.flatten().tolist() == [0, 2, 3]


def test_an_empty_shard_yields_one_empty_last_batch():
    (batch,) = list(group_batches([], batch_size=4, shard="s"))
    assert batch.samples == [] and batch.images is None and batch.last


def test_a_shard_without_ok_samples_yields_its_rows():
    (batch,) = list(group_batches([sample(0, "decode_error"), sample(1, "shard_error")], batch_size=4, shard="s"))
    assert len(batch.samples) == 2 and batch.images is None


def test_images_stay_in_the_decoders_memory_order_until_the_device():
    """Decoders leave HWC memory; batches keep it (a plain copy) and the device makes it contiguous."""
    generator = torch.Generator().manual_seed(0)
    decoded = [torch.randint(0, 256, (8, 6, 3), dtype=torch.uint8, generator=generator).permute(2, 0, 1)
               for _ in range(3)]
    decoded.append(torch.zeros((3, 8, 6), dtype=torch.uint8))  # a contiguous one (a padded crop) too
    batch = stack_images(decoded, lambda dtype, shape: torch.empty(shape, dtype=dtype))
    assert batch.shape == (4, 3, 8, 6) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack(decoded))
    normalization = ImageNormalization()
    model_input = normalization.to_model(batch, torch.device("cpu"), torch.float32)
    assert model_input.is_contiguous() and torch.equal(model_input, normalization.normalise(torch.stack(decoded)))
    grouped = next(iter(group_batches([sample(i) for i in range(2)], batch_size=2, shard="s")))
    assert grouped.images.is_contiguous(memory_format=torch.channels_last)
