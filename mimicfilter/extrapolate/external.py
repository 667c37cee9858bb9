"""Embeddings users already have (``extrapolate --features-from``): no model pass over the pool.

Two layouts, one unit of work per file:

* **DataComp**: ``NNNNNNNN.npz`` beside ``NNNNNNNN.parquet``. The parquet holds one row per sample
  with its ``uid`` (and, after img2dataset, its ``key``); the npz holds row-aligned float16 arrays
  such as ``b32_img``, ``b32_txt``, ``l14_img``, ``l14_txt`` (CLIP ViT-B/32 and ViT-L/14 image and
  text embeddings). ``--embedding-column`` names the image array and optionally the text array
  (default: ``l14_img,l14_txt``, else ``b32_img,b32_txt``, whichever the first file has).
* **Parquet**: any Parquet file with an id column and an embedding column (a list of floats per
  row; default ``embedding`` and, when present, ``text_embedding``: an ``embed`` run's parts qualify).

Samples are matched to the scored run by ``--id-column`` (``uid`` by default, or ``key``). Rows of
these files name the file itself as their ``shard`` and their row position as ``index``; ``key`` is
the file's ``key`` column when it has one, else the id.
"""

from __future__ import annotations

import glob
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mimicfilter.errors import MimicfilterError, one_line
from mimicfilter.extrapolate.features import unit_rows
from mimicfilter.extrapolate.overlap import SortedIds
from mimicfilter.extrapolate.sources import Scored, ScoredVectors, VectorCollector

ID_COLUMNS = ("uid", "key")
NPZ_DEFAULTS = (("l14_img", "l14_txt"), ("b32_img", "b32_txt"))
PARQUET_DEFAULTS = ("embedding", "text_embedding")
NO_EMBEDDING = "missing_image"  # the status of a row whose embedding is null, zero or not finite
NO_ID = "decode_error"  # the status of a row without its id (the sample it stands for cannot be told)


@dataclass(frozen=True)
class ExternalSpec:
    """``--features-from`` paths (files, directories, globs), the embedding column(s) and the id column."""

    paths: tuple[str, ...]
    columns: tuple[str, ...] = ()  # image[, text]; () = the layout's default
    id_column: str = "uid"

    def __post_init__(self):
        if self.id_column not in ID_COLUMNS:
            raise MimicfilterError(f"--id-column {self.id_column}: choose one of {', '.join(ID_COLUMNS)}")
        if len(self.columns) > 2:
            raise MimicfilterError(f"--embedding-column {','.join(self.columns)}: one image column and at most one text column")


@dataclass(frozen=True)
class ExternalFile:
    path: str  # absolute
    layout: str  # npz | parquet

    @property
    def metadata(self) -> str:
        """The file holding the ids: the npz's parquet, or the parquet itself."""
        return str(Path(self.path).with_suffix(".parquet")) if self.layout == "npz" else self.path


def _files_of(path: str) -> list[ExternalFile]:
    if any(char in path for char in "*?["):
        found = sorted(glob.glob(path))
        if not found:
            raise MimicfilterError(f"--features-from {path}: no file matches")
        return [file for match in found for file in _files_of(match)]
    target = Path(path).absolute()
    if target.is_dir():
        npz = sorted(target.glob("*.npz"))
        files = npz or sorted(target.glob("*.parquet"))
        if not files:
            raise MimicfilterError(f"--features-from {path}: the folder holds no .npz or .parquet files")
        return [ExternalFile(str(file), "npz" if npz else "parquet") for file in files]
    if not target.is_file():
        raise MimicfilterError(f"--features-from {path}: no such file or folder")
    if target.suffix == ".npz":
        return [ExternalFile(str(target), "npz")]
    if target.suffix == ".parquet":
        return [ExternalFile(str(target), "parquet")]
    raise MimicfilterError(f"--features-from {path}: not a .npz or .parquet file",
                           hint="pass DataComp .npz files (with their .parquet beside them) or Parquet files")


