"""The plain baseline of the input-path benchmarks: a forward-only CLIP-score script written the way
a webdataset + open_clip user would, with nothing of mimicfilter.

DataLoader workers stream the tars with tarfile, decode with PIL, run open_clip's ``preprocess``
(float32) and tokenise one caption at a time; the reference's towers score each pair (cosine), in
bfloat16 autocast on a GPU. Prints {"samples", "loop_seconds"} as JSON. benchmarks/bench_input.py
(per core, and as a whole process) and benchmarks/gpu/bench_gpu.py measure mimicfilter against it.

    python benchmarks/plain_forward.py SHARD.tar ... --model MODEL.json --checkpoint REF.safetensors
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path


def tar_samples(shard: str):
    """Each sample of a WebDataset tar as {ext: bytes}, grouped by key in stream order."""
    with tarfile.open(shard, "r|") as tar:
        sample, key = {}, None
        for member in tar:
            member_key, ext = member.name.split(".", 1)
            if key is not None and member_key != key:
                yield sample
                sample = {}
            key = member_key
            sample[ext] = tar.extractfile(member).read()
        if sample:
            yield sample


def open_clip_model(model: str):
    """(model, preprocess, tokenizer) of an open_clip name or a JSON model config, random weights."""
    import open_clip

    with tempfile.TemporaryDirectory() as directory:
        config = json.loads(Path(model).read_text()) if model.endswith(".json") else None
        if config is not None:
            (Path(directory) / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
        name = f"local-dir:{directory}" if config is not None else model
        model, _, preprocess = open_clip.create_model_and_transforms(name)
        return model, preprocess, open_clip.get_tokenizer(name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", nargs="+")
    parser.add_argument("--model", required=True, help="open_clip architecture name or a JSON model config")
    parser.add_argument("--checkpoint", required=True, help="the reference's weights (safetensors)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    model, preprocess, tokenizer = open_clip_model(args.model)
    model.load_state_dict(load_file(args.checkpoint))
    device = torch.device(args.device)
    model = model.to(device).eval()

    class Pairs(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            shards = args.shards[info.id::info.num_workers] if info else args.shards
            for shard in shards:
                for sample in tar_samples(shard):
                    image = preprocess(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
                    yield image, tokenizer([sample["txt"].decode()])[0]

    loader = DataLoader(Pairs(), batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda")
    count, started = 0, time.perf_counter()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    with torch.no_grad(), autocast:
        for images, texts in loader:
            image = F.normalize(model.encode_image(images.to(device, non_blocking=True)).float(), dim=-1)
            text = F.normalize(model.encode_text(texts.to(device, non_blocking=True)).float(), dim=-1)
            (image * text).sum(-1).cpu()
            count += images.shape[0]
    print(json.dumps({"samples": count, "loop_seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
