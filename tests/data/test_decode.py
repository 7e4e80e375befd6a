"""Decoding to RGB from every Pillow mode, DCT-scaled decoding, the resize, pixel limits and label parsing."""

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.bad_samples import BAD_LABEL, NO_IMAGE, TOO_MANY_PIXELS, UNDECODABLE, BadSample
from pipeline.data.decode import decode_resized_crop, draft_scale, open_image, parse_label, resize_crop, to_rgb


def saved(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def full_decode(data: bytes, out_size: int) -> np.ndarray:
    """Whole image, no crop: (H, W, 3) uint8 after decode_resized_crop at the image's own size."""
    image = open_image(data, 10**9)
    box = (0, 0, image.height, image.width)
    return decode_resized_crop(data, image, box, out_size)


def test_cmyk_jpeg_becomes_the_rgb_it_was_made_from():
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:8] = (200, 50, 10)
    rgb[8:] = (20, 120, 240)
    data = saved(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = full_decode(data, 16)
    assert np.abs(out[2, 4].astype(int) - (200, 50, 10)).max() <= 4
    assert np.abs(out[13, 4].astype(int) - (20, 120, 240)).max() <= 4


def test_grayscale_jpeg_and_png_become_three_equal_channels():
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    for data in (saved(Image.fromarray(gray, "L"), "JPEG", quality=100), saved(Image.fromarray(gray, "L"), "PNG")):
        out = full_decode(data, 16)
        assert out.shape == (16, 16, 3)
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
        assert np.abs(out[..., 0].astype(int) - gray).max() <= 3


def test_rgba_png_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # fully transparent red: the background shows
    rgba[0, 1] = (0, 0, 255, 255)  # opaque blue
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black over white: mid grey
    out = to_rgb(Image.open(io.BytesIO(saved(Image.fromarray(rgba, "RGBA"), "PNG"))))
    pixels = np.asarray(out)
    assert out.mode == "RGB"
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert tuple(pixels[0, 1]) == (0, 0, 255)
    assert all(abs(int(v) - 127) <= 1 for v in pixels[0, 2])


def test_palette_png_with_and_without_transparency():
    palette = Image.new("P", (4, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putdata([0, 1, 0, 1])
    plain = np.asarray(to_rgb(Image.open(io.BytesIO(saved(palette, "PNG")))))
    assert plain[0].tolist() == [[255, 0, 0], [0, 255, 0], [255, 0, 0], [0, 255, 0]]
    see_through = np.asarray(to_rgb(Image.open(io.BytesIO(saved(palette, "PNG", transparency=0)))))
    assert see_through[0].tolist() == [[255, 255, 255], [0, 255, 0], [255, 255, 255], [0, 255, 0]]


def test_16_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 40000, 65535]], dtype=np.uint16)
    data = saved(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(to_rgb(Image.open(io.BytesIO(data))))
    assert out[0, :, 0].tolist() == [0, 100, 156, 255]  # clipping would give [0, 255, 255, 255]
    assert (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize("mode", ["RGB", "CMYK"])  # simplejpeg's scaled decode, and Pillow's draft mode
def test_a_small_crop_of_a_large_jpeg_is_decoded_at_reduced_scale(tars, mode):
    data = tars.image_bytes(1600, 1200, quality=90)
    if mode == "CMYK":
        data = saved(Image.open(io.BytesIO(data)).convert("CMYK"), "JPEG", quality=95)
    image = open_image(data, 10**9)
    box = (100, 200, 900, 900)  # 900 px box to a 224 px output: 1/4 scale keeps the box >= 224
    assert draft_scale(image, 900, 900, 224) == 4
    drafted = decode_resized_crop(data, image, box, 224)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    reference = full.resize((224, 224), Image.BILINEAR, box=(200, 100, 1100, 1000))
    diff = np.abs(drafted.astype(int) - np.asarray(reference).astype(int))
    assert drafted.dtype == np.uint8 and drafted.shape == (224, 224, 3)
    assert diff.mean() < 3.0
    assert draft_scale(open_image(data, 10**9), 300, 300, 224) == 1  # a box this small needs every pixel


def test_a_plain_jpeg_decodes_to_the_same_pixels_as_pillow_and_torchcodec(tars):
    from torchcodec.decoders import decode_jpeg

    data = tars.image_bytes(256, 256, quality=90)
    ours = decode_resized_crop(data, open_image(data, 10**9), (0, 0, 256, 256), 256)  # no resize
    assert np.array_equal(ours, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert np.array_equal(ours, decode_jpeg(data).permute(1, 2, 0).numpy())


@pytest.mark.parametrize(("height", "width"), [(300, 330), (224, 500), (90, 120), (1000, 700), (224, 224)])
def test_resize_is_antialiased_bilinear_within_two_grey_levels_on_average(height, width):
    """Against torch's antialiased bilinear (Pillow's filter) on a photo: a triangle prefilter then bilinear
    sampling."""
    from sklearn.datasets import load_sample_images

    photo = Image.fromarray(load_sample_images().images[0])  # 640 x 427
    crop = np.asarray(photo.resize((width, height), Image.BICUBIC) if height > 427 else photo)[:height, :width]
    crop = np.array(crop)
    ours = resize_crop(crop, 224)
    reference = F.interpolate(torch.from_numpy(crop).permute(2, 0, 1)[None].float(), size=(224, 224),
                              mode="bilinear", antialias=True, align_corners=False)[0].round().clamp(0, 255)
    diff = np.abs(ours.astype(float) - reference.permute(1, 2, 0).numpy())
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    if (height, width) == (224, 224):
        assert diff.max() == 0
    else:
        assert diff.mean() < 2.0, diff.mean()  # 0.7 on average over random crops of both photos
        assert 10 * np.log10(255**2 / np.mean(diff**2)) > 35.0


def test_missing_empty_and_garbage_images_are_bad_samples(tars):
    with pytest.raises(BadSample) as missing:
        open_image(None, 10**6)
    assert missing.value.reason == NO_IMAGE
    with pytest.raises(BadSample) as garbage:
        open_image(b"\x00not an image" * 10, 10**6)
    assert garbage.value.reason == UNDECODABLE
    truncated = tars.image_bytes(64, 48)[:300]
    with pytest.raises(BadSample) as cut:
        decode_resized_crop(truncated, open_image(truncated, 10**6), (0, 0, 48, 64), 32)
    assert cut.value.reason == UNDECODABLE


def test_pixel_limit_is_checked_from_the_header(tars):
    data = tars.image_bytes(300, 200)
    with pytest.raises(BadSample) as bomb:
        open_image(data, max_image_pixels=300 * 200 - 1)
    assert bomb.value.reason == TOO_MANY_PIXELS and "60000 pixels" in bomb.value.detail
    assert open_image(data, max_image_pixels=300 * 200).size == (300, 200)


@pytest.mark.parametrize(("cls", "meta", "key", "num_classes", "expected"), [
    (b"3", None, "", 10, 3),
    (b" 7\n", None, "", 0, 7),
    (None, json.dumps({"label": 4}).encode(), "label", 5, 4),
    (None, json.dumps({"label": "2"}).encode(), "label", 5, 2),
])
def test_labels_parse_from_cls_or_json(cls, meta, key, num_classes, expected):
    assert parse_label(cls, meta, key, num_classes) == expected


@pytest.mark.parametrize(("cls", "meta", "key", "num_classes", "message"), [
    (None, None, "", 10, "missing .cls"),
    (b"ten", None, "", 10, "not an integer"),
    (b"10", None, "", 10, "outside [0, 10)"),
    (b"-1", None, "", 0, "outside"),
    (None, None, "label", 10, "missing .json"),
    (None, b"{bad json", "label", 10, "not JSON"),
    (None, json.dumps({"other": 1}).encode(), "label", 10, "no key 'label'"),
    (None, json.dumps({"label": 1.5}).encode(), "label", 10, "not an integer"),
])
def test_bad_labels_are_bad_samples(cls, meta, key, num_classes, message):
    with pytest.raises(BadSample) as bad:
        parse_label(cls, meta, key, num_classes)
    assert bad.value.reason == BAD_LABEL and message in bad.value.detail
