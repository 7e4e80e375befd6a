"""Bytes to pixels without torch: decode one image straight into a resized crop, and parse one label.

Decode workers import only numpy, Pillow, simplejpeg and OpenCV: torch and torchvision cost a worker about
470 MiB of private memory and 3-7 CPU-seconds to start (docs/benchmarks.md, "Ready for the GPUs").

Only what the crop needs is decoded. The crop box is chosen from the header size (Pillow reads only the
header on `Image.open`), then:
- an RGB or grayscale JPEG goes through simplejpeg (libjpeg-turbo: the same pixels as torchvision's
  deprecated `decode_jpeg`, a little faster per core). When the box is at least twice the output size on both
  sides, the decoder scales by 1/2, 1/4 or 1/8 in the DCT: the scale is the largest one that keeps the box at
  least as large as the output, so no upsampling is introduced (Pillow's draft mode gives the same pixels);
- everything else (PNG, WebP, CMYK JPEG) goes through Pillow, with the same DCT scale for JPEGs, and `to_rgb`.
The crop is then resized by `resize_crop`: a triangle filter as wide as the downscale factor, then bilinear
sampling (OpenCV). That is the antialiased bilinear of Pillow and torch to within about one grey level
(PSNR 43 dB), at a fraction of Pillow's cost; `device_decode.py` runs the same two steps in torch.

Failures raise `BadSample` with a reason from bad_samples.py; the caller counts them.
"""

from __future__ import annotations

import io
import json
import math
import warnings

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from pipeline.data.bad_samples import BAD_LABEL, NO_IMAGE, TOO_MANY_PIXELS, UNDECODABLE, BadSample

cv2.setNumThreads(1)  # one decode task per CPU: OpenCV's own thread pool would oversubscribe them

Box = tuple[int, int, int, int]  # top, left, height, width in source pixels
DRAFT_SCALES = (8, 4, 2)
# What an alpha channel is composited onto: white, as the images were meant to be seen on a page.
ALPHA_BACKGROUND = (255, 255, 255)
# Pillow modes of the JPEGs that simplejpeg decodes to RGB exactly; CMYK and YCCK go through Pillow
SIMPLEJPEG_MODES = ("RGB", "L")


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


def is_plain_jpeg(image: Image.Image) -> bool:
    """An RGB or grayscale JPEG: what simplejpeg and nvJPEG decode to the same RGB as Pillow."""
    return image.format == "JPEG" and image.mode in SIMPLEJPEG_MODES


def decode_resized_crop(data: bytes, image: Image.Image, box: Box, out_size: int) -> np.ndarray:
    """Decode `box` of an image opened by `open_image` and resize it to (out_size, out_size, 3) uint8."""
    top, left, height, width = box
    try:
        draft = draft_scale(image, height, width, out_size)
        full_w, full_h = image.size
        if is_plain_jpeg(image):
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-full_h // draft),
                                            min_width=-(-full_w // draft))
        else:
            if draft > 1:
                # Pillow picks the largest scale s with size // requested >= s; flooring makes that exactly `draft`
                image.draft(None, (max(1, full_w // draft), max(1, full_h // draft)))
            pixels = np.asarray(to_rgb(image))
    except Exception as e:  # truncated data, corrupt entropy coding, unsupported variants
        raise BadSample(UNDECODABLE, f"{type(e).__name__}: {e}") from e
    if draft > 1:
        sy, sx = pixels.shape[0] / full_h, pixels.shape[1] / full_w
        top, left = int(top * sy), int(left * sx)
        height, width = max(out_size, int(height * sy)), max(out_size, int(width * sx))
    return resize_crop(pixels[top: top + height, left: left + width], out_size)


def draft_scale(image: Image.Image, height: int, width: int, out_size: int) -> int:
    """Largest JPEG DCT scale that keeps the crop box >= out_size on both sides; 1 means decode in full."""
    if image.format != "JPEG":
        return 1
    room = min(width, height) // out_size
    return next((s for s in DRAFT_SCALES if s <= room), 1)


def triangle_taps(factor: float) -> np.ndarray:
    """The normalised taps of antialiased bilinear for a downscale by `factor` (>= 1): a triangle of half-width
    `factor` source pixels, sampled at whole-pixel offsets; (1,) when nothing is filtered."""
    radius = max(0, math.ceil(factor) - 1)
    taps = np.clip(1.0 - np.abs(np.arange(-radius, radius + 1, dtype=np.float64)) / max(factor, 1.0), 0.0, None)
    return (taps / taps.sum()).astype(np.float32)


def resize_crop(crop: np.ndarray, out_size: int) -> np.ndarray:
    """(h, w, 3) uint8 -> (out_size, out_size, 3) uint8: triangle prefilter where the crop is downscaled, then
    bilinear sampling at pixel centres (align_corners=False)."""
    height, width = crop.shape[:2]
    if (height, width) == (out_size, out_size):
        return np.ascontiguousarray(crop)
    if height > out_size or width > out_size:
        crop = cv2.sepFilter2D(crop, -1, triangle_taps(width / out_size), triangle_taps(height / out_size),
                               borderType=cv2.BORDER_REPLICATE)
    return cv2.resize(crop, (out_size, out_size), interpolation=cv2.INTER_LINEAR)


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
