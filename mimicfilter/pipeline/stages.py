"""The one composition of the input stages: read → decode → batch, used by every mode.

    shards.tar.iter_shard_samples ─► shards.decode.decode_sample ─► batches.group_batches
        (raw samples)                  (DecodedSample)                 (Batch)

Static scoring and ``embed`` run it per shard (:class:`ShardBatches`, in worker processes);
trajectory epochs run it over one shuffled stream that spans shards
(:mod:`mimicfilter.pipeline.trajectory`). Everything handed to worker processes is picklable.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from mimicfilter.mimic.models import LoadedModels
from mimicfilter.pipeline.batches import Batch, group_batches
from mimicfilter.shards.decode import DecodeConfig, Preprocess, Tokenize, decode_sample
from mimicfilter.shards.records import DecodedSample, RawSample
from mimicfilter.shards.tar import iter_shard_samples


def _tokenize_one(tokenizer: Callable, caption: str):
    return tokenizer([caption])[0]


@dataclass(frozen=True)
class Decoder:
    """Raw sample → DecodedSample with the models' preprocessing and tokenizer (picklable)."""

    config: DecodeConfig
    preprocess: Preprocess
    tokenize: Tokenize | None  # None for classification

    @classmethod
    def for_models(cls, decode: DecodeConfig, models: LoadedModels) -> Decoder:
        """The decoder with what only the models know: preprocessing, tokenizer, the head's classes."""
        if models.task == "classify":
            decode = dataclasses.replace(decode, num_classes=models.reference.head.out_features)
        tokenize = functools.partial(_tokenize_one, models.tokenizer) if decode.task == "contrastive" else None
        return cls(decode, models.preprocess, tokenize)

    def __call__(self, raw: RawSample) -> DecodedSample:
        return decode_sample(raw, self.config, self.preprocess, self.tokenize)


def decoded_batches(raw_samples: Iterable[RawSample], decoder: Decoder, batch_size: int,
                    shard: str | None = None, first_step: int = 0) -> Iterator[Batch]:
    """decode → batch over a stream of raw samples (one shard's, or a trajectory epoch's)."""
    return group_batches((decoder(raw) for raw in raw_samples), batch_size, shard, first_step)


@dataclass(frozen=True)
class ShardBatches:
    """read → decode → batch for one shard: the unit of work of static scoring and ``embed`` (picklable)."""

    decoder: Decoder
    batch_size: int
    allow_pipe: bool = False

    def __call__(self, shard: str) -> Iterator[Batch]:
        return decoded_batches(iter_shard_samples(shard, allow_pipe=self.allow_pipe), self.decoder, self.batch_size, shard)


def detect_task(shards: tuple[str, ...], decode: DecodeConfig, allow_pipe: bool, sample_limit: int = 16) -> str:
    """``classify`` when the first readable samples carry a label and no caption, else ``contrastive``."""
    text_ext = "json" if decode.json_field else decode.text_key.lower()
    for shard in shards[:2]:
        for raw in itertools.islice(iter_shard_samples(shard, allow_pipe=allow_pipe), sample_limit):
            if raw.status == "ok" and raw.files:
                has_label, has_text = decode.label_key in raw.files, text_ext in raw.files
                return "classify" if has_label and not has_text else "contrastive"
    return "contrastive"
