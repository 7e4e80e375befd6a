"""Images/s of our Ray Data decode pipeline vs webdataset's DataLoader and a bare loop, and its peak RSS.

All of them read the same ImageNet-like shards (JPEGs of about 500x375 at quality 90, cut and rescaled at random
from the photos scikit-learn ships) and produce 224 px RandomResizedCrop + horizontal flip uint8 images:
  (a) ours: build_image_dataset(train=True) iterated with iter_torch_batches, on a local Ray that is given
      --ray-cpus logical CPUs (default twice the cores: Ray Data leaves ~0.15 s between one decode task's end
      and the next one's start on a worker, and a second task per core fills that gap); (a, Ray Data capped
      at --cores CPUs) shows the same without oversubscription;
  (b) webdataset: WebDataset(...).decode("pil") + torchvision v2 RandomResizedCrop/RandomHorizontalFlip/
      PILToTensor, in a torch DataLoader with num_workers = --cores (spawned once and persistent);
  (c) bare: one process decoding and cropping the same bytes with our per-image transform (no pipeline),
      times --cores: the practical limit of (a) on these cores;
  (c-pil) the same bare loop with (b)'s Pillow decode and torchvision crop, times --cores, for context.
After one untimed warm-up epoch each (worker start-up, imports), the five are timed in turn, --rounds times,
and the table gives each one's median: the CPUs of these machines are shared, and interleaving keeps a busy
spell from landing on one contender only. Ray stays up (idle) while (b) and (c) run.
Peak RSS sums the resident memory of the driver and every process it starts (Ray's GCS, raylet, workers) over
one epoch of (a), once with the shards and once with ten times as many (hard links), in fresh processes;
PSS, which splits shared pages among the processes that map them, is reported beside it.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.shard_writer import write_split
from pipeline.data.sources import Sample

SHARD_GLOB = "bench-*.tar"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-images", type=int, default=4000, help="JPEGs in the benchmark shards")
    parser.add_argument("--shard-size", type=int, default=200, help="images per shard")
    parser.add_argument("--img-size", type=int, default=224, help="output side in pixels")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch for (a) and (b)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(),
                        help="CPUs for (a) and DataLoader workers for (b)")
    parser.add_argument("--ray-cpus", type=int, default=2 * (os.cpu_count() or 1),
                        help="logical CPUs of the local Ray for (a)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the table shows medians")
    parser.add_argument("--bare-images", type=int, default=0,
                        help="images timed in each bare loop (c); 0: all of them, as (a) and (b) read")
    parser.add_argument("--rss-multiple", type=int, default=10,
                        help="the large RSS run reads this many times the shards")
    parser.add_argument("--skip-rss", action="store_true", help="do not run the peak RSS measurements")
    parser.add_argument("--workdir", default="", help="folder for the shards (default: a temporary folder, removed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images")


def imagenet_like_samples(num_images: int, seed: int):
    """Random crops (35-100% of the area, 4:3 or 3:4) of scikit-learn's two photos, resized to 500x375 or
    375x500 and stored as quality-90 JPEGs."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        photo = photos[i % len(photos)]
        landscape = rng.random() < 0.8
        out_w, out_h = (500, 375) if landscape else (375, 500)
        area = rng.uniform(0.35, 1.0) * photo.width * photo.height
        w = min(photo.width, int(np.sqrt(area * out_w / out_h)))
        h = min(photo.height, int(w * out_h / out_w))
        x, y = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
        image = photo.crop((x, y, x + w, y + h)).resize((out_w, out_h), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        yield Sample(key=f"{i:08d}", image=buf.getvalue(), image_ext="jpg", label=i % 2,
                     source=f"sklearn.datasets.load_sample_images[{i % len(photos)}]", width=out_w, height=out_h)


def build_bench_shards(folder: str, num_images: int, shard_size: int, seed: int) -> list[str]:
    manifest = write_split(imagenet_like_samples(num_images, seed), ["china", "flower"], folder, split="bench",
                           total=num_images, max_count=shard_size, max_size=1 << 40, progress=False)
    return [os.path.join(folder, s.name) for s in manifest.shards]


def bench_config(img_size: int) -> DataConfig:
    return DataConfig(img_size=img_size, decode_num_cpus=1.0)


def train_dataset(spec: str | list[str], cfg: DataConfig):
    """The training input pipeline over `spec` as the trainer builds it: the shard set read once, a bad-sample
    ledger actor, `build_image_dataset` (Ray must be up)."""
    from pipeline.data.datasets import build_image_dataset
    from pipeline.data.ledger import start_ledger
    from pipeline.data.shard_set import read_shard_set

    shards = read_shard_set(spec)
    ledger = start_ledger(cfg.max_bad_fraction, cfg.min_samples_for_bad_check)
    return build_image_dataset(shards, cfg, train=True, num_classes=len(shards.classes), ledger=ledger)


def ray_pipeline(shards: list[str], img_size: int, batch_size: int, max_cpus: int | None = None):
    """(a): a callable that runs one epoch of our pipeline (Ray must be up) and returns images/s."""
    import ray

    dataset = train_dataset(shards, bench_config(img_size))
    if max_cpus is not None:
        dataset.context.execution_options.resource_limits = ray.data.ExecutionResources(cpu=max_cpus)
    return lambda: _iterate(dataset.iter_torch_batches(batch_size=batch_size, device="cpu"))


def webdataset_loader(shards: list[str], cores: int, img_size: int, batch_size: int):
    """(b): a callable that runs one epoch of webdataset's own pipeline in a torch DataLoader."""
    import torch
    import webdataset as wds
    from torchvision.transforms import v2

    augment = v2.Compose([v2.RandomResizedCrop(img_size), v2.RandomHorizontalFlip(), v2.PILToTensor()])
    dataset = (wds.WebDataset(shards, shardshuffle=False, empty_check=False)
               .decode("pil").to_tuple("jpg", "cls").map_tuple(augment, int))
    # Ray's docs list forking a driver as an anti-pattern: the child shares the driver's sockets to the raylet and
    # the GCS, unsynchronised. Spawned workers share nothing; persistent ones pay the spawn's imports once, in the
    # untimed warm-up epoch.
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=cores,
                                         multiprocessing_context="spawn", persistent_workers=True)
    return lambda: _iterate(loader)


