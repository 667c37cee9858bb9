"""Scale-out: rank/world-size partitions, concurrent run directories, the Ray executor, retries."""

import json
import os
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from click.testing import CliRunner
from helpers import image_bytes, image_text_samples, write_tar

from mimicfilter.errors import MimicfilterError
from mimicfilter.execute.partition import Partition
from mimicfilter.execute.ray import RayConfig
from mimicfilter.store.rundir import prepare_run_dir
from mimicfilter.store.parts import read_scores
from mimicfilter_cli.main import cli


@pytest.fixture
def shards(tmp_path):
    directory = tmp_path / "shards"
    directory.mkdir()
    for number in range(5):
        samples = image_text_samples(6, start=10 * number)
        if number == 2:
            samples[1][1]["jpg"] = image_bytes(1)[:100]  # a corrupt JPEG rides along
        write_tar(directory / f"{number:03d}.tar", samples)
    return sorted(str(path) for path in directory.glob("*.tar"))


def score_args(shards, tiny_config, reference_checkpoint, out, *extra):
    return ["score", *shards, "--model", str(tiny_config), "--reference", str(reference_checkpoint), "--out", str(out),
            "--batch-size", "4", "--workers", "0", "--quiet", "--train", "none", *extra]


def invoke(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def table(run_dir: Path) -> pa.Table:
    return read_scores(run_dir)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every run here uses one torch thread, like a --cpus-per-task 1 Ray actor.

    CPU kernels split their reductions by thread count, so bitwise-equal tables need equal thread
    counts; across counts the scores agree to float32 rounding (docs/scale.md).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def local_run(shards, tiny_config, reference_checkpoint, tmp_path):
    out = tmp_path / "local"
    assert invoke(score_args(shards, tiny_config, reference_checkpoint, out)).exit_code == 0
    return out


@pytest.mark.parametrize("count, world_size", [(0, 3), (1, 4), (5, 2), (17, 5), (64, 8)])
def test_partitions_are_disjoint_and_cover_every_shard(count, world_size):
    shards = [f"s{i}.tar" for i in range(count)]
    parts = [Partition(rank, world_size).select(shards) for rank in range(world_size)]
    assert sorted(shard for part in parts for shard in part) == sorted(shards)
    assert len({shard for part in parts for shard in part}) == count
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    assert parts == [Partition(rank, world_size).select(shards) for rank in range(world_size)]  # deterministic


def test_ranks_fill_one_run_directory_equal_to_a_local_run(shards, tiny_config, reference_checkpoint, tmp_path, local_run):
    out = tmp_path / "ranked"
    results = [invoke(score_args(shards, tiny_config, reference_checkpoint, out, "--rank", str(rank), "--world-size", "3",
                                 "--json")) for rank in (2, 0, 1)]
    stats = [json.loads(result.stdout) for result in results]
    assert [s["shards_this_process"] for s in stats] == [1, 2, 2]
    assert stats[0]["shards_missing"] == 4 and "shards_missing" not in stats[2]
    assert (out / "_SUCCESS").exists() and json.loads((out / "stats.json").read_text())["rows"] == 30
    assert sorted(p.name for p in (out / "ranks").iterdir()) == [f"rank-0000{r}-of-00003.json" for r in range(3)]
    assert table(out).equals(table(local_run))


def test_a_rank_only_marks_the_run_done_when_all_parts_exist(shards, tiny_config, reference_checkpoint, tmp_path):
    out = tmp_path / "ranked"
    assert invoke(score_args(shards, tiny_config, reference_checkpoint, out, "--rank", "0", "--world-size", "2")).exit_code == 0
    assert not (out / "_SUCCESS").exists() and not (out / "stats.json").exists()
    assert len(list((out / "scores").glob("*.parquet"))) == 3


def test_concurrent_ranks_create_run_json_exactly_once(tmp_path):
    run_dir = tmp_path / "run"
    fingerprint = {"format": 1, "shards": ["a", "b"]}
    outcomes, errors = [], []
    barrier = threading.Barrier(8)

    def rank(number):
        barrier.wait()
        try:
            outcomes.append(prepare_run_dir(run_dir, fingerprint, {"rank": number}, overwrite=False, concurrent=True))
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=rank, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(outcomes) == [False] + [True] * 7  # one created it, seven joined it
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(MimicfilterError, match="different command"):
        prepare_run_dir(run_dir, {"format": 1, "shards": ["c"]}, {}, overwrite=False, concurrent=True)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rank", "2", "--world-size", "2"], "--rank 2 is outside 0..1"),
        (["--rank", "0"], "--rank and --world-size go together"),
        (["--world-size", "0", "--rank", "0"], "--world-size 0"),
        (["--rank", "0", "--world-size", "2", "--overwrite"], "would let one rank delete"),
        (["--ray", "--cpus-per-task", "0"], "--cpus-per-task 0"),
    ],
)
def test_bad_scale_options_are_one_line_errors(shards, tiny_config, reference_checkpoint, tmp_path, extra, message):
    result = CliRunner().invoke(cli, score_args(shards, tiny_config, reference_checkpoint, tmp_path / "r", *extra))
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_trajectories_cannot_be_split(shards, tiny_config, reference_checkpoint, tmp_path):
    args = score_args(shards, tiny_config, reference_checkpoint, tmp_path / "r", "--rank", "0", "--world-size", "2")
    args[args.index("--train") + 1] = "head"
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "cannot be split over shards" in result.output


# ---------------------------------------------------------------- Ray (local instance, 2 CPUs)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance; the tests that use it are skipped where Ray is not installed (the rest run)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the crash hook below runs in actors
    yield
    ray.shutdown()


