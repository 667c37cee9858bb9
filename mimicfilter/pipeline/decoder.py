"""Decoding: raw samples → model inputs, in the decode workers, a chunk at a time.

    reader (this process)           decode workers (execute.local.OrderedPool)        this process
    RawChunk (pipeline.stream) ─► Decoder.decode_chunk ─► DecodedChunk ─► batches ─► Decoder.decode_on_device
                                    (uint8 images at the model's size,               (--decoder gpu: the
                                     token ids tokenised a chunk at a time,           batch's JPEGs on the
                                     stacked in shared memory)                        scoring device)

The :class:`Decoder` carries what only the models know (image geometry, tokenizer, the head's
classes) and is inherited by the workers through fork; a decoded chunk travels back with one
shared-memory tensor for its images and one for its token ids.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from mimicfilter.errors import MimicfilterError, one_line
from mimicfilter.mimic.models import LoadedModels, ModelInputs
from mimicfilter.pipeline.batches import Batch, stack_images, stack_into
from mimicfilter.shards.decode import DecodeConfig, decode_sample, decode_with_pil, folded_caption_sha1
from mimicfilter.shards.images import ImageGeometry
from mimicfilter.shards.records import DecodedSample, RawSample, SampleInfo


@dataclass(frozen=True)
class RawChunk:
    """A work unit: consecutive raw samples of the stream; in a per-shard stream, all of one shard."""

    samples: tuple[RawSample, ...]
    shard: str | None = None
    ends_shard: bool = False  # per-shard streams: the shard's last chunk (an empty shard has one, empty)


@dataclass
class DecodedChunk:
    """A decoded chunk as it travels back: the samples without tensors, and one tensor each for the
    images and the token ids of the samples that have them (one shared-memory segment apiece)."""

    samples: list[DecodedSample]
    images: Any = None  # uint8 [n, 3, H, W] (channels-last memory): the samples with a decoded image, in order
    texts: Any = None  # token ids [m, L]: the samples with tokens, in order
    shard: str | None = None
    ends_shard: bool = False
    packed: bool = True  # False: the samples still hold their own tensors

    @classmethod
    def pack(cls, samples: list[DecodedSample], shard: str | None, ends_shard: bool) -> DecodedChunk:
        if multiprocessing.parent_process() is None:  # decoded in this process: nothing to send
            return cls(samples, None, None, shard, ends_shard, packed=False)
        with_image = [sample.image for sample in samples if sample.ok and sample.image is not None]
        with_text = [sample.text for sample in samples if sample.ok and sample.text is not None]
        for sample in samples:
            sample.image = sample.text = None
        images = stack_images(with_image, _shared) if with_image else None
        texts = stack_into(with_text, _shared) if with_text else None
        return cls(samples, images, texts, shard, ends_shard)

    def unpack(self) -> list[DecodedSample]:
        """The samples with their image and token views restored."""
        if not self.packed:
            return self.samples
        images = iter(self.images) if self.images is not None else iter(())
        texts = iter(self.texts) if self.texts is not None else iter(())
        for sample in self.samples:
            if sample.ok and sample.encoded is None:
                sample.image = next(images)
            if sample.ok and sample.caption is not None:
                sample.text = next(texts)
        return self.samples


def _shared(dtype: torch.dtype, shape: tuple[int, ...]) -> Any:
    """An empty tensor in shared memory (so sending the chunk from the worker is not one more copy)."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def _fills_context(tokens: torch.Tensor) -> torch.Tensor:
    """Per caption of a tokenizer call whose last row is the empty caption's: whether its last position
    holds a token rather than the padding, i.e. it filled the whole context (and may have been cut)."""
    return tokens[:-1, -1] != tokens[-1, -1]


def _reject(sample: DecodedSample, status: str, error: str) -> None:
    sample.status, sample.error = status, one_line(error)
    sample.image = sample.text = sample.encoded = None


def _take_tokens(sample: DecodedSample, ids: torch.Tensor, empty: torch.Tensor, long: bool) -> None:
    """The caption's token ids; a caption that tokenises as the empty one (control characters, a NUL:
    nothing the model reads) is ``missing_text``, like an empty caption, not a score of nothing."""
    if torch.equal(ids, empty):
        _reject(sample, "missing_text", "caption has nothing the tokenizer reads (control characters only?)")
        return
    sample.text = ids
    if long:
        sample.long_caption_sha1 = folded_caption_sha1(sample.caption)


