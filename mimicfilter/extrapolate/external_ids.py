"""The ``--features-from`` files' ids checked against the run they stand for, before anything is
written, at costs that suit a billion rows:

* **Some match** (:func:`check_some_match`, ``dedup``): a bounded sample of the files' ids (the
  first rows of up to :data:`SAMPLE_FILES` files — those beside the run's shards first, then
  files spread over the list — :data:`SAMPLE_IDS` ids in all) is looked up among the run's ids,
  a part at a time, stopping at the first found. None found: the files are another pool's, or
  matched by the wrong column; refused in one line with an example id of each side. Some found
  is no proof that all match, and is not asked for: the files may hold samples the run lacks and
  lack samples it has. ``extrapolate`` needs no sample: it reads every file's ids anyway to find
  the scored samples' embeddings, and refuses with :func:`no_match_error` when none is there.
* **No id twice** (:func:`check_unique_ids`): one DuckDB pass over the files' id column (``GROUP BY
  id HAVING count(*) > 1 LIMIT 1``; 0.2 s per 2M ids on two cores, spilling to a scratch directory
  when the ids outgrow memory). A sample embedded twice would be searched as two samples (a pair
  with itself, or two vectors for one sample) and given two rows by ``extrapolate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mimicfilter.curate.duck import connect, sql_identifier
from mimicfilter.errors import MimicfilterError, one_line
from mimicfilter.extrapolate.external import ExternalFile
from mimicfilter.store.scratch import scratch_directory

SAMPLE_IDS = 4096  # ids of the files looked up among the run's
SAMPLE_FILES = 16  # files they are read from (half beside the run's shards, half spread over the list)
RUN_BATCH = 65536  # run ids compared at a time


def _sampled_files(files: list[ExternalFile], shards: Iterable[str]) -> list[ExternalFile]:
    stems = {str(Path(shard).with_suffix("")) for shard in shards}
    beside = [file for file in files if str(Path(file.path).with_suffix("")) in stems][: SAMPLE_FILES // 2]
    spread = np.unique(np.round(np.linspace(0, len(files) - 1, SAMPLE_FILES - len(beside))).astype(int))
    return list(dict.fromkeys(beside + [files[int(position)] for position in spread]))


def sample_ids(files: list[ExternalFile], id_column: str, shards: Iterable[str] = ()) -> pa.Array:
    """Up to :data:`SAMPLE_IDS` distinct ids (strings, no nulls) from the first rows of a few files."""
    if not files:
        return pa.array([], pa.string())
    chosen = _sampled_files(files, shards)
    taken = []
    for file in chosen:
        batches = pq.ParquetFile(file.metadata).iter_batches(batch_size=max(1, SAMPLE_IDS // len(chosen)),
                                                             columns=[id_column])
        batch = next(batches, None)
        if batch is not None:
            taken.append(batch.column(0).cast(pa.string()))
    ids = pa.concat_arrays(taken) if taken else pa.array([], pa.string())
    return pc.unique(ids.filter(ids.is_valid()))


def _run_ids(parts: Iterable[str], id_column: str) -> Iterator[pa.Array]:
    for part in parts:
        reader = pq.ParquetFile(part)
        if id_column not in reader.schema_arrow.names:
            continue
        for batch in reader.iter_batches(batch_size=RUN_BATCH, columns=[id_column]):
            yield batch.column(0).cast(pa.string())


def _shown(value: object) -> str:
    return repr(one_line(value, 48))


def first_id(values: pa.Array | pa.ChunkedArray) -> str | None:
    """The first id that is not null (an example for a message), or None."""
    present = values.drop_null()
    return None if not len(present) else str(present[0].as_py())


def no_match_error(what: str, id_column: str, file_example: str | None, run_example: str | None,
                   read: int | None = None) -> MimicfilterError:
    """``what`` (…can be used): no ``id_column`` of the run is in the files, with an example of each side."""
    sampled = f"none of {read} read from them; " if read is not None else ""
    files = f"files: {_shown(file_example)}" if file_example is not None else f"the files have no {id_column}"
    run = f"run: {_shown(run_example)}" if run_example is not None else f"the run's samples have no {id_column}"
    hint = "files of another pool, or the wrong --id-column (uid or key)? the files must embed the run's samples too"
    if run_example is None and id_column == "uid":
        hint = "match by key: --id-column key (the run's shards gave no uid)"
    return MimicfilterError(f"{what}: no {id_column} of it is in the --features-from files ({sampled}e.g. {files}, "
                            f"{run})", hint=hint)


def check_some_match(files: list[ExternalFile], id_column: str, run_parts: list[str], shards: Iterable[str],
                     what: str) -> None:
    """Refuse files whose sampled ids are none of the run's (see the module's notes)."""
    sampled = sample_ids(files, id_column, shards)
    if not len(sampled):  # the sampled rows have no id: they become status rows, nothing to compare
        return
    run_example = None
    for values in _run_ids(run_parts, id_column):
        if pc.any(pc.is_in(values, value_set=sampled)).as_py():
            return
        run_example = run_example or first_id(values)
    raise no_match_error(what, id_column, str(sampled[0].as_py()), run_example, read=len(sampled))


def check_unique_ids(files: list[ExternalFile], id_column: str) -> None:
    """Refuse an id that two rows of the files hold (in one file or two), naming it and its files."""
    if not files:
        return
    listed = [file.metadata for file in files]  # a parameter: no SQL text grows with a million files
    column = sql_identifier(id_column)
    with scratch_directory("duckdb") as spill:
        connection = connect(temp_directory=spill)
        try:
            found = connection.execute(f"SELECT CAST({column} AS VARCHAR) FROM read_parquet($files) WHERE {column} "
                                       f"IS NOT NULL GROUP BY {column} HAVING count(*) > 1 LIMIT 1",
                                       {"files": listed}).fetchone()
            if found is None:
                return
            holders = connection.execute(
                f"SELECT mf_file, count(*) FROM read_parquet($files, filename = 'mf_file') WHERE "
                f"CAST({column} AS VARCHAR) = $id GROUP BY mf_file ORDER BY mf_file",
                {"files": listed, "id": found[0]}).fetchall()
        finally:
            connection.close()
    where = f"{holders[0][1]} times in {holders[0][0]}" if len(holders) == 1 else "in " + " and ".join(
        name for name, _ in holders[:2]) + (f" and {len(holders) - 2} more" if len(holders) > 2 else "")
    raise MimicfilterError(f"--features-from: {id_column} {_shown(found[0])} is in the files more than once ({where})",
                           hint="one row per sample: a sample embedded twice would count as two; drop the repeated "
                           "rows or the repeated file")