def list_files(spec: ExternalSpec) -> list[ExternalFile]:
    """Every file of the spec, in order, each once; an npz without its parquet is refused."""
    seen: dict[str, ExternalFile] = {}
    for path in spec.paths:
        for file in _files_of(path):
            seen.setdefault(file.path, file)
    for file in seen.values():
        if file.layout == "npz" and not Path(file.metadata).is_file():
            raise MimicfilterError(f"{file.path} has no {Path(file.metadata).name} beside it",
                                   hint="DataComp layout: NNNNNNNN.npz with NNNNNNNN.parquet (one row per sample, with its uid)")
    return list(seen.values())


@dataclass(frozen=True)
class Opened:
    """``--features-from`` opened: its files (checked from headers and footers), the columns read and
    their width, and the space a run records (layout, columns, dim, id column, file count)."""

    files: list[ExternalFile]
    columns: tuple[str, ...]
    dim: int
    space: dict[str, Any]


def open_features(spec: ExternalSpec) -> Opened:
    """Every file of ``spec``, one layout, checked before any is read: a bad file stops a run
    before anything is written."""
    files = list_files(spec)
    if len({file.layout for file in files}) > 1:
        raise MimicfilterError("--features-from mixes .npz and .parquet files", hint="give one layout per run")
    columns = resolve_columns(spec, files[0])
    dim = None
    for file in files:
        dim = check_file(file, columns, spec.id_column, dim)
    space = {"source": "features-from", "layout": files[0].layout, "columns": list(columns), "dim": dim,
             "id_column": spec.id_column, "files": len(files)}
    return Opened(files, columns, int(dim), space)


def _open_npz(path: str) -> Any:
    _npz_shapes(path)  # readable, not empty
    return np.load(path, allow_pickle=False)


def resolve_columns(spec: ExternalSpec, first: ExternalFile) -> tuple[str, ...]:
    """The embedding column(s) to read: as given, or the layout's default found in the first file."""
    if first.layout == "npz":
        present = set(_npz_shapes(first.path))
    else:
        present = set(pq.read_schema(first.path).names)
    if spec.columns:
        missing = [name for name in spec.columns if name not in present]
        if missing:
            raise MimicfilterError(f"{first.path} has no {' or '.join(missing)} (it has: {', '.join(sorted(present))})",
                                   hint="pick them with --embedding-column IMAGE[,TEXT]")
        return spec.columns
    candidates = NPZ_DEFAULTS if first.layout == "npz" else (PARQUET_DEFAULTS,)
    for image, text in candidates:
        if image in present:
            return (image, text) if text in present else (image,)
    raise MimicfilterError(f"{first.path} has none of the default embedding columns "
                           f"({', '.join(pair[0] for pair in candidates)}; it has: {', '.join(sorted(present)[:12])})",
                           hint="name them with --embedding-column IMAGE[,TEXT]")


def _ids_table(file: ExternalFile, id_column: str, extra: tuple[str, ...] = ()) -> pa.Table:
    schema = pq.read_schema(file.metadata)
    if id_column not in schema.names:
        raise MimicfilterError(f"{file.metadata} has no {id_column} column",
                               hint="samples are matched to the scored run by --id-column (uid or key)")
    wanted = [id_column] + [name for name in (*ID_COLUMNS, "label", *extra) if name in schema.names and name != id_column]
    return pq.read_table(file.metadata, columns=wanted)


def read_ids(file: ExternalFile, id_column: str) -> pa.Array:
    """The file's sample ids, as strings."""
    return _ids_table(file, id_column).column(id_column).combine_chunks().cast(pa.string())


