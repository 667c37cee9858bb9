"""Anchors (``score --trusted``): samples of known quality scored in the pool's own stream, at the same
proxy states, so that ``filter`` can calibrate the quality estimate and the cut (curate/calibrate.py).

* **Trusted** samples come from the user's checked shards (``--trusted``, any shard spec). They are
  read once per process and spread evenly through the pool's stream: a trajectory epoch inserts
  trusted sample j after pool sample ⌊(j+1)·N/(T+1)⌋ (N: the pool's estimated size, T: trusted
  samples); static scoring gives trusted sample j to pool shard j mod S, spread the same way over
  that shard, so each is scored exactly once per epoch whatever the executor or ``--rank``.
* **Synthetic negatives** are made from the pool: a pool sample is chosen with probability
  ``synthetic_share`` (a seeded hash of its shard, key and position), and each chosen sample's image
  is paired with the caption — or the label — of a random earlier chosen sample of the same shard
  (the shard's first chosen sample, with a random later one at the shard's end): the same pairs in
  every epoch and every process, made as the stream goes, with the partners' caption or label files
  as the only memory. Random partners, not neighbours: shards are often sorted (by source, by
  class), and a neighbour's caption may fit. A pair whose caption or label is its own is not made.
* **Confusable negatives** (labelled images only): each chosen sample's image once more, flagged
  ``confusable``, scored with the class the reference finds most likely after the image's own label
  (mimic/classify.py relabels it on the device) — made only where the reference ranks the image's
  own label first; otherwise its row gets status ``not_confusable`` and no scores. Random flips are
  label noise at its most obvious; real label noise is mostly between classes that look alike (shirt
  and T-shirt), which scores much closer to clean data. The calibration fits the pool with both kinds (curate/mixture.py).

Anchors enter the batches, and the proxy's re-weighted loss, exactly as pool samples do: a trusted
sample is scored as a clean pool sample would be, a synthetic one as a mismatched pool pair. Their
rows carry ``anchor`` = ``trusted``, ``synthetic`` or ``confusable``; a synthetic row's shard is its
image's shard with ``#synthetic`` appended and its key ``IMAGE_KEY~PARTNER_KEY``; a confusable row's
shard ends in ``#confusable`` and its key is ``IMAGE_KEY~confusable``. Downstream, nothing counts them
as pool samples (curate/duck.py keeps them apart).
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mimicfilter.errors import MimicfilterError
from mimicfilter.shards.decode import DecodeConfig, format_problem
from mimicfilter.shards.records import RawSample
from mimicfilter.shards.samples import count_shard_samples, iter_shard_samples
from mimicfilter.store.schema import CONFUSABLE, SYNTHETIC, TRUSTED

SYNTHETIC_SUFFIX, CONFUSABLE_SUFFIX = "#synthetic", "#confusable"  # appended to the image's shard
MAX_TRUSTED = 20_000  # held in memory by every scoring process
COUNTED_SHARDS = 256  # shards whose headers are counted for the pool's size (evenly spaced beyond that)
MIN_SYNTHETIC = 200  # synthetic negatives aimed at when there are fewer trusted samples


@dataclass(frozen=True)
class AnchorPlan:
    """What a run scores beside its pool; part of the run's fingerprint."""

    trusted_shards: tuple[str, ...]
    pool_shards: tuple[str, ...]
    pool_estimate: int  # the pool's size, estimated from its shards' headers (spreads the trusted samples)
    trusted_samples: int
    synthetic_share: float  # chance that a pool sample's pair makes a synthetic negative
    partner_files: tuple[str, ...]  # what a synthetic pair takes from its partner: the caption or label file
    seed: int = 0
    allow_pipe: bool = False
    confusable: bool = False  # labelled images: each chosen sample also makes a confusable negative

    def provenance(self) -> dict:
        return {"trusted": list(self.trusted_shards), "trusted_samples": self.trusted_samples,
                "pool_estimate": self.pool_estimate, "synthetic_share": self.synthetic_share,
                "synthetic": f"the {'/'.join(self.partner_files)} of the next chosen sample of the same shard",
                **({"confusable": "the reference's most likely class after the image's own label"}
                   if self.confusable else {}),
                "seed": self.seed}

    @functools.cached_property
    def _shard_numbers(self) -> dict[str, int]:
        return {shard: number for number, shard in enumerate(self.pool_shards)}

    def trusted_for(self, shard: str) -> tuple[RawSample, ...]:
        """Static scoring: the trusted samples pool shard ``shard`` carries (j mod S)."""
        number = self._shard_numbers.get(shard)
        trusted = read_trusted(self.trusted_shards, self.allow_pipe)
        return () if number is None else trusted[number::len(self.pool_shards)]

    def chosen(self, sample: RawSample) -> bool:
        """Whether this pool sample's pair makes a synthetic negative (a seeded hash: the same everywhere,
        wherever the pool lies)."""
        name = f"{self.seed}\x00{shard_file_name(sample.shard)}\x00{sample.key}\x00{sample.index}"
        digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 < self.synthetic_share


