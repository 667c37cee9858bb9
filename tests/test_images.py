"""The model's geometry on uint8 pixels, the fast and GPU decoders against PIL, and the size guards."""

import io
import json

import numpy as np
import open_clip
import pytest
import torch
from helpers import image_bytes
from PIL import Image

from mimicfilter.mimic.normalization import ImageNormalization
from mimicfilter.pipeline.batches import group_batches
from mimicfilter.pipeline.decoder import Decoder
from mimicfilter.shards.decode import DecodeConfig, decode_sample
from mimicfilter.shards.images import ImageGeometry
from mimicfilter.shards.records import RawSample


def photo_like(width: int, height: int, seed: int = 0, mode: str = "RGB", fmt: str = "JPEG", **save) -> bytes:
    """Smooth gradients plus noise: closer to a photo than pure noise (resize kernels matter)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    pixels = (base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def raw(files, index=0):
    return RawSample("s.tar", f"{index:08d}", index, files)


def open_clip_preprocess(config: dict):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**config), is_train=False)


CONFIGS = [
    {"size": 48},
    {"size": (40, 56)},
    {"size": 48, "resize_mode": "longest", "fill_color": 7},
    {"size": (40, 56), "resize_mode": "squash", "interpolation": "bilinear"},
    {"size": 224, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)},
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("size", [(64, 48), (31, 97), (48, 48), (300, 20)])
def test_pil_route_then_device_normalisation_equals_open_clip_preprocess_bit_for_bit(config, size):
    data = photo_like(*size, seed=sum(size))
    reference = open_clip_preprocess(config)(Image.open(io.BytesIO(data)).convert("RGB"))
    geometry = ImageGeometry.from_open_clip(config)
    sample = decode_sample(raw({"jpg": data, "txt": b"x"}), DecodeConfig(decoder="pil"), geometry)
    assert sample.image.dtype == torch.uint8 and sample.image.shape == reference.shape
    normalised = ImageNormalization.from_open_clip(config).normalise(sample.image[None])[0]
    assert torch.equal(normalised, reference)


def test_normalisation_to_model_dtype_and_float_passthrough():
    normalization = ImageNormalization()
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    as_double = normalization.to_model(pixels, torch.device("cpu"), torch.float64)
    assert as_double.dtype == torch.float64
    assert torch.equal(as_double, normalization.normalise(pixels).double())
    floats = torch.randn(2, 3, 4, 4)
    assert torch.equal(normalization.to_model(floats, torch.device("cpu"), torch.float32), floats)


@pytest.mark.parametrize("size", [(320, 256), (256, 256), (97, 203), (640, 480)])
def test_fast_decoder_agrees_with_pil_within_resize_rounding(size):
    data = photo_like(*size, seed=size[0])
    geometry = ImageGeometry(size=(224, 224))
    fast = decode_sample(raw({"jpg": data, "txt": b"x"}), DecodeConfig(decoder="fast"), geometry).image
    pil = decode_sample(raw({"jpg": data, "txt": b"x"}), DecodeConfig(decoder="pil"), geometry).image
    difference = (fast.int() - pil.int()).abs()
    assert fast.shape == pil.shape == (3, 224, 224)
    assert difference.max() <= 3 and difference.float().mean() < 0.1


def test_grey_jpeg_takes_the_fast_route_and_matches_pil_conversion():
    data = photo_like(60, 40, mode="L")
    geometry = ImageGeometry(size=(40, 40))
    fast = decode_sample(raw({"jpg": data, "txt": b"x"}), DecodeConfig(), geometry).image
    pil = decode_sample(raw({"jpg": data, "txt": b"x"}), DecodeConfig(decoder="pil"), geometry).image
    assert (fast.int() - pil.int()).abs().max() <= 2
    assert torch.equal(fast[0], fast[1]) and torch.equal(fast[1], fast[2])


@pytest.mark.parametrize("mode,fmt,ext", [("CMYK", "JPEG", "jpg"), ("RGBA", "PNG", "png"), ("RGB", "WEBP", "webp"),
                                          ("I;16", "PNG", "png")])
def test_files_the_fast_route_does_not_take_decode_exactly_as_pil(mode, fmt, ext):
    if mode == "I;16":
        image = Image.fromarray((np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        data = photo_like(40, 30, mode=mode, fmt=fmt)
    geometry = ImageGeometry(size=(24, 24))
    fast = decode_sample(raw({ext: data, "txt": b"x"}), DecodeConfig(decoder="fast"), geometry)
    pil = decode_sample(raw({ext: data, "txt": b"x"}), DecodeConfig(decoder="pil"), geometry)
    assert fast.status == pil.status == "ok"
    assert torch.equal(fast.image, pil.image)


@pytest.mark.parametrize("decoder", ["fast", pytest.param("gpu", id="device-route")])
def test_a_truncated_jpeg_gets_pils_status_and_message(decoder):
    data = photo_like(64, 64)
    cut = decode_sample(raw({"jpg": data[: len(data) // 2], "txt": b"x"}), DecodeConfig(decoder=decoder),
                        ImageGeometry(size=(32, 32)))
    assert cut.status == "decode_error" and "truncated" in cut.error
    assert cut.image is None and cut.encoded is None


def test_a_pixel_strip_that_would_be_upscaled_to_billions_of_pixels_is_too_large():
    # 1 x 400,000 px: 1.2 KB as a PNG, far under the bomb limit, but resizing its short side to the
    # model's size would make it 224 x 89.6 million pixels.
    buffer = io.BytesIO()
    Image.new("L", (1, 400_000), 128).save(buffer, format="PNG", optimize=True)
    assert len(buffer.getvalue()) < 2000
    for decoder in ("fast", "pil", "gpu"):
        sample = decode_sample(raw({"png": buffer.getvalue(), "txt": b"x"}), DecodeConfig(decoder=decoder),
                               ImageGeometry(size=(224, 224)))
        assert sample.status == "too_large" and "aspect ratio" in sample.error and sample.image is None


def test_the_resized_size_is_guarded_too():
    geometry = ImageGeometry(size=(224, 224))
    data = photo_like(20, 400)  # aspect 20: fine by ratio, 224 x 4480 after resizing
    assert decode_sample(raw({"jpg": data, "txt": b"x"}), DecodeConfig(), geometry).status == "ok"
    small_limit = DecodeConfig(max_image_pixels=500_000)  # the source (8,000 px) passes, the resize would not
    sample = decode_sample(raw({"jpg": data, "txt": b"x"}), small_limit, geometry)
    assert sample.status == "too_large" and "resized to 224x4480" in sample.error
    ratio_limit = DecodeConfig(max_aspect_ratio=10)
    assert decode_sample(raw({"jpg": data, "txt": b"x"}), ratio_limit, geometry).status == "too_large"


def test_gpu_decoder_sends_complete_jpegs_encoded_and_decodes_them_on_the_device():
    datas = [photo_like(64 + 8 * i, 48, seed=i) for i in range(3)]
    files = [{"jpg": data, "txt": f"caption {i}".encode()} for i, data in enumerate(datas)]
    files.append({"png": image_bytes(9, fmt="PNG"), "txt": b"a png"})  # decoded by PIL in the worker
    geometry = ImageGeometry(size=(32, 32))
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    gpu = Decoder(DecodeConfig(decoder="gpu"), geometry, tokenizer)
    samples = gpu.decode_samples([raw(f, i) for i, f in enumerate(files)])
    assert [s.encoded is not None for s in samples] == [True, True, True, False]
    (batch,) = group_batches(samples, 8, "s.tar")
    assert [row for row, _ in batch.encoded] == [0, 1, 2]
    on_device = gpu.decode_on_device(batch, torch.device("cpu"))  # torchvision's decode_jpeg runs on the CPU too
    fast = Decoder(DecodeConfig(decoder="fast"), geometry, tokenizer)
    (expected,) = group_batches(fast.decode_samples([raw(f, i) for i, f in enumerate(files)]), 8, "s.tar")
    assert on_device.encoded == () and torch.equal(on_device.images, expected.images)
    assert torch.equal(on_device.texts, expected.texts)


def test_a_jpeg_the_device_decoder_rejects_becomes_a_decode_error_row_of_its_batch():
    good = [photo_like(40, 40, seed=i) for i in range(3)]
    broken = bytearray(photo_like(40, 40, seed=7))
    broken[400:500] = b"\x00" * 100  # its header parses, its Huffman tables do not; it still ends with EOI
    files = [{"jpg": data, "txt": b"x", "json": json.dumps({"uid": str(i)}).encode()}
             for i, data in enumerate([good[0], bytes(broken), good[1], good[2]])]
    geometry = ImageGeometry(size=(32, 32))
    decoder = Decoder(DecodeConfig(decoder="gpu"), geometry, open_clip.get_tokenizer("ViT-B-32"))
    samples = decoder.decode_samples([raw(f, i) for i, f in enumerate(files)])
    assert [s.status for s in samples] == ["ok"] * 4 and all(s.encoded for s in samples)
    (batch,) = group_batches(samples, 8, "s.tar")
    decoded = decoder.decode_on_device(batch, torch.device("cpu"))
    assert [s.status for s in decoded.samples] == ["ok", "decode_error", "ok", "ok"]
    assert decoded.images.shape[0] == decoded.texts.shape[0] == 3