def _parquet_vectors(column: pa.ChunkedArray, name: str, path: str, dim: int | None) -> np.ndarray:
    array = column.combine_chunks()
    if not (pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type) or pa.types.is_large_list(array.type)):
        raise MimicfilterError(f"{path}: column {name} is {array.type}, not a list of floats per row")
    lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
    width = int(lengths.max()) if len(lengths) else (dim or 0)
    if dim is not None and len(lengths) and width != dim:
        raise MimicfilterError(f"{path}: column {name} holds {width}-d embeddings, expected {dim}",
                               hint="every file, and the scored side, must come from the same model")
    if ((lengths != width) & array.is_valid().to_numpy(zero_copy_only=False)).any():
        raise MimicfilterError(f"{path}: column {name} has rows of different lengths")
    filled = pc.if_else(array.is_valid(), array, pa.scalar([0.0] * width, type=pa.list_(pa.float32())).cast(array.type)) \
        if array.null_count else array
    flat = pc.list_flatten(filled).to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float16).reshape(len(array), width)


def read_vectors(file: ExternalFile, columns: tuple[str, ...], rows: int, dim: int | None) -> np.ndarray:
    """The file's embeddings [rows, sides, d] (float16), checked against its row count and ``dim``."""
    sides = []
    if file.layout == "npz":
        with _open_npz(file.path) as archive:
            for name in columns:
                if name not in archive.files:
                    raise MimicfilterError(f"{file.path} has no array {name} (it has: {', '.join(archive.files)})")
                sides.append(archive[name])
    else:
        table = pq.read_table(file.path, columns=list(columns))
        sides = [_parquet_vectors(table.column(name), name, file.path, dim) for name in columns]
    for name, side in zip(columns, sides):
        if side.ndim != 2 or len(side) != rows:
            raise MimicfilterError(f"{file.path}: {name} has shape {side.shape}, expected ({rows}, d): one row per "
                                   f"sample of {Path(file.metadata).name}")
        expected = dim if dim is not None else sides[0].shape[1]
        if side.shape[1] != expected:
            raise MimicfilterError(f"{file.path}: {name} holds {side.shape[1]}-d embeddings, expected {expected}",
                                   hint="every file, and the scored side, must come from the same model")
    return np.stack([np.asarray(side, dtype=np.float16) for side in sides], axis=1)


def _npz_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The shapes of an npz's arrays, from their headers alone (no data read)."""
    shapes = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if member.endswith(".npy"):
                    with archive.open(member) as stream:
                        version = np.lib.format.read_magic(stream)
                        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                        shapes[member[: -len(".npy")]] = read(stream)[0]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise MimicfilterError(f"{path} is not a readable .npz ({one_line(str(error), 120)})") from None
    if not shapes:
        raise MimicfilterError(f"{path} is empty: it holds no arrays", hint="DataComp .npz files hold b32_img, l14_img, ...")
    return shapes


def check_file(file: ExternalFile, columns: tuple[str, ...], id_column: str, dim: int | None) -> int:
    """Check a file before any is read (ids, arrays, rows, width, from headers and footers);
    returns the embedding width (``dim`` when given)."""
    schema = pq.read_schema(file.metadata)
    if id_column not in schema.names:
        raise MimicfilterError(f"{file.metadata} has no {id_column} column",
                               hint="samples are matched to the scored run by --id-column (uid or key)")
    rows = row_count(file)
    if file.layout == "npz":
        shapes = _npz_shapes(file.path)
        for name in columns:
            if name not in shapes:
                raise MimicfilterError(f"{file.path} has no array {name} (it has: {', '.join(sorted(shapes))})")
            shape = shapes[name]
            if len(shape) != 2 or shape[0] != rows:
                raise MimicfilterError(f"{file.path}: {name} has shape {shape}, expected ({rows}, d): one row per "
                                       f"sample of {Path(file.metadata).name}")
            if dim is not None and shape[1] != dim:
                raise MimicfilterError(f"{file.path}: {name} holds {shape[1]}-d embeddings, expected {dim}",
                                       hint="every file, and the scored side, must come from the same model")
            dim = shape[1]
        return int(dim)
    for name in columns:
        if name not in schema.names:
            raise MimicfilterError(f"{file.path} has no column {name} (it has: {', '.join(schema.names)})")
        kind = schema.field(name).type
        if pa.types.is_fixed_size_list(kind) and dim is not None and kind.list_size != dim:
            raise MimicfilterError(f"{file.path}: column {name} holds {kind.list_size}-d embeddings, expected {dim}",
                                   hint="every file, and the scored side, must come from the same model")
    return dim if dim is not None else int(read_vectors(file, columns, rows, None).shape[2])