def shard_file_name(shard: str) -> str:
    """The shard's file name (a path's or a URL's last part): what seeds its anchors, so a pool copied or
    moved elsewhere gets the same synthetic negatives."""
    return shard.rstrip("/").rsplit("/", 1)[-1]


def partner_files(decode: DecodeConfig) -> tuple[str, ...]:
    """The file a synthetic pair takes from its partner: the label, the caption, or the json holding it."""
    if decode.task == "classify":
        return (decode.label_key.lower(),)
    return ("json",) if decode.json_field is not None else (decode.text_key.lower(),)


def estimate_pool_size(shards: tuple[str, ...], allow_pipe: bool) -> int:
    """Samples in the shards: counted from headers (up to COUNTED_SHARDS evenly spaced shards, scaled)."""
    step = max(1, len(shards) // COUNTED_SHARDS)
    counted = shards[::step][:COUNTED_SHARDS]
    with ThreadPoolExecutor(max(1, min(16, len(counted)))) as readers:
        total = sum(readers.map(lambda shard: count_shard_samples(shard, allow_pipe=allow_pipe), counted))
    return round(total * len(shards) / len(counted))


@functools.lru_cache(maxsize=4)
def read_trusted(shards: tuple[str, ...], allow_pipe: bool) -> tuple[RawSample, ...]:
    """Every sample of the trusted shards, flagged ``trusted`` (read once per process)."""
    samples = []
    for shard in shards:
        for sample in iter_shard_samples(shard, allow_pipe=allow_pipe):
            sample.anchor = TRUSTED
            samples.append(sample)
            if len(samples) > MAX_TRUSTED:
                raise MimicfilterError(f"--trusted holds more than {MAX_TRUSTED} samples",
                                       hint="a few hundred checked samples calibrate the estimate (docs/filter.md)")
    return tuple(samples)


def plan_anchors(trusted: tuple[str, ...], pool_shards: tuple[str, ...], decode: DecodeConfig, seed: int,
                 synthetic_share: float | None, allow_pipe: bool) -> AnchorPlan:
    """The plan for ``--trusted`` shards (read and counted now, so a bad spec fails before any model loads)."""
    samples = read_trusted(trusted, allow_pipe)
    if not samples:
        raise MimicfilterError("--trusted holds no samples", hint="pass shards of checked samples, like the pool's")
    problems = [problem for problem in (format_problem(sample, decode) for sample in samples) if problem]
    if len(problems) == len(samples):  # shards of another format: scoring them would calibrate nothing
        raise MimicfilterError(f"none of the {len(samples)} --trusted samples can be scored: {problem_counts(problems)}",
                               hint="pass readable shards in the pool's format (its image and caption or label keys)")
    estimate = estimate_pool_size(pool_shards, allow_pipe)
    if synthetic_share is None:
        synthetic_share = min(0.5, max(len(samples), MIN_SYNTHETIC) / max(1, estimate))
    return AnchorPlan(trusted, pool_shards, estimate, len(samples), round(synthetic_share, 6), partner_files(decode),
                      seed, allow_pipe, confusable=decode.task == "classify")


def problem_counts(problems: list[tuple[str, str]]) -> str:
    """``missing_text ×500 (no caption file (txt))``: each status with its count and its first error."""
    counts = Counter(status for status, _ in problems)
    first = {}
    for status, error in problems:
        first.setdefault(status, error)
    return ", ".join(f"{status} ×{count} ({first[status]})" for status, count in counts.most_common())


def _synthetic(image: RawSample, partner: RawSample, plan: AnchorPlan) -> RawSample | None:
    """The image of ``image`` with the caption or label of ``partner`` (None when they are the same)."""
    taken = {name: partner.files[name] for name in plan.partner_files if name in partner.files}
    if all(image.files.get(name) == data for name, data in taken.items()):
        return None
    files = {name: data for name, data in image.files.items() if name not in plan.partner_files} | taken
    return RawSample(image.shard + SYNTHETIC_SUFFIX, f"{image.key}~{partner.key}", image.index, files,
                     anchor=SYNTHETIC)


def with_synthetic(samples: Iterable[RawSample], plan: AnchorPlan) -> Iterator[RawSample]:
    """The samples, each chosen one followed by its synthetic pair (its image with the caption or label
    of a random earlier chosen sample of its shard) and, for labelled images, its confusable negative; a
    shard's first chosen sample is paired with a random later one when the shard ends."""
    shard: str | None = None
    first: RawSample | None = None
    partners: list[RawSample] = []  # the shard's chosen samples so far, with their partner files only
    rng = random.Random()

    def close_shard() -> Iterator[RawSample]:
        if first is not None and len(partners) > 1 and (made := _synthetic(first, rng.choice(partners[1:]), plan)):
            yield made

    for sample in samples:
        if sample.anchor is None and sample.shard != shard:
            yield from close_shard()
            shard, first, partners = sample.shard, None, []
            rng = random.Random(f"{plan.seed}\x00{shard_file_name(shard)}")
        yield sample
        if sample.anchor is not None or sample.status != "ok" or not plan.chosen(sample):
            continue
        if partners and (made := _synthetic(sample, rng.choice(partners), plan)):
            yield made
        if plan.confusable:
            yield RawSample(sample.shard + CONFUSABLE_SUFFIX, f"{sample.key}~{CONFUSABLE}", sample.index,
                            dict(sample.files), anchor=CONFUSABLE)
        if first is None:
            first = sample
        partners.append(RawSample(sample.shard, sample.key, sample.index,
                                  {name: sample.files[name] for name in plan.partner_files if name in sample.files}))
    yield from close_shard()


def spread_trusted(samples: Iterable[RawSample], trusted: tuple[RawSample, ...], expected: float) -> Iterator[RawSample]:
    """The samples with ``trusted`` inserted evenly: trusted j after pool sample ⌊(j+1)·expected/(T+1)⌋
    (``expected``: how many pool samples there are; the ones not placed by then come at the end)."""
    places = [int((j + 1) * expected / (len(trusted) + 1)) for j in range(len(trusted))]
    placed = seen = 0
    for sample in samples:
        yield sample
        if sample.anchor is None:
            seen += 1
            while placed < len(trusted) and places[placed] <= seen:
                yield trusted[placed]
                placed += 1
    yield from trusted[placed:]


def _set_aside(samples: Iterable[RawSample], plan: AnchorPlan, made: deque) -> Iterator[RawSample]:
    """The pool samples alone; each synthetic negative goes to ``made`` with the number of pool samples
    read before it."""
    read = 0
    for sample in with_synthetic(samples, plan):
        if sample.anchor is None:
            read += 1
            yield sample
        else:
            made.append((read, sample))


def pool_with_anchors(samples: Iterable[RawSample], plan: AnchorPlan | None, shard: str | None = None,
                      reorder: Callable[[Iterable[RawSample]], Iterator[RawSample]] | None = None) -> Iterator[RawSample]:
    """The raw stream with its anchors: one pool shard's (static, ``shard``) or a whole epoch's.

    ``reorder`` (a trajectory's seeded shuffle) sees the pool samples alone, so the pool's order — and so
    every pool batch — is the one a run without anchors has; each synthetic negative follows the pool
    sample after which it was made (counted in the reordered stream), and the trusted samples are spread
    over the reordered stream."""
    reorder = reorder or iter
    if plan is None:
        return reorder(samples)
    if shard is None:
        trusted, expected = read_trusted(plan.trusted_shards, plan.allow_pipe), plan.pool_estimate
    else:
        trusted, expected = plan.trusted_for(shard), plan.pool_estimate / max(1, len(plan.pool_shards))
    made: deque = deque()
    return spread_trusted(_merge_made(reorder(_set_aside(samples, plan, made)), made), trusted, expected)


def _merge_made(pool: Iterator[RawSample], made: deque) -> Iterator[RawSample]:
    given = 0
    for sample in pool:
        yield sample
        given += 1
        while made and made[0][0] <= given:
            yield made.popleft()[1]
    while made:
        yield made.popleft()[1]
