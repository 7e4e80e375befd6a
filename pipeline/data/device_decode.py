"""The Train worker's half of `data.decode_device=gpu`: decode a batch of JPEGs on the worker's GPU (nvJPEG,
one batched call through TorchCodec), then crop, resize, flip and augment there.

    decode tasks (CPU, transforms.prepare_batch)          Train worker (DeviceDecodedStream)
    header, pixel limit, label, crop box and flip   ─►   decode_jpeg(batch, device) ─ crop ─ resize ─ flip

ViT-B/16 at 45 % MFU needs 3,400-4,200 images/s per H100, which is 6-8 CPU cores of decoding; GPU nodes rarely
have those to spare, and Ray Data has no GPU decode of its own. JPEG bytes are also smaller than pixels
through the object store. On a worker without a GPU the same path runs with TorchCodec's CPU decoder, which is
how it is tested.

The resize is the CPU path's (decode.resize_crop) in torch: the same triangle prefilter, then bilinear
sampling, so both paths give the same pixels within rounding. JPEGs that fail to decode are dropped and
reported to the dataset's ledger with their (shard, index), as the decode tasks report theirs; the stream
re-batches the good rows into full batches, and WorkerBatches still holds every rank to its step count.
"""

from __future__ import annotations

import logging
import posixpath
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import DataConfig
from pipeline.data.bad_samples import MAX_EXAMPLES, UNDECODABLE
from pipeline.data.decode import triangle_taps
from pipeline.data.transforms import DECODED_PIXELS, ENCODED_JPEG, RandAugment

log = logging.getLogger(__name__)

COLUMNS = ("image", "label", "shard", "index")


def decode_device(local_rank: int) -> torch.device:
    """The worker's GPU when it has one, else its CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


class DeviceDecoder:
    """Prepared rows (transforms.prepare_batch) -> {"image": uint8 (N, 3, S, S), "label", "shard", "index"}
    tensors on `device`, for the rows whose image decodes."""

    def __init__(self, cfg: DataConfig, *, train: bool, device: torch.device, ledger=None, shard_uris=None):
        self.img_size = cfg.img_size
        self.device = device
        self.ledger = ledger
        self.shard_uris = shard_uris  # index -> uri, for the examples of a bad-sample report
        self.randaugment = RandAugment(cfg) if train and cfg.randaugment_num_ops > 0 else None
        self.rng = np.random.default_rng()
        if device.type == "cuda":
            check_device_decoding(device)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        size = self.img_size
        kinds = rows["kind"]
        jpegs = np.flatnonzero(kinds == ENCODED_JPEG)
        decoded, failed = self._decode([rows["data"][i] for i in jpegs])
        images: dict[int, torch.Tensor] = dict(zip(jpegs.tolist(), decoded, strict=True))
        for i in np.flatnonzero(kinds == DECODED_PIXELS).tolist():
            pixels = torch.frombuffer(bytearray(rows["data"][i]), dtype=torch.uint8).view(size, size, 3)
            images[i] = pixels.permute(2, 0, 1).to(self.device)
        bad = {int(jpegs[j]): message for j, message in failed.items()}
        good = [i for i in range(len(kinds)) if i not in bad]
        out = torch.empty((len(good), 3, size, size), dtype=torch.uint8, device=self.device)
        for k, i in enumerate(good):
            top, left, height, width = rows["box"][i].tolist()
            crop = resize_crop(images[i][:, top: top + height, left: left + width], size)
            if rows["flip"][i]:
                crop = crop.flip(-1)
            if self.randaugment is not None:
                crop = self.randaugment.on_tensor(crop, self.rng)
            out[k] = crop
        if bad:
            self._report(rows, bad)
        batch = {"image": out}
        for name in COLUMNS[1:]:
            if name in rows:
                batch[name] = torch.from_numpy(np.ascontiguousarray(rows[name][good])).to(self.device)
        return batch

    def _decode(self, datas: list[bytes]) -> tuple[list[torch.Tensor | None], dict[int, str]]:
        """One batched decode; when it fails, one by one to find the images that do not decode."""
        from torchcodec.decoders import decode_jpeg

        if not datas:
            return [], {}
        try:
            return decode_jpeg(datas, mode="RGB", device=self.device), {}
        except RuntimeError:
            pass
        decoded: list[torch.Tensor | None] = []
        failed: dict[int, str] = {}
        for j, data in enumerate(datas):
            try:
                decoded.append(decode_jpeg(data, mode="RGB", device=self.device))
            except RuntimeError as e:
                decoded.append(None)
                # TorchCodec's messages start with the C++ function and source line: keep what follows
                failed[j] = str(e).splitlines()[0].rsplit(", ", 1)[-1][:200]
        return decoded, failed

    def _report(self, rows: dict[str, np.ndarray], bad: dict[int, str]) -> None:
        """The images that failed here: bad samples of the ledger, seen already by the task that prepared them."""
        ids = [(int(rows["shard"][i]), int(rows["index"][i])) for i in bad] if "shard" in rows else []
        examples = [f"{self._where(rows, i)} ({UNDECODABLE}: {message})" for i, message in bad.items()]
        log.debug("%d images failed to decode on %s", len(bad), self.device)
        if self.ledger is not None:
            self.ledger.record(0, dict(Counter({UNDECODABLE: len(bad)})), examples[:MAX_EXAMPLES], ids)

    def _where(self, rows: dict[str, np.ndarray], i: int) -> str:
        if "shard" not in rows or self.shard_uris is None:
            return f"row {i}"
        return f"{posixpath.basename(self.shard_uris[int(rows['shard'][i])])}#{int(rows['index'][i])}"


def check_device_decoding(device: torch.device) -> None:
    """Raise a clear error when TorchCodec cannot decode a JPEG on `device` (a build without CUDA, say), before
    every image of the run is counted as bad."""
    import io

    from PIL import Image
    from torchcodec.decoders import decode_jpeg

    probe = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(probe, format="JPEG")
    try:
        decode_jpeg([probe.getvalue()], mode="RGB", device=device)
    except Exception as e:
        raise RuntimeError(f"data.decode_device=gpu: TorchCodec cannot decode JPEGs on {device} ({e}); install the "
                           f"torchcodec build for this torch and CUDA, or set data.decode_device=cpu") from e


def resize_crop(crop: torch.Tensor, out_size: int) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, out_size, out_size) uint8 on the crop's device, as decode.resize_crop does it:
    the triangle prefilter where the crop is downscaled (rounded to uint8, as OpenCV keeps it), then bilinear
    sampling at pixel centres."""
    height, width = crop.shape[-2:]
    if (height, width) == (out_size, out_size):
        return crop
    x = crop.unsqueeze(0).float()
    if height > out_size or width > out_size:
        x = _filter(x, triangle_taps(width / out_size), dim=3)
        x = _filter(x, triangle_taps(height / out_size), dim=2)
        x = x.round_()
    x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0]