@dataclass
class ExternalRows:
    """One file's samples: identity columns (the score schema's), their unit vectors, which are usable."""

    identity: pa.Table  # shard, key, uid, index, status, error, label
    ids: pa.Array  # the --id-column values
    vectors: np.ndarray  # [n, sides, d] float16
    usable: np.ndarray  # [n] bool


def read_file(file: ExternalFile, columns: tuple[str, ...], id_column: str, dim: int) -> ExternalRows:
    table = _ids_table(file, id_column)
    count = table.num_rows
    ids = table.column(id_column).combine_chunks().cast(pa.string())
    vectors, usable = unit_rows(read_vectors(file, columns, count, dim))
    key = table.column("key").combine_chunks().cast(pa.string()) if "key" in table.column_names else ids
    uid = table.column("uid").combine_chunks().cast(pa.string()) if "uid" in table.column_names else pa.nulls(count, pa.string())
    label = table.column("label").combine_chunks().cast(pa.int32()) if "label" in table.column_names else pa.nulls(count, pa.int32())
    why = f"no usable embedding in {Path(file.path).name} (null, zero, not finite, or beyond float16's ±65504)"
    # a row without its id names no sample: a status row, never a score nobody can match
    named = ids.is_valid().to_numpy(zero_copy_only=False)
    unnamed = f"no {id_column} in {Path(file.path).name}"
    usable = usable & named
    identity = pa.table({
        "shard": pa.array([file.path] * count, pa.string()),
        "key": pc.if_else(key.is_valid(), key, pa.scalar("", pa.string())),
        "uid": uid,
        "index": pa.array(np.arange(count, dtype=np.int32)),
        "status": pa.array(np.where(usable, "ok", np.where(named, NO_EMBEDDING, NO_ID)).tolist(), pa.string()),
        "error": pa.array([None if ok else why if has_id else unnamed for ok, has_id in zip(usable.tolist(), named.tolist())],
                          pa.string()),
        "label": label,
    })
    return ExternalRows(identity, ids, vectors, usable)


def row_count(file: ExternalFile) -> int:
    return pq.ParquetFile(file.metadata).metadata.num_rows


def beside_first(files: list[ExternalFile], shards: set[str]) -> list[ExternalFile]:
    """The files next to the scored shards (same folder and stem: DataComp's NNNNNNNN.tar/.npz) first."""
    stems = {str(Path(shard).with_suffix("")) for shard in shards}
    return sorted(files, key=lambda file: str(Path(file.path).with_suffix("")) not in stems)


def scored_vectors_from_files(files: list[ExternalFile], scored: Scored, columns: tuple[str, ...], id_column: str,
                              dim: int) -> ScoredVectors:
    """The scored samples' embeddings, matched by id: the files beside the scored shards first, the
    rest only while some are still missing."""
    collector = VectorCollector(scored.wanted(), len(columns), dim)
    scored_ids = SortedIds(scored.table.column(id_column))
    for file in beside_first(files, set(scored.table.column("shard").unique().to_pylist())):
        if collector.complete:
            break
        positions = scored_ids.positions(read_ids(file, id_column))
        hit = positions >= 0
        if hit.any():
            vectors, usable = unit_rows(read_vectors(file, columns, len(positions), dim)[hit])
            collector.add(positions[hit][usable], vectors[usable])
    return collector.result()
