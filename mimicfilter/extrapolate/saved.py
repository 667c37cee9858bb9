"""The fitted extrapolator, saved once in the run directory and loaded by every worker, rank and
resumed run, so all of them predict with one index and one choice:

```
extrapolator/
  fit.json         method, features, chosen settings, held-out results, the index, the fingerprint
  predictor.pt     tensors: the scored samples' targets (kNN), or the GNN's weights and graph
  index/           the faiss index (one per label with --same-label) and its members
  scored.arrow     the scored run, one row per sample (Arrow IPC, memory-mapped by the workers)
```

It is built in a hidden folder beside it and renamed into place: a folder that exists is complete,
and of two ranks that fit at once the first to rename wins (the other loads the winner's). One fitted
for other options (its fingerprint differs) is never loaded: a fit replaces it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from mimicfilter.extrapolate import gnn
from mimicfilter.extrapolate.index import ScoredIndex
from mimicfilter.extrapolate.knn import Blend
from mimicfilter.extrapolate.methods import Fitted, GnnPredictor, KnnPredictor, Standardiser
from mimicfilter.store.owners import leftover_name

EXTRAPOLATOR_DIR = "extrapolator"


@dataclass
class Saved:
    """What a worker needs: the index, the predictor, the fit's record and the scored table."""

    fit: dict[str, Any]
    index: ScoredIndex
    predictor: KnnPredictor | GnnPredictor
    scored: pa.Table


def _predictor_state(fitted: Fitted) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    predictor = fitted.predictor
    if isinstance(predictor, KnnPredictor):
        tensors = {"values": predictor.values}
        if predictor.blend is not None:
            tensors["blend"] = predictor.blend.coefficients
        return {"k": predictor.k, "weighted": predictor.weighted}, tensors
    model = predictor.model
    settings = {"graph_k": predictor.graph_k, "batch_nodes": predictor.batch_nodes, "signal_columns": predictor.pool.signal_columns,
                "in_features": model.self1.in_features, "hidden": model.self1.out_features, "targets": model.out.out_features}
    tensors = {f"model.{name}": value for name, value in model.state_dict().items()}
    tensors |= {"pool.inputs": predictor.pool.inputs, "pool.targets": predictor.pool.targets,
                "pool.neighbours": predictor.pool.neighbours, "inputs.mean": predictor.scale_inputs.mean,
                "inputs.std": predictor.scale_inputs.std, "targets.mean": predictor.scale_targets.mean,
                "targets.std": predictor.scale_targets.std}
    return settings, tensors


def _predictor_of(fit: dict[str, Any], tensors: dict[str, torch.Tensor]) -> KnnPredictor | GnnPredictor:
    settings = fit["predictor"]
    if fit["method"] == "knn":
        blend = Blend(tensors["blend"]) if "blend" in tensors else None
        return KnnPredictor(fit["features"], settings["k"], settings["weighted"], tensors["values"], blend)
    model = gnn.SageRegressor(settings["in_features"], settings["hidden"], settings["targets"], settings["signal_columns"])
    model.load_state_dict({name[len("model."):]: value for name, value in tensors.items() if name.startswith("model.")})
    pool = gnn.Pool(tensors["pool.inputs"], tensors["pool.targets"], tensors["pool.neighbours"], settings["signal_columns"])
    return GnnPredictor(fit["features"], settings["graph_k"], model, pool,
                        Standardiser(tensors["inputs.mean"], tensors["inputs.std"]),
                        Standardiser(tensors["targets.mean"], tensors["targets.std"]), settings["batch_nodes"])


def extrapolator_dir(run_dir: Path) -> Path:
    return Path(run_dir) / EXTRAPOLATOR_DIR


def save(run_dir: Path, fitted: Fitted, scored: pa.Table, record: dict[str, Any]) -> None:
    """Publish the extrapolator of ``fitted`` (unless another process already did)."""
    final = extrapolator_dir(run_dir)
    staging = Path(run_dir) / leftover_name(EXTRAPOLATOR_DIR, uuid.uuid4().hex[:8])
    staging.mkdir(parents=True)
    try:
        settings, tensors = _predictor_state(fitted)
        torch.save(tensors, staging / "predictor.pt")
        fitted.index.save(staging / "index")
        with pa.OSFile(str(staging / "scored.arrow"), "wb") as sink, pa.ipc.new_file(sink, scored.schema) as writer:
            writer.write_table(scored)
        (staging / "fit.json").write_text(json.dumps({**record, "predictor": settings}, default=_plain))
        try:
            os.rename(staging, final)
        except OSError:  # another rank published first: its extrapolator is the run's
            published = saved_fit(run_dir)
            if published is None:
                raise
            if published.get("fingerprint") != record.get("fingerprint"):
                # an earlier command's, left by a kill of `--overwrite` before it was removed: never the run's
                remove(run_dir)
                os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _plain(value: Any) -> Any:
    return asdict(value) if hasattr(value, "__dataclass_fields__") else str(value)


def saved_fit(run_dir: Path) -> dict[str, Any] | None:
    """The saved fit's record, or None when there is none."""
    path = extrapolator_dir(run_dir) / "fit.json"
    return json.loads(path.read_text()) if path.is_file() else None


def remove(run_dir: Path) -> None:
    shutil.rmtree(extrapolator_dir(run_dir), ignore_errors=True)


def load(run_dir: Path) -> Saved:
    folder = extrapolator_dir(run_dir)
    fit = json.loads((folder / "fit.json").read_text())
    tensors = torch.load(folder / "predictor.pt", weights_only=True)
    scored = pa.ipc.open_file(pa.memory_map(str(folder / "scored.arrow"))).read_all()
    return Saved(fit, ScoredIndex.load(folder / "index"), _predictor_of(fit, tensors), scored)
