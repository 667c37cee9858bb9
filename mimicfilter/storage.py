"""Where run directories live: a local path, or an fsspec URL (s3://, gs://, az://, memory://…).

Local paths stay :class:`pathlib.Path` and keep POSIX atomicity (temp file + rename, link-if-absent).
URLs become :class:`upath.UPath` objects with the same small API (``/``, ``exists``, ``glob``,
``open``…). Object stores publish an object only when its upload completes, so a part written with
one ``open("wb")`` is never seen half-written; what they cannot do is rename or create-if-absent,
which is why a remote run.json is written by whoever comes first and checked by the others
(docs/scale.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Union

from mimicfilter.errors import MimicfilterError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

RunPath = Union[Path, Any]  # pathlib.Path or upath.UPath


def run_path(location: str | Path) -> RunPath:
    """A run directory location: ``file://`` and plain paths are local, other URLs go through fsspec."""
    if isinstance(location, Path):
        return location
    text = str(location)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    if not _URL.match(text):
        return Path(text)
    try:
        from upath import UPath

        path = UPath(text)
        path.fs  # noqa: B018 - resolves the protocol's filesystem now, so a missing driver fails here
    except (ImportError, ValueError) as error:
        raise MimicfilterError(
            f"cannot use {text}: {error}", hint="install the fsspec driver for this URL (s3fs, gcsfs, adlfs…)"
        ) from error
    return path


def is_url(text: str) -> bool:
    """An fsspec URL other than file:// (those are plain local paths)."""
    return bool(_URL.match(text)) and not text.startswith("file://")


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
