"""Decoders per core on the same crops, what a decode worker costs to start and to keep, and device decode.

decoders
    One process, one thread. The data benchmark's images (data_speed.imagenet_like_samples: 500x375 JPEGs) and
    one RandomResizedCrop box each, drawn once, so every contender decodes and resizes the same crops to
    --img-size. Contenders, timed in turn for --rounds rounds (alternating order), each row the median:
      previous: torchvision's `decode_jpeg` (deprecated since torchvision 0.29) + Pillow's draft mode for large
          boxes + torch's antialiased bilinear, as decode tasks did before; kept here, for this comparison only;
      ours: `decode.decode_resized_crop` (simplejpeg, its DCT scaling for large boxes, OpenCV's triangle
          prefilter + bilinear);
      and the other maintained decoders with the resize each would bring: TorchCodec's CPU `decode_jpeg` +
      torch, simplejpeg + Pillow's resize, Pillow alone. PyTurboJPEG needs a system libturbojpeg, which pip
      does not install; it is left out.
    Each row gives images/s per core, the ratio to the previous path and the PSNR of its crops against the
    previous path's.

workers
    A decode worker's private memory (USS; PSS and RSS beside it) after one epoch of the Ray Data pipeline, in a
    fresh local Ray, read from the worker processes themselves (`ray::IDLE` once their tasks end, with pyarrow
    mapped: they ran Ray Data tasks); whether torch's library is mapped into them; Ray Data's own floor (the
    same workers after an identity map of as many rows); and the CPU-seconds a fresh interpreter that has
    imported Ray Data spends to import the decode stage and decode its first batch. With the default
    transforms, and with RandAugment (the one transform that imports torch), side by side.

device
    `device_decode.DeviceDecoder` on batches of --batch-size prepared rows: images/s of decode + crop + resize +
    flip on the device (the GPU when there is one, else the CPU, through the same path), against the CPU task
    path (`transforms.decode_batch`) on one core.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from datetime import date

import numpy as np

from pipeline.benchmarks import chosen_modes

MODES = ("decoders", "workers", "device")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--num-images", type=int, default=400, help="JPEGs decoded per round")
    parser.add_argument("--img-size", type=int, default=224, help="output side in pixels")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; rows are medians")
    parser.add_argument("--batch-size", type=int, default=64, help="device mode: rows per batch")
    parser.add_argument("--worker-images", type=int, default=400, help="workers mode: images in the epoch")
    parser.add_argument("--ray-cpus", type=int, default=2, help="workers mode: CPUs of the fresh local Ray")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and the crop boxes")


def bench_images(num_images: int, img_size: int, seed: int) -> tuple[list[bytes], list[tuple[int, int, int, int]]]:
    """The data benchmark's JPEGs and one RandomResizedCrop box per image, drawn from its header."""
    from PIL import Image

    from pipeline.benchmarks.data_speed import imagenet_like_samples
    from pipeline.data.transforms import random_resized_crop_box

    datas = [s.image for s in imagenet_like_samples(num_images, seed)]
    rng = np.random.default_rng(seed)
    boxes = []
    for data in datas:
        width, height = Image.open(io.BytesIO(data)).size
        boxes.append(random_resized_crop_box(width, height, (0.08, 1.0), (3 / 4, 4 / 3), rng))
    return datas, boxes


