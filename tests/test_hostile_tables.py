"""Tables that are not what they claim (score parts, run.json, manifests, joined files, features files)
and SQL that tries to leave its expression: one-line errors, or a warning where the data is usable,
never a traceback, a file read through a column name, or a sample kept by a rewritten query."""

import json
import shutil

import duckdb
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import image_text_run, score_row, write_score_run

from mimicfilter_cli.main import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args], catch_exceptions=False)


def one_line_error(result, code=2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("Error: "), result.stderr
    return result.stderr


@pytest.fixture
def run(tmp_path):
    return image_text_run(tmp_path, epochs=2)[0]


def uids(run) -> list[str]:
    return [row[0] for row in duckdb.sql(f"SELECT DISTINCT uid FROM '{run}/scores/*.parquet' ORDER BY 1").fetchall()]


def test_a_joined_column_name_is_a_name_not_sql(tmp_path, run):
    """A metadata file's column names are quoted: one that holds SQL neither reads nor writes a file."""
    (tmp_path / "secret.csv").write_text("secret,1\n")
    reads = f'x", (SELECT string_agg(column0, \'|\') FROM read_csv(\'{tmp_path}/secret.csv\', header=false)) AS "leaked'
    writes = (f'x" FROM samples s LEFT JOIN external_0 e ON s.uid = e.uid; COPY (SELECT 42 AS answer) '
              f'TO \'{tmp_path}/written.csv\'; SELECT 1 AS "y')
    keys = uids(run)
    for number, name in enumerate((reads, writes, 'a"b')):
        path = tmp_path / f"join{number}.parquet"
        pq.write_table(pa.table({"uid": keys, name: list(range(len(keys)))}), path)
        out = tmp_path / f"out{number}"
        result = invoke("filter", run, "--join", path, "--out", out)
        assert result.exit_code == 0, result.output
        manifest = pq.read_table(out / "manifest.parquet")
        assert name in manifest.column_names and "leaked" not in manifest.column_names
        assert sorted(manifest.column(name).to_pylist()) == list(range(len(keys)))
    assert not (tmp_path / "written.csv").exists()


@pytest.mark.parametrize("make, named", [
    (lambda keys: pa.table({"uid": list(range(len(keys))), "extra": keys}), "uid is BIGINT, not text"),
    (lambda keys: pa.table({"uid": pa.array([None] * len(keys), pa.string()), "extra": keys}),
     "row(s) without a uid value"),
])
def test_join_keys_of_another_type_or_none_are_one_line(tmp_path, run, make, named):
    path = tmp_path / "join.parquet"
    pq.write_table(make(uids(run)), path)
    assert named in one_line_error(invoke("filter", run, "--join", path, "--dry-run"))


def _rewrite_part(run, change) -> None:
    part = next((run / "scores").glob("*.parquet"))
    pq.write_table(change(pq.read_table(part)), part)


@pytest.mark.parametrize("change, named", [
    (lambda t: t.set_column(t.column_names.index("mimic_score"), "mimic_score",
                            pa.array([str(v) for v in t.column("mimic_score").to_pylist()])), "mimic_score is VARCHAR"),
    (lambda t: t.set_column(t.column_names.index("index"), "index",
                            pa.array([str(v) for v in t.column("index").to_pylist()])), "index is VARCHAR"),
    (lambda t: t.set_column(0, "shard", pa.array([None] * t.num_rows, pa.string())), "row(s) without one of shard"),
])
def test_a_score_part_of_another_kind_is_one_line_for_filter_and_report(tmp_path, run, change, named):
    _rewrite_part(run, change)
    assert named in one_line_error(invoke("filter", run, "--dry-run"))
    assert named in one_line_error(invoke("report", run, "--out", tmp_path / "report"))
    assert not (tmp_path / "report").exists()


def test_a_part_lacking_a_core_column_is_named_not_read_as_non_finite_rows(tmp_path, run):
    """Parts are read by column name: one part without mimic_score must not become rows of null scores."""
    part = next((run / "scores").glob("*.parquet"))
    table = pq.read_table(part)
    first = pa.compute.equal(table.column("shard"), table.column("shard")[0])
    pq.write_table(table.filter(first), part)
    pq.write_table(table.filter(pa.compute.invert(first)).drop_columns(["mimic_score"]), run / "scores" / "part-2.parquet")
    for command in (["filter", run, "--dry-run"], ["report", run, "--out", tmp_path / "report"]):
        assert "part-2.parquet lacks mimic_score, which the other parts have" in one_line_error(invoke(*command))


def test_a_corrupt_page_inside_a_part_is_one_line(tmp_path, run):
    """The footer still reads, the data does not: the failure comes from inside a query."""
    part = next((run / "scores").glob("*.parquet"))
    table = pq.read_table(part)
    pq.write_table(table, part, compression="zstd", use_dictionary=False)
    data = bytearray(part.read_bytes())
    for position in range(8, len(data) // 2):
        data[position] ^= 0x5A
    part.write_bytes(bytes(data))
    for command in (["filter", run, "--dry-run"], ["report", run, "--out", tmp_path / "report"]):
        result = invoke(*command)
        assert result.exit_code in (1, 2) and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("Error: "), result.stderr


@pytest.mark.parametrize("text", ['{"command": "score", "shar', "[]"])
def test_a_broken_run_json_is_one_line(tmp_path, run, text):
    (run / "run.json").write_text(text)
    assert "run.json" in one_line_error(invoke("filter", run, "--dry-run"))
    assert "run.json" in one_line_error(invoke("report", run, "--out", tmp_path / "report"))


def test_runs_scored_with_other_settings_are_not_filtered_together(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = image_text_run(tmp_path / "a", epochs=2)[0]
    second = image_text_run(tmp_path / "b", epochs=2)[0]
    info = json.loads((second / "run.json").read_text())
    info["fingerprint"]["task"] = "classify"
    (second / "run.json").write_text(json.dumps(info))
    assert "different settings (task)" in one_line_error(invoke("filter", first, second, "--dry-run"))
    info["fingerprint"]["task"], info["fingerprint"]["shards"] = "contrastive", ["elsewhere.tar"]
    (second / "run.json").write_text(json.dumps(info))  # only the shards differ: one pool
    assert invoke("filter", first, second, "--dry-run").exit_code == 0


def test_a_finished_run_missing_an_epoch_says_so(tmp_path):
    rows = [score_row("/data/s.tar", f"{i:04d}", i, 0, float(i), uid=f"{i:032x}") for i in range(20)]
    run = write_score_run(tmp_path / "run", rows, ["/data/s.tar"], epochs=2)  # run.json: 2 epochs, _SUCCESS
    warning = "finished 2 epochs, but its score parts hold no row of epoch 1 (0-based)"
    result = invoke("filter", run, "--out", tmp_path / "out")
    assert result.exit_code == 0 and warning in result.stderr
    assert any(warning in line for line in json.loads((tmp_path / "out" / "summary.json").read_text())["warnings"])


def test_a_manifest_naming_samples_twice_or_without_true_false_kept_is_refused(tmp_path, run):
    assert invoke("filter", run, "--out", tmp_path / "f").exit_code == 0
    manifest = tmp_path / "f" / "manifest.parquet"
    table = pq.read_table(manifest)
    doubled, texts = tmp_path / "doubled" / "manifest.parquet", tmp_path / "texts" / "manifest.parquet"
    for path, changed in ((doubled, pa.concat_tables([table, table])),
                          (texts, table.set_column(table.column_names.index("kept"), "kept",
                                                   pa.array([str(v) for v in table.column("kept").to_pylist()])))):
        path.parent.mkdir()
        pq.write_table(changed, path)
    assert "more than once" in one_line_error(invoke("report", run, "--filter-manifest", doubled, "--out", tmp_path / "r"))
    assert "true/false kept" in one_line_error(invoke("report", run, "--filter-manifest", texts, "--out", tmp_path / "r"))


def test_an_empty_features_file_is_one_line_for_extrapolate_and_dedup(tmp_path, run):
    features = tmp_path / "features"
    features.mkdir()
    (features / "a.parquet").write_bytes(b"")
    result = invoke("extrapolate", "--scored", run, "--features-from", features, "--out", tmp_path / "x")
    assert "Parquet file size is 0 bytes" in one_line_error(result)
    assert "Parquet file size is 0 bytes" in one_line_error(invoke("dedup", run, "--features-from", features,
                                                                   "--out", tmp_path / "d"))


@pytest.mark.parametrize("command", [["extrapolate", "--embeddings", "E", "--scored", "R", "--out", "O"],
                                     ["dedup", "R", "--out", "O"]])
def test_a_negative_seed_is_a_usage_error(tmp_path, command):
    result = invoke(*command, "--seed", "-1")
    assert result.exit_code == 2 and "--seed" in result.stderr and "Traceback" not in result.output


def test_a_manifest_of_another_run_is_refused_and_a_stale_one_is_said_on_the_page(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    run, other = image_text_run(tmp_path / "a", epochs=2)[0], image_text_run(tmp_path / "b", epochs=2)[0]
    for number, path in enumerate((run, other)):  # runs that `score` wrote carry when they started
        info = json.loads((path / "run.json").read_text())
        (path / "run.json").write_text(json.dumps(info | {"started_at": f"2026-12-0{number + 1}T00:00:00"}))
    assert invoke("filter", other, "--out", tmp_path / "other", "--top-frac", "mimic_score=0.1").exit_code == 0
    refused = one_line_error(invoke("report", run, "--filter-manifest", tmp_path / "other" / "manifest.parquet",
                                    "--out", tmp_path / "r1"))
    assert "was written by a filter over" in refused and not (tmp_path / "r1").exists()
    assert invoke("filter", run, "--out", tmp_path / "mine").exit_code == 0
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)  # the same run elsewhere: still its manifest
    assert invoke("report", moved, "--filter-manifest", tmp_path / "mine" / "manifest.parquet",
                  "--out", tmp_path / "r0").exit_code == 0
    part = next((run / "scores").glob("*.parquet"))
    pq.write_table(pq.read_table(part), part)  # the run's parts change after the filter read them
    result = invoke("report", run, "--filter-manifest", tmp_path / "mine" / "manifest.parquet", "--out", tmp_path / "r2")
    assert result.exit_code == 0, result.output
    stale = "was made from other score parts than"
    assert stale in result.stderr
    assert any(stale in line for line in json.loads((tmp_path / "r2" / "report.json").read_text())["warnings"])


def test_outputs_another_run_is_writing_are_refused_and_no_lock_file_stays(tmp_path, run):
    """Two filters writing the same --out and --write-shards at once could publish one's manifest
    beside the other's shards; the second is refused while the first holds them."""
    from mimicfilter.store.swap import sole_writer

    out, shards = tmp_path / "out", tmp_path / "curated"
    assert invoke("filter", run, "--out", out).exit_code == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    with sole_writer([(shards, "--write-shards")]):  # another run is writing the curated shards
        result = invoke("filter", run, "--out", out, "--write-shards", shards, "--top-frac", "mimic_score=0.5")
        assert "is being written by another mimicfilter run now" in one_line_error(result, code=1)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before and not shards.exists()
    assert invoke("filter", run, "--out", out, "--write-shards", shards).exit_code == 0
    assert not [path.name for path in tmp_path.iterdir() if path.name.endswith(".lock")]


def test_curated_shards_of_another_filter_run_beside_a_manifest_are_said_by_report(tmp_path, run):
    """Shards outside --out are swapped in before --out: a filter stopped between the two leaves new
    shards beside the old manifest. The wids index names its filter run, and report compares."""
    out, shards = tmp_path / "out", tmp_path / "curated"
    assert invoke("filter", run, "--out", out, "--write-shards", shards).exit_code == 0
    run_id = (out / "_SUCCESS").read_text().strip()
    assert json.loads((shards / "curated.wids.json").read_text())["mimicfilter_run_id"] == run_id
    result = invoke("report", run, "--filter-manifest", out / "manifest.parquet", "--out", tmp_path / "r1")
    assert result.exit_code == 0 and "curated shards" not in result.stderr, result.output
    # the state such a stop leaves: the shards of a later filter run, the manifest of the first
    assert invoke("filter", run, "--out", tmp_path / "later", "--write-shards", shards,
                  "--top-frac", "mimic_score=0.5").exit_code == 0
    result = invoke("report", run, "--filter-manifest", out / "manifest.parquet", "--out", tmp_path / "r2")
    assert result.exit_code == 0, result.output
    said = f"the curated shards in {shards} were written by filter run"
    assert said in result.stderr and run_id in result.stderr
    assert any(said in line for line in json.loads((tmp_path / "r2" / "report.json").read_text())["warnings"])


def test_an_out_that_links_nowhere_is_one_line(tmp_path, run, tiny_config, reference_checkpoint):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    result = invoke("score", tmp_path / "shards", "--model", tiny_config, "--reference", reference_checkpoint,
                    "--quiet", "--out", tmp_path / "link")
    assert "is a link to" in one_line_error(result)
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("command", [["filter", "R"], ["report", "R"], ["dedup", "R"],
                                     ["extrapolate", "--scored", "R", "--embeddings", "E"]])
def test_an_empty_out_is_a_usage_error_not_the_current_directory(command):
    result = invoke(*command, "--out", "")
    assert result.exit_code == 2 and "an empty path" in result.stderr, result.output
