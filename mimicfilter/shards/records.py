"""The records that flow out of this package: a raw sample (bytes), a decoded sample (model inputs),
and the part of a sample every output row repeats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mimicfilter.errors import one_line


@dataclass(slots=True)
class RawSample:
    """One WebDataset sample as read from its shard: the bytes of its files, or why not.

    ``status`` is ``ok``, ``too_large`` (a member over the size limit), ``decode_error`` (e.g. a
    duplicate member, or a member that is a link, FIFO or device, not a regular file) or
    ``shard_error`` (the stream broke here; ``files`` is then empty).
    """

    shard: str
    key: str
    index: int  # position in the shard, counting every sample
    files: dict[str, bytes] = field(default_factory=dict)  # extension (lower case) -> bytes
    status: str = "ok"
    error: str | None = None
    anchor: str | None = None  # "trusted" or "synthetic" for the anchors of score --trusted (pipeline/anchors.py)

    def mark(self, status: str, error: str) -> None:
        """Record a problem; the first one wins, so a later one cannot hide why the sample was rejected."""
        if self.status == "ok":
            self.status = status
            self.error = one_line(error)


@dataclass(frozen=True, slots=True)
class SampleInfo:
    """Who a sample is and what became of it: the columns every output row of the sample repeats."""

    shard: str
    key: str
    index: int
    uid: str | None
    status: str
    error: str | None
    label: int | None
    # What people check first in a web-crawled pool (null when unknown, e.g. an unreadable image):
    caption_chars: int | None = None  # characters of the caption, as scored (stripped)
    image_width: int | None = None  # the original image's pixels, from its header
    image_height: int | None = None
    anchor: str | None = None  # "trusted" or "synthetic": not a pool sample (score --trusted)
    # exact-duplicate keys, computed where the bytes are in hand (decoding): SHA-1 of the image file and
    # of the caption as scored (null when there is none)
    image_sha1: bytes | None = None
    caption_sha1: bytes | None = None
    # SHA-1 of the caption folded (case, whitespace) when it is longer than the text tower's context: the
    # embedding saw only its start, so `dedup --dedup-on pair` compares such captions by this instead
    long_caption_sha1: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(slots=True)
class DecodedSample:
    """One sample after decoding: model inputs when ``status`` is ok — the image (``uint8 [3, H, W]``
    at the model's size, or ``encoded`` JPEG bytes for the GPU decoder), the caption or label, and
    the caption's token ids once its chunk is tokenised."""

    shard: str
    key: str
    index: int
    uid: str | None = None
    status: str = "ok"
    error: str | None = None
    label: int | None = None
    image: Any = None  # torch.Tensor uint8 [3, H, W]
    text: Any = None  # torch.Tensor of token ids (image–text pools)
    caption: str | None = None
    encoded: bytes | None = None  # a JPEG left for the GPU decoder (``image`` is None then)
    image_width: int | None = None  # the original image's size, from its header
    image_height: int | None = None
    anchor: str | None = None
    image_sha1: bytes | None = None
    caption_sha1: bytes | None = None
    long_caption_sha1: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def info(self) -> SampleInfo:
        return SampleInfo(self.shard, self.key, self.index, self.uid, self.status, self.error, self.label,
                          None if self.caption is None else len(self.caption), self.image_width, self.image_height,
                          self.anchor, self.image_sha1, self.caption_sha1, self.long_caption_sha1)