def previous_decode(data: bytes, box, out_size: int) -> np.ndarray:
    """The decode tasks' path before this benchmark's change, for comparison: torchvision's `decode_jpeg`,
    Pillow's draft mode for boxes of twice the output or more, torch's antialiased bilinear."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    from pipeline.data.decode import draft_scale

    image = Image.open(io.BytesIO(data))
    top, left, height, width = box
    draft = draft_scale(image, height, width, out_size)
    if draft > 1:
        full_w, full_h = image.size
        image.draft("RGB", (max(1, full_w // draft), max(1, full_h // draft)))
        sx, sy = image.width / full_w, image.height / full_h
        top, left = int(top * sy), int(left * sx)
        height, width = max(out_size, int(height * sy)), max(out_size, int(width * sx))
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    crop = pixels[:, top: top + height, left: left + width].unsqueeze(0)
    crop = F.interpolate(crop.contiguous(memory_format=torch.channels_last), size=(out_size, out_size),
                         mode="bilinear", antialias=True, align_corners=False)
    return crop[0].permute(1, 2, 0).numpy()


def contenders(out_size: int) -> dict:
    """name -> fn(data, box, row) that writes the (3, S, S) crop of `box` into the batch row `row` (a torch
    tensor for the previous path, as its batches were, else numpy). The two task paths also draw a box and a
    flip as they do per image (the cost is theirs), and then use the shared box, so the crops are the same."""
    import simplejpeg
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchcodec.decoders import decode_jpeg
    from torchvision.transforms import v2

    from pipeline.config import DataConfig
    from pipeline.data.decode import decode_resized_crop, open_image
    from pipeline.data.transforms import ImageTransform

    rrc = v2.RandomResizedCrop(out_size)
    ours = ImageTransform(DataConfig(img_size=out_size), train=True)
    rng = np.random.default_rng(0)

    def previous(data, box, row):
        image = Image.open(io.BytesIO(data))
        rrc.make_params([image])  # the box draw of the previous path (torchvision, on torch's generator)
        crop = torch.from_numpy(previous_decode(data, box, out_size)).permute(2, 0, 1)
        if torch.rand(()) < 0.5:
            crop = crop.flip(-1)
        row.copy_(crop)

    def task(data, box, row):
        image = open_image(data, 10**9)
        _, flip = ours.plan(image, rng)  # the box and flip draws of ours
        crop = decode_resized_crop(data, image, box, out_size)
        row[...] = (crop[:, ::-1] if flip else crop).transpose(2, 0, 1)

    def torch_resize(chw, box):
        top, left, height, width = box
        crop = chw[:, top: top + height, left: left + width].unsqueeze(0).contiguous(memory_format=torch.channels_last)
        return F.interpolate(crop, size=(out_size, out_size), mode="bilinear", antialias=True,
                             align_corners=False)[0].permute(1, 2, 0).numpy()

    def pillow_resize(image, box):
        top, left, height, width = box
        return np.asarray(image.resize((out_size, out_size), Image.BILINEAR,
                                       box=(left, top, left + width, top + height)))

    def alone(fn):  # decode + resize only, into a numpy row
        return lambda data, box, row: row.__setitem__(Ellipsis, fn(data, box).transpose(2, 0, 1))

    return {
        "previous task path: torchvision decode_jpeg + torch resize": previous,
        "our task path: simplejpeg + OpenCV prefiltered bilinear": task,
        "decode + resize only, previous": alone(lambda data, box: previous_decode(data, box, out_size)),
        "decode + resize only, ours": alone(lambda data, box: decode_resized_crop(data, open_image(data, 10**9), box,
                                                                                  out_size)),
        "decode + resize only, TorchCodec CPU + torch resize": alone(lambda data, box: torch_resize(decode_jpeg(data),
                                                                                                    box)),
        "decode + resize only, simplejpeg + Pillow resize":
            alone(lambda data, box: pillow_resize(Image.fromarray(simplejpeg.decode_jpeg(data)), box)),
        "decode + resize only, Pillow": alone(lambda data, box: pillow_resize(Image.open(io.BytesIO(data)), box)),
    }


def measure_decoders(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    datas, boxes = bench_images(args.num_images, args.img_size, args.seed)
    fns = contenders(args.img_size)
    first = next(iter(fns))
    rows = {name: torch.empty((len(datas), 3, args.img_size, args.img_size), dtype=torch.uint8) if name == first
            else np.empty((len(datas), 3, args.img_size, args.img_size), dtype=np.uint8) for name in fns}

    def fill(name: str) -> float:
        start = time.perf_counter()
        for data, box, row in zip(datas, boxes, rows[name], strict=True):
            fns[name](data, box, row)
        return len(datas) / (time.perf_counter() - start)

    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            speed = fill(name)
            if r:
                samples[name].append(speed)
    # the task paths flip at random: their crops are compared where only decode and resize run
    reference = np.asarray(rows["decode + resize only, previous"], dtype=np.float64)
    psnr = {}
    for name, out in rows.items():
        if not name.startswith("decode + resize only"):
            continue
        mse = np.mean((np.asarray(out, dtype=np.float64) - reference) ** 2)
        psnr[name] = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
    per_core = {name: statistics.median(v) for name, v in samples.items()}
    # per-round ratios against the previous path of the same kind (task path, or decode + resize only): robust
    # to a busy spell on the shared cores
    baseline = {name: first if not name.startswith("decode + resize only") else "decode + resize only, previous"
                for name in fns}
    paired = {name: statistics.median(x / y for x, y in zip(v, samples[baseline[name]], strict=True))
              for name, v in samples.items()}
    return {"per_core": per_core, "paired": paired, "psnr": psnr}


def print_decoders(args: argparse.Namespace, result: dict) -> None:
    print(f"\n### Decoders per core: {args.num_images} of the data benchmark's JPEGs, the same RandomResizedCrop "
          f"box each, to {args.img_size} px; {args.rounds} rounds, medians")
    print("| per image | images/s per core | ÷ previous of its kind (per-round) | PSNR vs previous decode + resize |")
    print("|---|---|---|---|")
    for name, speed in result["per_core"].items():
        psnr = result["psnr"].get(name)
        shown = "-" if psnr is None else "identical" if psnr == float("inf") else f"{psnr:.1f} dB"
        print(f"| {name} | {speed:.0f} | {result['paired'][name]:.2f} | {shown} |")


def worker_processes(root_pid: int) -> list:
    """The Ray task workers under `root_pid` that are idle (their tasks done): `ray::IDLE` processes."""
    import psutil

    out = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if proc.cmdline()[:1] == ["ray::IDLE"]:
                out.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def _maps(pid: int, library: str) -> bool:
    """Whether the process has `library` mapped."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(library in line for line in f)
    except OSError:
        return False


