"""The bundled demo data and reference load with the current code and the scores find the swaps."""

import json
from pathlib import Path

import numpy as np
import pytest

from mimicfilter.shards.decode import DecodeConfig
from mimicfilter.mimic.models import ModelSpec
from mimicfilter.pipeline.config import ScoreConfig
from mimicfilter.pipeline.run import run_score
from mimicfilter.shards.samples import iter_shard_samples
from mimicfilter.store.parts import read_scores

DEMO = Path(__file__).resolve().parent.parent / "demo"


@pytest.mark.slow
def test_static_mimic_scores_rank_swapped_captions_low(tmp_path):
    shard = str(DEMO / "shards" / "emoji-000000.tar")
    config = ScoreConfig(
        shards=(shard,),
        out_dir=tmp_path / "run",
        model=ModelSpec(model=str(DEMO / "tiny-clip.json"), reference=str(DEMO / "reference.safetensors")),
        decode=DecodeConfig(),
        batch_size=64,
    )
    stats = run_score(config)
    assert stats["status_counts"]["ok"] == 256
    swapped = {raw.key: json.loads(raw.files["json"])["swapped"] for raw in iter_shard_samples(shard)}
    rows = read_scores(tmp_path / "run").to_pylist()
    scores = np.array([row["mimic_score"] for row in rows])
    truth = np.array([swapped[row["key"]] for row in rows])
    # AUROC of "low score = swapped": the share of (swapped, clean) pairs ranked correctly
    correct = (scores[truth][:, None] < scores[~truth][None, :]).mean()
    assert correct > 0.9
