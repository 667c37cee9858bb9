import io
import json

import numpy as np
import pytest
import torch
from helpers import image_bytes
from PIL import Image, ImageFile

from mimicfilter.errors import MimicfilterError
from mimicfilter.pipeline.decoder import Decoder
from mimicfilter.shards.decode import DecodeConfig, decode_sample
from mimicfilter.shards.images import ImageGeometry
from mimicfilter.shards.records import DecodedSample, RawSample

PREPROCESS = ImageGeometry(size=(32, 32))
SAME_SIZE = ImageGeometry(size=(8, 8))


def tokenize(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[len(text)] for text in texts])


CONTRASTIVE = DecodeConfig()
CLASSIFY = DecodeConfig(task="classify")


def raw(files: dict[str, bytes], status: str = "ok", error: str | None = None) -> RawSample:
    return RawSample("s.tar", "00000007", 7, files, status, error)


def decode(files: dict[str, bytes], config: DecodeConfig = CONTRASTIVE, **kw) -> DecodedSample:
    """Decode and tokenise one sample as a worker does (a chunk of one)."""
    tokenizer = tokenize if config.task == "contrastive" else None
    (sample,) = Decoder(config, PREPROCESS, tokenizer).decode_samples([raw(files, **kw)])
    return sample


def assert_failed(row: dict, status: str) -> None:
    assert row.status == status
    assert row.image is None and row.text is None
    assert row.error and "\n" not in row.error and len(row.error) <= 300


def test_ok_sample():
    row = decode({"jpg": image_bytes(1), "txt": b"  a red bus \n", "json": json.dumps({"uid": "abc"}).encode()})
    assert row.status == "ok" and row.error is None
    assert (row.shard, row.key, row.index) == ("s.tar", "00000007", 7)
    assert row.image.shape == (3, 32, 32) and row.image.dtype == torch.uint8
    assert row.caption == "a red bus"
    assert row.text.tolist() == [len("a red bus")]
    assert row.uid == "abc" and row.label is None


def test_numeric_uid_becomes_string():
    row = decode({"jpg": image_bytes(1), "txt": b"x", "json": b'{"uid": 12}'})
    assert row.uid == "12"


def test_first_present_image_key_wins():
    config = DecodeConfig(image_keys=("png", "jpg"))
    row = decode({"jpg": image_bytes(1), "png": b"not an image", "txt": b"x"}, config)
    assert_failed(row, "decode_error")  # png is preferred, even though jpg would decode