@dataclass(frozen=True)
class Decoder:
    """Raw samples → model inputs with the models' geometry and tokenizer (inherited by workers)."""

    config: DecodeConfig
    geometry: ImageGeometry = field(default_factory=ImageGeometry)
    tokenizer: Callable | None = None  # None for classification

    @classmethod
    def for_models(cls, decode: DecodeConfig, models: LoadedModels) -> Decoder:
        """The decoder with what only the models know: geometry, tokenizer, the head's classes."""
        return cls.for_inputs(decode, ModelInputs.of(models))

    @classmethod
    def for_inputs(cls, decode: DecodeConfig, inputs: ModelInputs) -> Decoder:
        if inputs.task == "classify":
            decode = dataclasses.replace(decode, num_classes=inputs.num_classes)
        tokenizer = inputs.tokenizer if decode.task == "contrastive" else None
        return cls(decode, ImageGeometry.from_open_clip(inputs.preprocess_cfg), tokenizer)

    def decode_samples(self, raws: Iterable[RawSample]) -> list[DecodedSample]:
        """Decode, then tokenise the ok captions in one call."""
        samples = [decode_sample(raw, self.config, self.geometry) for raw in raws]
        if self.tokenizer is not None:
            self._tokenize([sample for sample in samples if sample.ok and sample.caption is not None])
        return samples

    def decode_chunk(self, chunk: RawChunk) -> DecodedChunk:
        return DecodedChunk.pack(self.decode_samples(chunk.samples), chunk.shard, chunk.ends_shard)

    def _tokenize(self, samples: list[DecodedSample]) -> None:
        """Token ids for the chunk's captions, in one call. A caption whose last position holds a token
        rather than the padding an empty caption ends with filled the whole context (it may have been
        cut: a caption of exactly the context's length counts too) and gets ``long_caption_sha1``."""
        if not samples:
            return
        try:
            tokens = self.tokenizer([*(sample.caption for sample in samples), ""])  # "": the padding, below
            if not isinstance(tokens, torch.Tensor) or tokens.shape[0] != len(samples) + 1:
                raise TypeError("unexpected tokenizer output")
        except Exception:  # find the caption(s) at fault one by one; the rest keep their tokens
            for sample in samples:
                self._tokenize_one(sample)
            return
        for sample, ids, long in zip(samples, tokens[:-1], _fills_context(tokens).tolist()):
            _take_tokens(sample, ids, tokens[-1], long)

    def _tokenize_one(self, sample: DecodedSample) -> None:
        try:
            tokens = self.tokenizer([sample.caption, ""])
            if not isinstance(tokens, torch.Tensor):
                raise TypeError(f"returned {type(tokens).__name__}, expected a tensor")
            _take_tokens(sample, tokens[0], tokens[1], bool(_fills_context(tokens)[0]))
        except Exception as exc:  # the model's tokenizer: any failure is this sample's problem
            _reject(sample, "decode_error", f"tokenize failed: {type(exc).__name__}: {exc}")

    def decode_on_device(self, batch: Batch, device: torch.device) -> Batch:
        """``--decoder gpu``: decode the batch's JPEGs on ``device``; a file the device rejects is
        decoded by PIL here, and one PIL rejects too becomes a ``decode_error`` row of the batch."""
        if not batch.encoded:
            return batch
        from mimicfilter.shards.fast_decode import decode_jpegs_on_device

        rows = [row for row, _ in batch.encoded]
        decoded = decode_jpegs_on_device([data for _, data in batch.encoded], self.geometry, device)
        failed: dict[int, str] = {}
        for position, (row, data) in enumerate(batch.encoded):
            if decoded[position] is None:
                pixels, error = decode_with_pil(data, self.config, self.geometry)
                decoded[position] = None if pixels is None else pixels.to(device)
                if error is not None:
                    failed[row] = error
        images = torch.empty((batch.images.shape[0], 3, *self.geometry.size), dtype=torch.uint8, device=device)
        on_device = set(rows)
        cpu_rows = [row for row in range(images.shape[0]) if row not in on_device]
        if cpu_rows:
            images[cpu_rows] = batch.images[cpu_rows].to(device, non_blocking=True)
        for row, pixels in zip(rows, decoded):
            if pixels is not None:
                images[row] = pixels
        return _drop_rows(batch, images, failed) if failed else dataclasses.replace(batch, images=images, encoded=())


def _drop_rows(batch: Batch, images: Any, failed: dict[int, str]) -> Batch:
    """The batch without the ok rows that failed on the device; those samples become decode_error rows."""
    infos: list[SampleInfo] = []
    row = 0
    for info in batch.samples:
        if info.ok:
            if row in failed:
                info = dataclasses.replace(info, status="decode_error", error=one_line(f"cannot decode image: {failed[row]}"))
            row += 1
        infos.append(info)
    keep = [row for row in range(images.shape[0]) if row not in failed]
    if not keep:
        return dataclasses.replace(batch, samples=infos, images=None, texts=None, labels=None, encoded=())
    index = torch.tensor(keep)

    def pick(tensor: Any) -> Any:
        return None if tensor is None else tensor[index.to(tensor.device)]

    return dataclasses.replace(batch, samples=infos, images=pick(images), texts=pick(batch.texts),
                               labels=pick(batch.labels), encoded=())


def check_decoder(decode: DecodeConfig, device_type: str) -> None:
    """``--decoder gpu`` decodes on the scoring device, which must then be a GPU."""
    if decode.decoder == "gpu" and device_type != "cuda":
        raise MimicfilterError("--decoder gpu decodes JPEGs on the scoring GPU, but the scoring device is the CPU",
                               hint="use --decoder fast (the default) on CPU, or --device cuda")
