"""The one input path of every mode: read → chunk → decode (in parallel, order kept) → batch.

    reader (this process)             decode workers (execute.local.OrderedPool)     this process
    shards.samples + read-ahead ─► RawChunk ─► Decoder.decode_chunk ─► DecodedChunk ─► group_batches ─► Batch
    (static: per shard;               (pipeline.decoder)                            (per shard, or
     trajectory: one shuffled                                                        one epoch stream)
     stream, resume skip)

Work units are chunks of ``chunk_size`` raw samples, so every worker stays busy however many
shards there are, and the pool returns chunks in the order they were read: the decoded sample
stream, and so every batch, part and table, is the same for any worker count and chunk size.
Static scoring and ``embed`` batch each shard on its own (:class:`ShardStream`); a trajectory
epoch is one stream spanning shards (:class:`mimicfilter.pipeline.trajectory.EpochStream`).

A :class:`Stream` describes a run's batches completely: equal streams give equal batches. That
makes it the early start's reuse key (:class:`EarlyStart`): ``score`` starts reading and decoding
before the models load, and :func:`open_input` hands the run that stream only when the run asks
for an equal one.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol

from mimicfilter.execute.local import OrderedPool, read_ahead
from mimicfilter.pipeline.anchors import AnchorPlan, pool_with_anchors
from mimicfilter.pipeline.batches import Batch, group_batches
from mimicfilter.pipeline.decoder import DecodedChunk, Decoder, RawChunk
from mimicfilter.shards.records import DecodedSample, RawSample
from mimicfilter.shards.samples import iter_shard_samples

CHUNK_SIZE = 64  # raw samples per work unit: ~20-100 ms of decoding, small enough to balance the workers
READ_AHEAD_SHARDS = 4  # shards read concurrently by the reader (remote shards spend their time waiting)


def pins_memory(device_type: str) -> bool:
    """Batches for a GPU are collated into page-locked memory (asynchronous copies to the device)."""
    return device_type == "cuda"


def _chunks_of_shard(shard: str, allow_pipe: bool, chunk_size: int, anchors: AnchorPlan | None) -> Iterator[RawChunk]:
    pending: list[RawSample] = []
    for raw in pool_with_anchors(iter_shard_samples(shard, allow_pipe=allow_pipe), anchors, shard):
        if len(pending) == chunk_size:
            yield RawChunk(tuple(pending), shard)
            pending = []
        pending.append(raw)
    yield RawChunk(tuple(pending), shard, ends_shard=True)


def shard_chunks(shards: Iterable[str], allow_pipe: bool, chunk_size: int = CHUNK_SIZE,
                 read_depth: int = READ_AHEAD_SHARDS, anchors: AnchorPlan | None = None) -> Iterator[RawChunk]:
    """Every shard's chunks in order, with the anchors each shard carries (the next shards read ahead by threads)."""
    sources = [functools.partial(_chunks_of_shard, shard, allow_pipe, chunk_size, anchors) for shard in shards]
    return read_ahead(sources, read_depth)


def raw_stream(shards: Iterable[str], allow_pipe: bool, read_depth: int = READ_AHEAD_SHARDS) -> Iterator[RawSample]:
    """The raw samples of the shards, in order (the next shards read ahead by threads)."""
    sources = [functools.partial(iter_shard_samples, shard, allow_pipe=allow_pipe) for shard in shards]
    return read_ahead(sources, read_depth)


def stream_chunks(samples: Iterable[RawSample], chunk_size: int = CHUNK_SIZE) -> Iterator[RawChunk]:
    iterator = iter(samples)
    while piece := tuple(itertools.islice(iterator, chunk_size)):
        yield RawChunk(piece)


def decoded_samples(decoded_chunks: Iterable[DecodedChunk]) -> Iterator[DecodedSample]:
    for chunk in decoded_chunks:
        yield from chunk.unpack()


def per_shard(decoded_chunks: Iterable[DecodedChunk]) -> Iterator[tuple[str, Iterator[DecodedSample]]]:
    """(shard, its samples) in order; consume each shard's samples before asking for the next shard."""
    chunks = iter(decoded_chunks)
    for first in chunks:
        def samples(chunk: DecodedChunk = first) -> Iterator[DecodedSample]:
            while True:
                yield from chunk.unpack()
                if chunk.ends_shard:
                    return
                chunk = next(chunks)

        yield first.shard, samples()


def shard_batches(shards: Iterable[str], pool: OrderedPool, batch_size: int, allow_pipe: bool,
                  pin_memory: bool = False, chunk_size: int = CHUNK_SIZE, anchors: AnchorPlan | None = None) -> Iterator[Batch]:
    """Static scoring and ``embed``: every shard batched on its own (with its anchors), shards in
    order. With worker processes, reading and decoding start at this call."""
    decoded = pool.map(shard_chunks(shards, allow_pipe, chunk_size, anchors=anchors))
    return (batch for shard, samples in per_shard(decoded)
            for batch in group_batches(samples, batch_size, shard, pin_memory=pin_memory))


class Stream(Protocol):
    """A run's batches, described completely: equal streams give equal batches."""

    def batches(self, pool: OrderedPool) -> Iterator[Batch]:
        """Start reading (and, with worker processes, decoding) now; the batches in order."""


@dataclass(frozen=True)
class ShardStream:
    """Static scoring and ``embed``: the shards' batches, each shard batched on its own."""

    shards: tuple[str, ...]
    batch_size: int
    allow_pipe: bool = False
    device_type: str = "cpu"  # where the batches go (a GPU gets page-locked batches)
    chunk_size: int = CHUNK_SIZE
    anchors: AnchorPlan | None = None  # score --trusted: each shard's anchors join its stream

    def batches(self, pool: OrderedPool) -> Iterator[Batch]:
        return shard_batches(self.shards, pool, self.batch_size, self.allow_pipe, pins_memory(self.device_type),
                             self.chunk_size, self.anchors)


@dataclass
class EarlyStart:
    """Reading and decoding started while the models load (``score``): the pool's workers run
    ``decoder``, and ``batches`` is ``stream`` under way (None: only the workers were started,
    the stream the run needs being unknown until its run directory is open)."""

    decoder: Decoder
    pool: OrderedPool
    stream: Stream | None = None
    batches: Iterator[Batch] | None = None

    @classmethod
    def begin(cls, decoder: Decoder, workers: int, stream: Stream | None) -> EarlyStart:
        pool = OrderedPool(decoder.decode_chunk, workers)
        return cls(decoder, pool, stream, stream.batches(pool) if stream is not None else None)

    def close(self) -> None:
        self.pool.close()


def open_input(decoder: Decoder, stream: Stream, workers: int,
               early: EarlyStart | None = None) -> tuple[OrderedPool, Iterator[Batch]]:
    """The decode pool for a run (the caller owns it) and ``stream``'s batches.

    The early start's pool is taken when it decodes exactly as ``decoder`` does, and its batches
    when they are ``stream``'s (the one comparison that decides reuse); otherwise the run starts
    its own: a stream on that pool, or a new pool of ``workers`` when the decoders differ."""
    if early is not None and decoder == early.decoder:
        started = early.batches if stream == early.stream else None
        return early.pool, started if started is not None else stream.batches(early.pool)
    if early is not None:
        early.close()
    pool = OrderedPool(decoder.decode_chunk, workers)
    return pool, stream.batches(pool)