def _identity_rows(batch: dict) -> dict:
    return {"image": np.zeros((len(batch["id"]), 3, 224, 224), dtype=np.uint8)}


def _epoch_workers(shards: list[str], img_size: int, randaugment: int, ray_cpus: int) -> None:
    """In a fresh process: one epoch of the pipeline on a fresh local Ray (randaugment < 0: Ray Data's own floor,
    an identity map of as many 224 px rows), then its idle task workers' memory, printed as one JSON line."""
    import json

    import ray

    from pipeline.benchmarks.data_speed import _iterate, train_dataset
    from pipeline.config import DataConfig

    ray.init(num_cpus=ray_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if randaugment < 0:
        rows = ray.data.range(50 * len(shards), override_num_blocks=len(shards)).map_batches(_identity_rows,
                                                                                           batch_size=None)
        _iterate(rows.iter_torch_batches(batch_size=32, device="cpu"))
    else:
        cfg = DataConfig(img_size=img_size, randaugment_num_ops=randaugment)
        _iterate(train_dataset(shards, cfg).iter_torch_batches(batch_size=32, device="cpu"))
    time.sleep(1.0)  # the tasks' workers report IDLE once their last task has returned
    rows = []
    for proc in worker_processes(os.getpid()):
        if not _maps(proc.pid, "libarrow"):  # a worker Ray started that ran no Ray Data task
            continue
        info = proc.memory_full_info()
        rows.append({"uss": info.uss, "pss": info.pss, "rss": info.rss, "torch": _maps(proc.pid, "libtorch_cpu")})
    print(json.dumps(rows))
    ray.shutdown()


START_CODE = """
import sys, time, numpy as np, ray, ray.data
from pipeline.benchmarks.decode_speed import one_row_batch
batch = one_row_batch()
start = time.process_time()
import pipeline.data.datasets
from pipeline.config import DataConfig
from pipeline.data.transforms import decode_batch
decode_batch(batch, cfg=DataConfig(img_size=224, randaugment_num_ops=int(sys.argv[1])), train=True, num_classes=2)
print(time.process_time() - start, 'torch' in sys.modules)
"""


def raw_batch(images: list[bytes], start: int = 0) -> dict:
    """Raw rows of `images` (positions from `start`, label 0), as the tar reader gives them to a decode task."""
    n = len(images)
    column = lambda values: np.array(values, dtype=object)  # noqa: E731
    return {"__key__": column([str(i) for i in range(start, start + n)]), "__url__": column(["bench.tar"] * n),
            "__index__": np.arange(start, start + n), "image": column(images), "cls": column([b"0"] * n),
            "json": column([None] * n), "read_error": column([None] * n)}


def one_row_batch() -> dict:
    """One raw row of a 500x375 JPEG."""
    from pipeline.benchmarks.data_speed import imagenet_like_samples

    return raw_batch([next(iter(imagenet_like_samples(1, 0))).image])


def measure_workers(args: argparse.Namespace, workdir: str) -> dict:
    """{label: {uss, pss, rss (MiB, median over the workers), workers, torch, start_cpu_s}}."""
    import json

    from pipeline.benchmarks.data_speed import build_bench_shards

    shards = build_bench_shards(os.path.join(workdir, "shards"), args.worker_images, 50, args.seed)
    out = {}
    for label, ops in (("default transforms", 0), ("with RandAugment (imports torch)", 2),
                       ("Ray Data's floor: an identity map of as many rows, no decoding", -1)):
        code = ("import sys; from pipeline.benchmarks.decode_speed import _epoch_workers; "
                f"_epoch_workers(sys.argv[1:], {args.img_size}, {ops}, {args.ray_cpus})")
        printed = subprocess.run([sys.executable, "-c", code, *shards], capture_output=True, text=True, check=True)
        rows = json.loads(printed.stdout.strip().splitlines()[-1])
        if not rows:
            raise RuntimeError(f"no idle decode worker found after the epoch ({label})")
        starts = []
        for _ in range(3 if ops >= 0 else 0):
            line = subprocess.run([sys.executable, "-c", START_CODE, str(ops)], capture_output=True, text=True,
                                  check=True).stdout.split()
            starts.append(float(line[0]))
        out[label] = {key: statistics.median(r[key] for r in rows) / 2**20 for key in ("uss", "pss", "rss")}
        out[label].update(workers=len(rows), torch=any(r["torch"] for r in rows),
                          start_cpu_s=statistics.median(starts) if starts else None)
    return out


def print_workers(args: argparse.Namespace, result: dict) -> None:
    print(f"\n### Decode workers after one epoch of {args.worker_images} images on a local Ray of {args.ray_cpus} "
          f"CPUs (medians over the workers); start: CPU-seconds to import the decode stage and decode one image, "
          f"in an interpreter that has imported Ray Data (median of 3)")
    print("| transforms | workers | USS MiB | PSS MiB | RSS MiB | torch mapped | start CPU-s |")
    print("|---|---|---|---|---|---|---|")
    for label, row in result.items():
        start = "-" if row["start_cpu_s"] is None else f"{row['start_cpu_s']:.2f}"
        print(f"| {label} | {row['workers']} | {row['uss']:.0f} | {row['pss']:.0f} | {row['rss']:.0f} | "
              f"{'yes' if row['torch'] else 'no'} | {start} |")


def measure_device(args: argparse.Namespace) -> dict:
    """Images/s of the device path (prepared rows -> crops on the device) and of the CPU task path on one core."""
    import torch

    from pipeline.config import DataConfig
    from pipeline.data.device_decode import DeviceDecoder, decode_device
    from pipeline.data.transforms import decode_batch, prepare_batch

    torch.set_num_threads(1)
    datas, _ = bench_images(args.num_images, args.img_size, args.seed)
    n = len(datas) // args.batch_size * args.batch_size
    if n == 0:
        raise SystemExit(f"--num-images {args.num_images} is less than one --batch-size {args.batch_size}")
    batches = [raw_batch(datas[s: s + args.batch_size], s) for s in range(0, n, args.batch_size)]
    cfg = DataConfig(img_size=args.img_size, decode_device="gpu")
    device = decode_device(0)
    prepared = [prepare_batch(b, cfg=cfg, train=True, num_classes=2, seed=i) for i, b in enumerate(batches)]
    decoder = DeviceDecoder(cfg, train=True, device=device)

    def on_device() -> float:
        start = time.perf_counter()
        for rows in prepared:
            images = decoder(rows)["image"]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        del images
        return n / (time.perf_counter() - start)

    def on_cpu_task() -> float:
        start = time.perf_counter()
        for i, b in enumerate(batches):
            decode_batch(b, cfg=cfg, train=True, num_classes=2, seed=i)
        return n / (time.perf_counter() - start)

    def preparing() -> float:
        start = time.perf_counter()
        for i, b in enumerate(batches):
            prepare_batch(b, cfg=cfg, train=True, num_classes=2, seed=i)
        return n / (time.perf_counter() - start)

    on_device()  # warm-up: CUDA context, nvJPEG handles
    samples = {"device_rate": [], "cpu_rate": [], "prepare_rate": []}
    for _ in range(args.rounds):
        samples["device_rate"].append(on_device())
        samples["cpu_rate"].append(on_cpu_task())
        samples["prepare_rate"].append(preparing())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, 1 thread"
    rates = {key: statistics.median(v) for key, v in samples.items()}
    return {"device": name, "images": n, **rates, "ratio": rates["device_rate"] / rates["cpu_rate"]}


def print_device(args: argparse.Namespace, result: dict) -> None:
    print(f"\n### Device decode (data.decode_device=gpu) against the CPU task path: {result['images']} images, "
          f"batches of {args.batch_size}, {args.img_size} px, {args.rounds} rounds, medians")
    print("| path | images/s |\n|---|---|")
    print(f"| Train worker: decode + crop + resize + flip on {result['device']} | {result['device_rate']:.0f} |")
    print(f"| decode task, data.decode_device=cpu: the same on one CPU core | {result['cpu_rate']:.0f} |")
    print(f"| decode task, data.decode_device=gpu: header, crop box, flip on one CPU core | "
          f"{result['prepare_rate']:.0f} |")
    print(f"device ÷ one CPU core: {result['ratio']:.2f}")


def run(args: argparse.Namespace) -> dict:
    import tempfile

    modes = chosen_modes(args.modes, MODES)
    print(f"command: python jobs/benchmark.py decode {' '.join(sys.argv[2:])}".rstrip())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; date {date.today()}")
    results: dict = {}
    if "decoders" in modes:
        results["decoders"] = measure_decoders(args)
        print_decoders(args, results["decoders"])
    if "workers" in modes:
        with tempfile.TemporaryDirectory(prefix="decode-bench-") as workdir:
            results["workers"] = measure_workers(args, workdir)
        print_workers(args, results["workers"])
    if "device" in modes:
        results["device"] = measure_device(args)
        print_device(args, results["device"])
    return results