def _iterate(batches) -> float:
    start, images = time.perf_counter(), 0
    for batch in batches:
        images += len(batch["image"] if isinstance(batch, dict) else batch[0])
    return images / (time.perf_counter() - start)


def bare_loops(shards: list[str], img_size: int, max_images: int) -> dict:
    """(c) and (c-pil): callables timing single-process decode + crop + flip over the same tar bytes."""
    import torch
    from PIL import Image
    from torchvision.transforms import v2

    from pipeline.data.tar_reader import iter_tar_samples
    from pipeline.data.transforms import ImageTransform

    torch.set_num_threads(1)
    ours = ImageTransform(bench_config(img_size), train=True)
    rng = np.random.default_rng(0)
    row = np.empty((3, img_size, img_size), dtype=np.uint8)
    theirs = v2.Compose([v2.RandomResizedCrop(img_size), v2.RandomHorizontalFlip(), v2.PILToTensor()])

    def timed(fn) -> float:
        start, images = time.perf_counter(), 0
        for path in shards:
            with open(path, "rb") as f:  # the tar is parsed inside the timed loop, as the pipelines do
                for row in iter_tar_samples(f, path):
                    fn(row["image"])
                    images += 1
                    if images >= max_images:
                        return images / (time.perf_counter() - start)
        return images / (time.perf_counter() - start)

    # (c) writes each crop into a CHW row, as a batch of (a) holds it
    return {"c": lambda: timed(lambda data: row.__setitem__(Ellipsis, ours(data, rng).transpose(2, 0, 1))),
            "c-pil": lambda: timed(lambda data: theirs(Image.open(io.BytesIO(data)).convert("RGB")))}


def peak_memory_mib(shards: list[str], ray_cpus: int, img_size: int, batch_size: int) -> tuple[float, float]:
    """(peak RSS sum, peak PSS sum) in MiB of a fresh process tree running one epoch of (a)."""
    import psutil

    code = ("import sys; from pipeline.benchmarks.data_speed import _one_epoch; "
            f"_one_epoch(sys.argv[1:], {ray_cpus}, {img_size}, {batch_size})")
    child = subprocess.Popen([sys.executable, "-c", code, *shards])
    peak_rss = peak_pss = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_rss, peak_pss
        root = psutil.Process(child.pid)
        while not done.is_set():
            rss = pss = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    info = p.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if child.wait() != 0:
        raise RuntimeError(f"the RSS run exited with {child.returncode}")
    done.set()
    sampler.join()
    return peak_rss / 2**20, peak_pss / 2**20


