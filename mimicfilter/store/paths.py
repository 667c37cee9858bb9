"""Locations and names: run directories (local paths or fsspec URLs) and their whole layout (parts,
checkpoints, rank stats), shard display names, part names.

Local paths stay :class:`pathlib.Path` and keep POSIX atomicity (temp file + rename, link-if-absent).
URLs become :class:`upath.UPath` objects with the same small API (``/``, ``exists``, ``glob``,
``open``…). Object stores publish an object only when its upload completes, so a part written with
one ``open("wb")`` is never seen half-written; what they cannot do is rename or create-if-absent,
which is why a remote run.json is written by whoever comes first and checked by the others
(docs/scale.md).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Union

from mimicfilter.errors import MimicfilterError

# "s3://", "gs://", "https://", "file://" ... but not a Windows drive ("C:\\") or "pipe:".
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_SHARD_SUFFIX = re.compile(r"(\.tar(\.(gz|bz2|xz|zst|lz4))?|\.tgz)$", re.IGNORECASE)
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
LOCAL_SCHEME = "file://"

RunPath = Union[Path, Any]  # pathlib.Path or upath.UPath

# The run directory's layout (docs/formats.md); the paths below are the one place its names are spelled.
RUN_FILE = "run.json"  # provenance and the fingerprint of the command that owns the directory
STATS_FILE = "stats.json"
SUCCESS_FILE = "_SUCCESS"  # written last: the run is complete
SCORES_DIR = "scores"  # one Parquet part per shard (static) or per epoch chunk (trajectory)
CHECKPOINTS_DIR = "checkpoints"  # trajectory resume state
RANKS_DIR = "ranks"  # per-rank stats of partitioned runs
_TRAJECTORY_PART = re.compile(r"^epoch-(\d+)-chunk-\d+\.parquet$")


def is_url(text: str) -> bool:
    """Whether ``text`` has a URL scheme (``file://`` included: a shard URL is passed to fsspec as is)."""
    return bool(_URL.match(text))


def is_remote_url(text: str) -> bool:
    """A URL that is not a local path: ``file://`` names a local directory, every other scheme goes to fsspec."""
    return is_url(text) and not text.startswith(LOCAL_SCHEME)


def run_path(location: str | Path) -> RunPath:
    """A run directory location: ``file://`` and plain paths are local, other URLs go through fsspec."""
    if isinstance(location, Path):
        return location
    text = str(location)
    if text.startswith(LOCAL_SCHEME):
        return Path(text[len(LOCAL_SCHEME) :])
    if not is_url(text):
        return Path(text)
    try:
        from upath import UPath

        path = UPath(text)
        path.fs  # noqa: B018 - resolves the protocol's filesystem now, so a missing driver fails here
    except (ImportError, ValueError) as error:
        raise MimicfilterError(
            f"cannot use {text}: {' '.join(str(error).split())[:200]}", hint=driver_hint(text.split("://", 1)[0])
        ) from error
    return path


# The extra of mimicfilter that installs each URL scheme's fsspec driver (pyproject.toml's optional
# dependencies); the default install reads local files only.
DRIVER_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http",
                 "az": "azure", "abfs": "azure", "abfss": "azure", "adl": "azure"}


def driver_hint(scheme: str) -> str:
    extra = DRIVER_EXTRAS.get(scheme.lower())
    return f"pip install 'mimicfilter[{extra}]'" if extra else f"install the fsspec driver for {scheme}://"


def check_url_drivers(urls: list[str], what: str) -> None:
    """Fail now, with one line naming the package to install, when an fsspec driver for a scheme of
    ``urls`` is missing: without it every remote shard would fail to read, one by one."""
    schemes = sorted({url.split("://", 1)[0].lower() for url in urls if is_remote_url(url)})
    for scheme in schemes:
        try:
            import fsspec

            fsspec.get_filesystem_class(scheme)
        except (ImportError, ValueError) as error:
            example = next(url for url in urls if url.lower().startswith(scheme + "://"))
            raise MimicfilterError(f"cannot read {what} {example}: no fsspec driver for {scheme}:// is installed "
                                   f"({' '.join(str(error).split())[:120]})", hint=driver_hint(scheme)) from None


def is_remote(path: RunPath) -> bool:
    return not isinstance(path, Path)


def remove_tree(path: RunPath) -> None:
    """Delete a directory and everything below it, if it exists."""
    if is_remote(path):
        if path.exists():
            path.fs.rm(path.path, recursive=True)
        return
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def arrow_source(path: RunPath) -> dict[str, Any]:
    """Arguments that let pyarrow read ``path``: a local name, or the fsspec filesystem and its path."""
    if is_remote(path):
        return {"source": path.path, "filesystem": path.fs}
    return {"source": str(path)}


def shard_display_name(url: str) -> str:
    """Short human name of a shard: basename without .tar / .tar.gz (used in messages)."""
    text = url[len("pipe:") :].split()[-1] if url.startswith("pipe:") and url[5:].split() else url
    if is_url(text):
        text = re.split(r"[?#]", text, maxsplit=1)[0]  # drop query strings such as signed-URL tokens
    base = text.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    return _SHARD_SUFFIX.sub("", base) or base or "shard"


def part_name(url: str) -> str:
    """Stable, filesystem-safe part-file stem: ``{basename}-{sha1(url)[:10]}``.

    The hash keeps equal basenames from different folders/buckets apart; the basename keeps it readable.
    """
    stem = _UNSAFE_NAME_CHARS.sub("_", shard_display_name(url)).strip("._")[:80] or "shard"
    return f"{stem}-{hashlib.sha1(url.encode('utf-8')).hexdigest()[:10]}"


def part_path(run_dir: RunPath, shard: str) -> RunPath:
    """Where the part of one shard goes (static scoring, embed, extrapolate)."""
    return run_dir / SCORES_DIR / f"{part_name(shard)}.parquet"


def trajectory_part_path(run_dir: RunPath, epoch: int, chunk: int) -> RunPath:
    """A trajectory's part: the rows of one epoch between two checkpoints."""
    return run_dir / SCORES_DIR / f"epoch-{epoch:04d}-chunk-{chunk:05d}.parquet"


def trajectory_part_epoch(name: str) -> int | None:
    """The epoch of a trajectory part's file name (:func:`trajectory_part_path`); None for other names."""
    match = _TRAJECTORY_PART.match(name)
    return int(match.group(1)) if match else None


def latest_checkpoint_path(run_dir: RunPath) -> RunPath:
    """A trajectory's resume state: proxy, optimizer and stream position, replaced at every checkpoint."""
    return run_dir / CHECKPOINTS_DIR / "latest.pt"


def epoch_checkpoint_path(run_dir: RunPath, epoch: int) -> RunPath:
    """The proxy's trained layers at the end of ``epoch`` (written once the epoch's parts are)."""
    return run_dir / CHECKPOINTS_DIR / f"epoch-{epoch:04d}.pt"


def rank_stats_path(run_dir: RunPath, rank: int, world_size: int) -> RunPath:
    """One rank's own stats in a partitioned run (stats.json is the last rank's)."""
    return run_dir / RANKS_DIR / f"rank-{rank:05d}-of-{world_size:05d}.json"
