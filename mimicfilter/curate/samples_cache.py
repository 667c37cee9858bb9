"""The per-sample aggregation, kept with the filter's manifest so that ``report`` does not repeat it.

``filter`` aggregates every sample's epoch rows (curate/votes.py) and estimates the pool's quality
(curate/estimate.py); its manifest then holds every column of that per-sample table, one row per
sample. The manifest's Parquet metadata gets a **record** (key ``mimicfilter_samples``) saying
what the table was made from:

* the score parts: their count and a SHA-256 over each part's resolved path, size and
  modification time (taken before the filter read them);
* the aggregation options (``--binarize``, ``--combine-votes``);
* the code: the mimicfilter version and a SHA-256 of the source of the ``curate`` modules and the
  table schema;
* the result that is not in the rows: the vote aggregation (thresholds, mixtures) and the quality
  estimate, and the number of samples.

``report --filter-manifest`` reads the record (the file's footer only) and uses the manifest as its
per-sample table when every item matches what it would compute now; otherwise it says why
(:class:`Reuse`) and aggregates the score parts itself. The record lives inside the manifest, which
is written atomically and published with ``summary.json`` as one unit, so it can never describe
another file. Parts on remote filesystems get no record: their modification times are not compared.
Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import pyarrow.parquet as pq

from mimicfilter.curate.estimate import QualityEstimate
from mimicfilter.curate.votes import AggregateConfig
from mimicfilter.errors import MimicfilterError
from mimicfilter.store import schema
from mimicfilter.store.paths import is_remote_url
from mimicfilter.version import __version__

RECORD_KEY = b"mimicfilter_samples"
RECORD_FORMAT = 1
# the manifest columns the report reads as its per-sample table (besides the optional ones)
REQUIRED_COLUMNS = ("shard", "key", "index", "status", "error", "epochs", "mimic_score", "clip_score",
                    "label", "vote_keep", "kept", "reason")


def parts_fingerprint(files: Sequence[str]) -> dict | None:
    """Count and SHA-256 of the parts' resolved paths, sizes and modification times (order-free);
    None when a part is remote or cannot be looked at (nothing is cached then)."""
    entries = []
    for file in files:
        if is_remote_url(file):
            return None
        try:
            info = os.stat(file)
        except OSError:
            return None
        entries.append(f"{os.path.realpath(file)}\0{info.st_size}\0{info.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()
    return {"count": len(entries), "sha256": digest}


def code_fingerprint() -> str:
    """SHA-256 of the source of the modules that aggregate and estimate: all of ``curate``, and the
    table schema (which columns are scores, what counts as non-finite)."""
    digest = hashlib.sha256(__version__.encode())
    for path in [*sorted(Path(__file__).parent.glob("*.py")), Path(schema.__file__)]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _options(config: AggregateConfig) -> dict:
    return {"binarize": config.binarize, "combine_votes": config.combine_votes}


def samples_record(parts: dict | None, config: AggregateConfig, aggregation: dict, estimate: QualityEstimate,
                   samples: int) -> dict[bytes, bytes]:
    """The manifest metadata describing its per-sample table (empty when the parts are remote)."""
    if parts is None:
        return {}
    record = {"format": RECORD_FORMAT, "code": code_fingerprint(), "parts": parts, "options": _options(config),
              "samples": samples, "aggregation": aggregation, "quality": estimate.as_dict()}
    return {RECORD_KEY: json.dumps(record, sort_keys=True).encode()}


@dataclass(frozen=True)
class Reuse:
    """Whether a manifest's per-sample table may stand for a fresh aggregation, and why not."""

    manifest: str
    aggregation: dict | None = None  # set when reusable
    estimate: QualityEstimate | None = None
    reason: str | None = None  # why not, when not
    file_state: tuple[int, int, int] | None = None  # the manifest's inode, size and mtime when checked
    stale: bool = False  # the manifest was made from other score parts: its decisions are not of these scores

    @property
    def usable(self) -> bool:
        return self.reason is None

    def confirm_unchanged(self) -> None:
        """The report reads the manifest several times: refuse it if a filter replaced it meanwhile."""
        if self.usable and _file_state(self.manifest) != self.file_state:
            raise MimicfilterError(f"--filter-manifest {self.manifest} was replaced while the report read it",
                                   hint="run the report again once the filter has finished")

    def as_dict(self) -> dict:
        if self.usable:
            return {"from": "filter manifest", "manifest": self.manifest}
        return {"from": "score parts", "manifest": self.manifest, "not_reused": self.reason}


def _file_state(path: str) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


def _estimate_of(values: dict) -> QualityEstimate:
    names = [field.name for field in fields(QualityEstimate)]
    missing = [name for name in names if name not in values]
    if missing:
        raise KeyError(", ".join(missing))
    return QualityEstimate(**{name: values[name] for name in names} | {"warnings": tuple(values["warnings"])})


def check_reuse(manifest: str | Path, files: Sequence[str], config: AggregateConfig) -> Reuse:
    """Read the manifest's record and compare it with the run's parts and the options given now."""
    manifest = str(manifest)

    def refused(why: str, stale: bool = False) -> Reuse:
        return Reuse(manifest, reason=why, stale=stale)

    state = _file_state(manifest)
    try:
        metadata = pq.read_metadata(manifest)
        raw = (metadata.schema.to_arrow_schema().metadata or {}).get(RECORD_KEY)
    except (OSError, ValueError) as error:
        return refused(f"its footer cannot be read ({' '.join(str(error).split())[:120]})")
    if raw is None:
        return refused("it carries no record of its per-sample table (written by an older filter)")
    try:
        record = json.loads(raw)
        if record.get("format") != RECORD_FORMAT or record.get("code") != code_fingerprint():
            return refused("it was written by another version of mimicfilter")
        parts = parts_fingerprint(files)
        if parts is None:
            return refused("the score parts are remote (their modification times are not compared)")
        if record["parts"] != parts:
            return refused(f"the score parts changed since the filter read them ({record['parts']['count']} parts "
                           f"then, {parts['count']} now; names, sizes or modification times differ)", stale=True)
        if record["options"] != _options(config):
            then, now = (", ".join(f"{name} {value}" for name, value in sorted(options.items()))
                         for options in (record["options"], _options(config)))
            return refused(f"it was aggregated with other options ({then}; asked now: {now})")
        if record["samples"] != metadata.num_rows:
            return refused(f"it holds {metadata.num_rows} rows, its record says {record['samples']}")
        columns = set(metadata.schema.names)
        if not set(REQUIRED_COLUMNS) <= columns:
            return refused(f"it lacks column(s) {', '.join(sorted(set(REQUIRED_COLUMNS) - columns))}")
        return Reuse(manifest, record["aggregation"], _estimate_of(record["quality"]), file_state=state)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return refused(f"its record is damaged ({type(error).__name__}: {str(error)[:80]})")