def _filter(x: torch.Tensor, taps: np.ndarray, dim: int) -> torch.Tensor:
    """Depthwise convolution of (1, 3, H, W) along `dim` (2: rows, 3: columns), edges replicated."""
    radius = len(taps) // 2
    if radius == 0:
        return x
    kernel = torch.from_numpy(taps).to(x.device).view(1, 1, *((-1, 1) if dim == 2 else (1, -1))).expand(3, 1, -1, -1)
    pad = (0, 0, radius, radius) if dim == 2 else (radius, radius, 0, 0)
    return F.conv2d(F.pad(x, pad, mode="replicate"), kernel, groups=3)


class DeviceDecodedStream:
    """A stream of prepared rows (Ray Data's split, or a LocalImageStream) as decoded batches: the
    `iter_torch_batches` the trainer and the evaluator call, with full batches of `batch_size` good rows."""

    def __init__(self, stream, decoder: DeviceDecoder):
        self.stream = stream
        self.decoder = decoder

    def iter_torch_batches(self, *, batch_size: int, drop_last: bool = False,
                           local_shuffle_buffer_size: int | None = None, prefetch_batches: int = 1,
                           device: str | torch.device = "auto") -> Iterator[dict[str, torch.Tensor]]:
        """`device` is the decoder's: accepted for the signature's sake."""
        held: list[dict[str, torch.Tensor]] = []
        count = 0
        for rows in self.stream.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False,
                                             local_shuffle_buffer_size=local_shuffle_buffer_size,
                                             prefetch_batches=prefetch_batches):
            decoded = self.decoder(rows)
            held.append(decoded)
            count += len(decoded["image"])
            while count >= batch_size:
                merged = {name: torch.cat([part[name] for part in held]) for name in held[0]}
                yield {name: value[:batch_size] for name, value in merged.items()}
                held = [{name: value[batch_size:] for name, value in merged.items()}]
                count -= batch_size
        if count and not drop_last:
            yield {name: torch.cat([part[name] for part in held]) for name in held[0]}


def on_device(stream, cfg: DataConfig, *, train: bool, ledger, local_rank: int, shard_uris=None):
    """`stream` as the trainer reads it: itself when tasks decode (data.decode_device=cpu), else decoded on
    this worker's device."""
    if cfg.decode_device != "gpu":
        return stream
    decoder = DeviceDecoder(cfg, train=train, device=decode_device(local_rank), ledger=ledger,
                            shard_uris=shard_uris)
    return DeviceDecodedStream(stream, decoder)
