"""Bytes to pixels: decode one image straight into a resized crop, and parse one label.

Only what the crop needs is decoded. The crop box is chosen from the header size (Pillow reads only the
header on `Image.open`), then:
- a JPEG whose box is at least twice the output size on both sides is decoded with Pillow's draft mode, which
  lets libjpeg scale by 1/2, 1/4 or 1/8 in the DCT; the scale is the largest one that keeps the box at least
  as large as the output, so no upsampling is introduced;
- any other RGB or grayscale JPEG goes through `torchvision.io.decode_jpeg` (libjpeg-turbo, about 1.4x
  Pillow's full decode here);
- everything else (PNG, WebP, CMYK JPEG) goes through Pillow and `to_rgb`.
The crop is then resized with `torch.nn.functional.interpolate` (bilinear, antialiased) on a channels-last
uint8 view, about twice as fast as Pillow's resize on these machines.

Failures raise `BadSample` with a reason from bad_samples.py; the caller counts them.
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:  # torchvision 0.29 deprecates its image codecs in favour of torchcodec; Pillow covers their absence
    from torchvision.io import ImageReadMode, decode_jpeg

    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
except ImportError:  # pragma: no cover - depends on the torchvision release
    decode_jpeg = None

from pipeline.data.bad_samples import BAD_LABEL, NO_IMAGE, TOO_MANY_PIXELS, UNDECODABLE, BadSample

Box = tuple[int, int, int, int]  # top, left, height, width in source pixels
DRAFT_SCALES = (8, 4, 2)
# What an alpha channel is composited onto: white, as the images were meant to be seen on a page.
ALPHA_BACKGROUND = (255, 255, 255)


def open_image(data: bytes | None, max_image_pixels: int) -> Image.Image:
    """Open lazily (header only) and enforce the pixel limit before any pixel is decoded."""
    if data is None or len(data) == 0:
        raise BadSample(NO_IMAGE, "the key has no image member")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # Pillow's own limit, twice Image.MAX_IMAGE_PIXELS
        raise BadSample(TOO_MANY_PIXELS, str(e)) from e
    except Exception as e:  # Pillow raises many types for garbage: all mean the same here
        raise BadSample(UNDECODABLE, f"{type(e).__name__}: {e}") from e
    width, height = image.size
    if width * height > max_image_pixels:
        raise BadSample(TOO_MANY_PIXELS, f"{width}x{height} = {width * height} pixels > {max_image_pixels}")
    if width < 1 or height < 1:
        raise BadSample(UNDECODABLE, f"empty image {width}x{height}")
    return image


def decode_resized_crop(data: bytes, image: Image.Image, box: Box, out_size: int) -> torch.Tensor:
    """Decode `box` of an image opened by `open_image` and resize it to (3, out_size, out_size) uint8, in
    channels-last memory (a (H, W, 3) buffer)."""
    top, left, height, width = box
    try:
        draft = _draft_scale(image, height, width, out_size)
        if draft > 1:
            full_w, full_h = image.size
            # Pillow picks the largest scale s with size // requested >= s; flooring makes that exactly `draft`.
            image.draft(image.mode if image.mode in ("RGB", "L") else None,
                        (max(1, full_w // draft), max(1, full_h // draft)))
            sx, sy = image.width / full_w, image.height / full_h
            top, left = int(top * sy), int(left * sx)
            height, width = max(out_size, int(height * sy)), max(out_size, int(width * sx))
            pixels = _hwc_tensor(to_rgb(image))
        elif decode_jpeg is not None and image.format == "JPEG" and image.mode in ("RGB", "L"):
            pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        else:
            pixels = _hwc_tensor(to_rgb(image))
    except Exception as e:  # truncated data, corrupt entropy coding, unsupported variants
        raise BadSample(UNDECODABLE, f"{type(e).__name__}: {e}") from e
    crop = pixels[:, top: top + height, left: left + width].unsqueeze(0)
    if crop.shape[-2:] != (out_size, out_size):
        # channels_last uint8 takes torch's vectorised antialiasing kernel; contiguous CHW is ~2.5x slower
        crop = F.interpolate(crop.contiguous(memory_format=torch.channels_last), size=(out_size, out_size),
                             mode="bilinear", antialias=True, align_corners=False)
    return crop[0]  # channels-last strides: the caller's copy into its batch makes it CHW


def _draft_scale(image: Image.Image, height: int, width: int, out_size: int) -> int:
    """Largest JPEG DCT scale that keeps the crop box >= out_size on both sides; 1 means decode in full."""
    if image.format != "JPEG":
        return 1
    room = min(width, height) // out_size
    return next((s for s in DRAFT_SCALES if s <= room), 1)


def _hwc_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 view of an HWC buffer, i.e. channels-last memory."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha composited on white, 16-bit scaled down (not clipped), CMYK and
    palettes expanded."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image)
        if mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values.astype(np.float64) / 257.0  # 65535 -> 255, keeps the relative range
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def parse_label(cls: bytes | None, meta: bytes | None, label_key: str, num_classes: int) -> int:
    """The label from `.cls`, or from `label_key` of `.json`; raises BadSample(BAD_LABEL) unless it is an
    integer in [0, num_classes) (any integer >= 0 when num_classes is 0)."""
    if not label_key:
        if cls is None:
            raise BadSample(BAD_LABEL, "missing .cls member")
        raw = cls.decode("utf-8", "replace").strip()
    else:
        if meta is None:
            raise BadSample(BAD_LABEL, "missing .json member")
        try:
            body = json.loads(meta)
        except ValueError as e:
            raise BadSample(BAD_LABEL, f".json is not JSON: {e}") from e
        if not isinstance(body, dict) or label_key not in body:
            raise BadSample(BAD_LABEL, f".json has no key {label_key!r}")
        raw = body[label_key]
    if isinstance(raw, bool) or isinstance(raw, float) and not raw.is_integer():
        raise BadSample(BAD_LABEL, f"label {raw!r} is not an integer")
    try:
        label = int(raw)
    except (TypeError, ValueError):
        raise BadSample(BAD_LABEL, f"label {raw!r} is not an integer") from None
    if label < 0 or (num_classes and label >= num_classes):
        raise BadSample(BAD_LABEL, f"label {label} outside [0, {num_classes or 'inf'})")
    return label