def _one_epoch(shards: list[str], ray_cpus: int, img_size: int, batch_size: int) -> None:
    import ray

    ray.init(num_cpus=ray_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    _iterate(train_dataset(shards, bench_config(img_size)).iter_torch_batches(batch_size=batch_size, device="cpu"))
    ray.shutdown()


def multiplied_shards(shards: list[str], folder: str, multiple: int) -> list[str]:
    """`multiple` hard links of every shard under new names: more data, no more disk."""
    os.makedirs(folder, exist_ok=True)
    out = []
    for copy in range(multiple):
        for path in shards:
            link = os.path.join(folder, f"x{copy:02d}-{os.path.basename(path)}")
            if not os.path.exists(link):
                os.link(path, link)
            out.append(link)
    return out


def measure(shards: list[str], args: argparse.Namespace) -> dict[str, list[float]]:
    """Images/s of each contender in each of the interleaved rounds, after one warm-up each. Starts a local Ray
    of --ray-cpus logical CPUs unless one is already up."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        bare = bare_loops(shards, args.img_size, args.bare_images or args.num_images)
        contenders = {
            f"(a) ours: Ray Data pipeline, Ray given {args.ray_cpus} logical CPUs":
                ray_pipeline(shards, args.img_size, args.batch_size),
            f"(a, Ray Data capped at {args.cores} CPUs)":
                ray_pipeline(shards, args.img_size, args.batch_size, max_cpus=args.cores),
            "(b) webdataset .decode('pil') + DataLoader": webdataset_loader(shards, args.cores, args.img_size,
                                                                          args.batch_size),
            f"(c) bare loop, our transform x {args.cores}": lambda: bare["c"]() * args.cores,
            f"(c-pil) bare loop, Pillow + torchvision x {args.cores}": lambda: bare["c-pil"]() * args.cores,
        }
        for fn in contenders.values():
            fn()
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for r in range(args.rounds):
            for name, fn in contenders.items():
                samples[name].append(fn())
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v[-1]:.0f}" for v in samples.values()), flush=True)
        return samples
    finally:
        if started:
            ray.shutdown()


def run(args: argparse.Namespace) -> dict:
    """Prints the tables for docs/benchmarks.md; returns the median images/s per contender, the two goal ratios
    (by medians and by per-round ratios) and, unless --skip-rss, the peak (RSS, PSS) MiB at 1x and at the
    multiple."""
    workdir = args.workdir or tempfile.mkdtemp(prefix="data-bench-")
    try:
        shards = build_bench_shards(os.path.join(workdir, "shards"), args.num_images, args.shard_size, args.seed)
        print(f"{args.num_images} JPEGs in {len(shards)} shards, "
              f"{sum(os.path.getsize(s) for s in shards) / 2**20:.0f} MiB", flush=True)
        samples = measure(shards, args)
        rows = {name: statistics.median(values) for name, values in samples.items()}
        a, a_capped, b, c = (rows[k] for k in list(rows)[:4])
        a_rounds, a_capped_rounds, b_rounds, c_rounds = list(samples.values())[:4]

        def paired(xs: list[float], ys: list[float]) -> float:  # median of per-round ratios: robust to CPU drift
            return statistics.median(x / y for x, y in zip(xs, ys, strict=True))

        print(f"\nData loading, {args.img_size} px RandomResizedCrop + flip, uint8 out; "
              f"{platform.machine()} {os.cpu_count()} cores, {date.today().isoformat()}")
        print("| pipeline | images/s |\n|---|---|")
        for name, images_per_s in rows.items():
            print(f"| {name} | {images_per_s:.0f} |")
        print(f"\n(a)/(b) = {a / b:.2f} (goal >= 1.5); (a)/(c) = {a / c:.2f} (goal >= 0.8); capped: "
              f"{a_capped / b:.2f} and {a_capped / c:.2f}")
        print(f"median of per-round ratios: (a)/(b) = {paired(a_rounds, b_rounds):.2f}, (a)/(c) = "
              f"{paired(a_rounds, c_rounds):.2f}; capped: {paired(a_capped_rounds, b_rounds):.2f} and "
              f"{paired(a_capped_rounds, c_rounds):.2f}")
        results = {"images_per_s": rows, "a_over_b": (a / b, paired(a_rounds, b_rounds)),
                   "a_over_c": (a / c, paired(a_rounds, c_rounds))}
        if not args.skip_rss:
            small = peak_memory_mib(shards, args.ray_cpus, args.img_size, args.batch_size)
            many = multiplied_shards(shards, os.path.join(workdir, "many"), args.rss_multiple)
            large = peak_memory_mib(many, args.ray_cpus, args.img_size, args.batch_size)
            print("\n| shards | images | peak RSS MiB | peak PSS MiB |\n|---|---|---|---|")
            print(f"| {len(shards)} | {args.num_images} | {small[0]:.0f} | {small[1]:.0f} |")
            print(f"| {len(many)} | {args.num_images * args.rss_multiple} | {large[0]:.0f} | {large[1]:.0f} |")
            print(f"\nRSS {args.rss_multiple}x/1x = {large[0] / small[0]:.2f}, PSS {args.rss_multiple}x/1x = "
                  f"{large[1] / small[1]:.2f} (goal <= 1.2)")
            results["peak_mib"] = {1: small, args.rss_multiple: large}
        print(f"\ncommand: python jobs/benchmark.py data {' '.join(sys.argv[2:])}".rstrip())
        return results
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