def test_corrupt_jpeg():
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    data = image_bytes(2, size=64)
    row = decode({"jpg": data[: len(data) // 2], "txt": b"caption"})
    assert_failed(row, "decode_error")
    assert "jpg" in row.error


def test_text_payload_named_jpg():
    row = decode({"jpg": b"<html>this is not an image</html>", "txt": b"caption"})
    assert_failed(row, "decode_error")
    assert "not a recognised image" in row.error


def test_missing_image():
    assert_failed(decode({"txt": b"caption", "json": b'{"uid": "u1"}'}), "missing_image")


def test_missing_text():
    assert_failed(decode({"jpg": image_bytes(3)}), "missing_text")


def test_empty_text():
    assert_failed(decode({"jpg": image_bytes(3), "txt": b" \n\t "}), "missing_text")


def test_invalid_utf8():
    row = decode({"jpg": image_bytes(3), "txt": b"caf\xe9 \xff"})
    assert_failed(row, "decode_error")
    assert "UTF-8" in row.error


def test_json_field_caption():
    config = DecodeConfig(text_key="json:caption")
    meta = {"uid": "u9", "caption": "a dog on a beach"}
    row = decode({"jpg": image_bytes(4), "json": json.dumps(meta).encode()}, config)
    assert row.status == "ok" and row.caption == "a dog on a beach" and row.uid == "u9"


def test_json_field_missing_is_missing_text():
    config = DecodeConfig(text_key="json:caption")
    row = decode({"jpg": image_bytes(4), "json": b'{"uid": "u"}'}, config)
    assert_failed(row, "missing_text")
    assert row.uid == "u"


def test_bad_json_with_json_field():
    config = DecodeConfig(text_key="json:caption")
    row = decode({"jpg": image_bytes(4), "json": b'{"caption": "unterminated'}, config)
    assert_failed(row, "decode_error")
    assert "json" in row.error.lower()


def test_bad_json_ignored_for_txt_captions():
    row = decode({"jpg": image_bytes(4), "txt": b"fine", "json": b"{broken"})
    assert row.status == "ok" and row.uid is None


def test_classify_ok():
    row = decode({"jpg": image_bytes(5), "cls": b" 42\n"}, CLASSIFY)
    assert row.status == "ok" and row.label == 42
    assert row.text is None and row.caption is None
    assert row.image.shape == (3, 32, 32)


def test_classify_missing_label():
    assert_failed(decode({"jpg": image_bytes(5)}, CLASSIFY), "missing_label")


@pytest.mark.parametrize("label", [b"cat", b"4.5", b"", b"1_000"])
def test_classify_non_integer_label(label):
    row = decode({"jpg": image_bytes(5), "cls": label}, CLASSIFY)
    assert_failed(row, "decode_error")
    assert "integer" in row.error


def test_transparent_png_composited_on_white():
    pixels = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black...
    pixels[0, 0] = (255, 0, 0, 255)  # ...except one opaque red pixel
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    row = decode_sample(raw({"png": buffer.getvalue(), "txt": b"emoji"}), CONTRASTIVE, SAME_SIZE)
    assert row.status == "ok"
    image = row.image
    assert image.shape == (3, 8, 8)
    assert image[:, 5, 5].tolist() == [255, 255, 255]
    assert image[:, 0, 0].tolist() == [255, 0, 0]


def test_palette_png_with_transparency_composited_on_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((1, 1), 1)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)
    row = decode_sample(raw({"png": buffer.getvalue(), "txt": b"x"}), CONTRASTIVE, ImageGeometry(size=(4, 4)))
    assert row.image[:, 0, 0].tolist() == [255, 255, 255]
    assert row.image[:, 1, 1].tolist() == [0, 255, 0]


def test_pixel_bomb_is_too_large():
    config = DecodeConfig(max_image_pixels=100)
    row = decode({"jpg": image_bytes(6, size=24), "txt": b"x"}, config)
    assert_failed(row, "too_large")
    assert "24x24" in row.error


def test_pillow_bomb_warning_does_not_leak_globally():
    import warnings

    before = list(warnings.filters)
    decode({"jpg": image_bytes(6), "txt": b"x"})
    assert warnings.filters == before


def test_shard_error_passthrough():
    row = decode({}, status="shard_error", error="truncated tar: unexpected end of data")
    assert row.status == "shard_error" and row.error == "truncated tar: unexpected end of data"
    assert row.image is None and row.text is None and row.uid is None


def test_raw_too_large_passthrough_keeps_uid():
    row = decode({"json": b'{"uid": "u5"}', "txt": b"x"}, status="too_large", error="member big")
    assert row.status == "too_large" and row.uid == "u5" and row.image is None


def test_tokenize_failure_is_decode_error_for_that_caption_only():
    def picky(texts):
        if any("bad" in text for text in texts):
            raise ValueError("too long")
        return tokenize(texts)

    decoder = Decoder(CONTRASTIVE, PREPROCESS, picky)
    good, bad = decoder.decode_samples([raw({"jpg": image_bytes(7), "txt": b"fine"}),
                                        raw({"jpg": image_bytes(8), "txt": b"bad caption"})])
    assert good.status == "ok" and good.text.tolist() == [4]
    assert_failed(bad, "decode_error")
    assert "tokenize" in bad.error and "too long" in bad.error


def test_captions_are_tokenised_in_one_call_per_chunk():
    calls = []

    def counting(texts):
        calls.append(len(texts))
        return tokenize(texts)

    samples = Decoder(CONTRASTIVE, PREPROCESS, counting).decode_samples(
        [raw({"jpg": image_bytes(i), "txt": f"caption {i}".encode()}) for i in range(5)] + [raw({"jpg": image_bytes(9)})])
    assert calls == [6]  # the five captions and "", whose last token is the padding
    assert [sample.status for sample in samples] == ["ok"] * 5 + ["missing_text"]


@pytest.mark.parametrize(
    "kwargs",
    [{"task": "detect"}, {"image_keys": ()}, {"text_key": "json:"}, {"text_key": ""}, {"max_image_pixels": 0},
     {"decoder": "nvjpeg"}, {"max_aspect_ratio": 0.5}],
)
def test_config_validation(kwargs):
    with pytest.raises(MimicfilterError):
        DecodeConfig(**kwargs)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        CONTRASTIVE.task = "classify"  # type: ignore[misc]


def test_classify_label_outside_the_head_is_a_decode_error():
    config = DecodeConfig(task="classify", num_classes=3)
    row = decode({"jpg": image_bytes(5), "cls": b"3"}, config)
    assert_failed(row, "decode_error")
    assert "outside" in row.error
    assert decode({"jpg": image_bytes(5), "cls": b"2"}, config).status == "ok"