class CrashOnce:
    """A worker factory whose worker kills its own process the first time it scores shard 002, mid-shard."""

    def __init__(self, factory, marker: str):
        self.factory, self.marker = factory, marker

    def __call__(self):
        from mimicfilter.store.paths import part_path

        score = self.factory()

        def run(shard):
            if shard.endswith("002.tar") and not os.path.exists(self.marker):
                Path(self.marker).write_text("crashed once")
                part = part_path(score.keywords["config"].out_dir, shard)
                part.with_name(f".{part.name}.half.tmp").write_bytes(b"half a part")  # what a kill leaves behind
                os._exit(1)
            return score(shard)

        return run


@pytest.mark.slow
def test_ray_table_equals_the_local_executor(ray_cluster, shards, tiny_config, reference_checkpoint, tmp_path, local_run):
    out = tmp_path / "ray"
    result = invoke(score_args(shards, tiny_config, reference_checkpoint, out, "--ray", "--json"))
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["executor"] == "ray (2 actors)" and stats["samples_scored_now"] == 30
    assert table(out).equals(table(local_run))
    again = json.loads(invoke(score_args(shards, tiny_config, reference_checkpoint, out, "--ray", "--json")).stdout)
    assert again["samples_scored_now"] == 0 and again["shards_resumed"] == 5  # finished parts are never redone


@pytest.mark.slow
def test_a_killed_ray_task_is_retried_and_the_table_is_unchanged(ray_cluster, shards, tiny_config, reference_checkpoint,
                                                                 tmp_path, local_run):
    from mimicfilter.execute.ray import run_with_ray
    from mimicfilter.mimic.models import ModelSpec
    from mimicfilter.pipeline.config import ScoreConfig, TrainConfig
    from mimicfilter.pipeline.static import ShardWorkerFactory
    from mimicfilter.shards.decode import DecodeConfig

    out = tmp_path / "ray-crash"
    config = ScoreConfig(
        shards=tuple(shards), out_dir=out,
        model=ModelSpec(model=str(tiny_config), reference=str(reference_checkpoint)), decode=DecodeConfig(),
        batch_size=4, train=TrainConfig(mode="none"), ray=RayConfig(max_retries=2, actors=1),
    )
    marker = tmp_path / "crashed"
    result = run_with_ray(shards, CrashOnce(ShardWorkerFactory(config), str(marker)), config.ray)
    assert marker.exists(), "the crash hook never ran"
    assert result.failures == () and result.units_done == 5
    assert table(out).equals(table(local_run))  # the half-written temp part is ignored, the shard rescored


def test_ray_reports_shards_that_fail_every_retry(ray_cluster, shards, tmp_path):
    from mimicfilter.execute.ray import run_with_ray

    result = run_with_ray(shards[:2], always_fails, RayConfig(max_retries=1, actors=1))
    assert result.units_done == 0 and len(result.failures) == 2 and "disk full" in result.failures[0]


def always_fails():
    """A worker factory whose worker fails every shard."""

    def run(shard):
        raise OSError("disk full")

    return run


def test_a_run_directory_at_an_fsspec_url(shards, tiny_config, reference_checkpoint, tmp_path, local_run):
    """score → filter → report with --out memory://…: the same table as a local run, no local files."""
    url = f"memory://runs/{tmp_path.name}"
    result = invoke(score_args(shards, tiny_config, reference_checkpoint, url, "--rank", "0", "--world-size", "2"))
    assert result.exit_code == 0, result.output
    assert invoke(score_args(shards, tiny_config, reference_checkpoint, url, "--rank", "1", "--world-size", "2")).exit_code == 0
    assert table(url).equals(table(local_run))
    from mimicfilter.store.paths import run_path

    assert (run_path(url) / "_SUCCESS").exists() and (run_path(url) / "run.json").exists()
    filtered = invoke(["filter", url, "--out", str(tmp_path / "curated"), "--json"])
    assert filtered.exit_code == 0, filtered.output
    assert json.loads(filtered.stdout)["samples"] == 30
    reported = invoke(["report", url, "--out", str(tmp_path / "report"), "--sheet-size", "2"])
    assert reported.exit_code == 0, reported.output
    lowest = json.loads((tmp_path / "report" / "report.json").read_text())["sheets"]["lowest"]
    assert len(lowest) == 2 and all((tmp_path / "report" / card["thumbnail"]).is_file() for card in lowest)


def test_trajectories_need_a_local_run_directory(shards, tiny_config, reference_checkpoint):
    args = score_args(shards, tiny_config, reference_checkpoint, "memory://runs/trajectory")
    args[args.index("--train") + 1] = "head"
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "need a local or mounted directory" in result.output


def test_threads_option_sets_torch_threads(shards, tiny_config, reference_checkpoint, tmp_path,
                                                                local_run):
    import torch

    out = tmp_path / "threads"
    assert invoke(score_args(shards, tiny_config, reference_checkpoint, out, "--threads", "2")).exit_code == 0
    assert torch.get_num_threads() == 2  # (the autouse fixture restores the thread count afterwards)
    scores, local = table(out), table(local_run)
    assert scores.select(["shard", "key", "status"]).equals(local.select(["shard", "key", "status"]))
    difference = pc.max(pc.abs(pc.subtract(scores["mimic_score"], local["mimic_score"]))).as_py()
    assert difference <= 1e-5  # other thread counts: float32 rounding at most
    result = CliRunner().invoke(cli, score_args(shards, tiny_config, reference_checkpoint, tmp_path / "x", "--threads", "0"))
    assert result.exit_code == 2 and "--threads 0" in result.output
