"""Small builders for test inputs: tiny open_clip configs, images and WebDataset tars."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_tiny_config(path: Path, config: dict | None = None) -> Path:
    path.write_text(json.dumps(config or TINY_CLIP_CONFIG))
    return path


def image_bytes(seed: int, size: int = 24, fmt: str = "JPEG") -> bytes:
    """A small deterministic RGB picture encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """Write ``samples`` as a WebDataset tar: member ``{key}.{ext}`` for every file of every sample."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    return path


def image_text_samples(count: int, start: int = 0, with_uid: bool = True) -> list[tuple[str, dict[str, bytes]]]:
    samples = []
    for i in range(start, start + count):
        files = {"jpg": image_bytes(i), "txt": f"a picture number {i}".encode()}
        if with_uid:
            files["json"] = json.dumps({"uid": f"{i:032x}"}).encode()
        samples.append((f"{i:08d}", files))
    return samples


def build_tiny_clip(config: dict | None = None, seed: int = 0):
    """A randomly initialised open_clip model for ``config`` (built through open_clip's factory)."""
    import tempfile

    import open_clip
    import torch

    with tempfile.TemporaryDirectory() as config_dir:
        payload = {"model_cfg": config or TINY_CLIP_CONFIG, "preprocess_cfg": {}}
        (Path(config_dir) / "open_clip_config.json").write_text(json.dumps(payload))
        torch.manual_seed(seed)
        return open_clip.create_model(f"local-dir:{config_dir}")


def write_random_checkpoint(path: Path, config: dict | None = None, seed: int = 0) -> Path:
    """Save a random tiny CLIP's state dict (``.pt`` or ``.safetensors`` by suffix)."""
    import torch

    state = build_tiny_clip(config, seed).state_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({name: value.contiguous() for name, value in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def score_row(shard: str, key: str, index: int, epoch: int, score: float | None, *, uid: str | None = None,
              status: str = "ok", clip: float | None = None) -> dict:
    """One row of a score table (the columns of store.schema.SCORE_SCHEMA)."""
    ok = status == "ok"
    return {"shard": shard, "key": key, "uid": uid, "index": index, "epoch": epoch, "step": index, "status": status,
            "error": None if ok else "broken", "mimic_score": score if ok else None,
            "mimic_weight": (1.0 if score is None else 1.0 + score) if ok else None, "loss": 1.0 if ok else None,
            "clip_score": (clip if clip is not None else score) if ok else None, "ref_loss": 0.5 if ok else None,
            "label": None}


def write_score_run(run_dir: Path, rows: list[dict], shards: list[str], *, epochs: int = 1,
                    finished: bool = True) -> Path:
    """A hand-written run directory: one score part, run.json naming the shards, and ``_SUCCESS``."""
    from mimicfilter.store.parts import write_part
    from mimicfilter.store.schema import rows_to_table

    write_part(rows_to_table(rows), run_dir / "scores" / "part.parquet")
    decode = {"task": "contrastive", "image_keys": ["jpg", "jpeg", "png", "webp"], "text_key": "txt"}
    info = {"command": "score", "shards": shards, "train": {"mode": "head" if epochs > 1 else "none", "epochs": epochs},
            "models": {"architecture": "tiny"}, "fingerprint": {"task": "contrastive", "decode": decode}}
    (run_dir / "run.json").write_text(json.dumps(info))
    if finished:
        (run_dir / "_SUCCESS").write_text("")
    return run_dir


def image_text_run(tmp_path: Path, shards: int = 2, per_shard: int = 10, epochs: int = 1) -> tuple[Path, list[Path]]:
    """Real shards (image, caption, uid) and a score table over them: sample i scores float(i)."""
    paths, rows = [], []
    (tmp_path / "shards").mkdir(exist_ok=True)
    for number in range(shards):
        samples = image_text_samples(per_shard, start=number * per_shard)
        shard = write_tar(tmp_path / "shards" / f"s{number}.tar", samples)
        paths.append(shard)
        for index, (key, files) in enumerate(samples):
            uid = json.loads(files["json"])["uid"]
            for epoch in range(epochs):
                rows.append(score_row(str(shard), key, index, epoch, float(int(key)), uid=uid))
    return write_score_run(tmp_path / "run", rows, [str(path) for path in paths], epochs=epochs), paths




def pool_values(shards: list[str]) -> dict[tuple[str, str], tuple[int | None, int | None, int | None]]:
    """(shard, key) → (caption chars, image width, image height) read from the shards (None: unknown)."""
    from mimicfilter.shards.samples import iter_shard_samples

    values = {}
    for shard in shards:
        for raw in iter_shard_samples(shard):
            caption = raw.files.get("txt")
            width = height = None
            image = raw.files.get("jpg", raw.files.get("png"))
            if image is not None:
                try:
                    with Image.open(io.BytesIO(image)) as opened:
                        width, height = opened.size
                except OSError:
                    pass
            chars = None if caption is None else len(caption.decode("utf-8-sig", "replace").strip())
            values[(shard, raw.key)] = (chars, width, height)
    return values
