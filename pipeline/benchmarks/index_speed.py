"""Indexing existing shards on an S3 endpoint: `index_shards` against the serial loop it replaced.

    python jobs/benchmark.py index                      # 2,000 shards on a moto server on 127.0.0.1
    python jobs/benchmark.py index --use-configured-endpoint --bucket B   # the store AWS_ENDPOINT_URL names

The shards are img2dataset-like (`00000.tar …`, a JPEG and a .json per sample), uploaded twice: once alone and
once with img2dataset's `NNNNN_stats.json` and `.parquet` beside each. Timed, in turn, --rounds times:
  (serial)          the loop `index_shards` ran before: a HEAD per shard to expand the brace pattern, then per
                    shard a full streamed read parsed by the tar reader (pyarrow's unbuffered stream: a ranged
                    GET per member header and per member) and a HEAD for its size, one shard after another. It is
                    timed on the first --serial-shards shards and scaled to all of them: it is linear in them;
  (serial, buffered) the same loop reading each shard with one buffered stream, on all the shards;
  (tars)            `index_shards` on the shards alone: one listing, tar headers scanned by --threads threads;
  (stats)           `index_shards` beside the stats files: one listing, each shard's `successes` read.
Each gives the same counts (checked). The table gives medians and the speed-ups over (serial).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date

from pipeline.data.shard_writer import INDEX_THREADS, index_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-shards", type=int, default=2000, help="shards on the endpoint")
    parser.add_argument("--samples-per-shard", type=int, default=40, help="samples in each shard")
    parser.add_argument("--image-bytes", type=int, default=2000, help="bytes of each sample's image member")
    parser.add_argument("--threads", type=int, default=INDEX_THREADS, help="threads of index_shards")
    parser.add_argument("--serial-shards", type=int, default=100,
                        help="shards (serial) is timed on, then scaled to --num-shards (it takes ~1 s a shard)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the table shows medians")
    parser.add_argument("--bucket", default="vit-bench", help="bucket for the shards")
    parser.add_argument("--use-configured-endpoint", action="store_true",
                        help="use the store AWS_ENDPOINT_URL names instead of a moto server of our own")


def shard_bytes(shard: int, samples: int, image_bytes: int) -> bytes:
    """An img2dataset-like tar: per sample a .jpg member (random bytes: only headers are read) and a .json."""
    out = io.BytesIO()
    payload = os.urandom(image_bytes)
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(samples):
            key = f"{shard:05d}{i:04d}"
            for suffix, data in (("jpg", payload), ("json", b'{"key": "%s", "label": %d}' % (key.encode(), i % 3))):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def upload(prefix: str, args: argparse.Namespace, *, with_stats: bool) -> None:
    from pipeline import storage

    fs, folder = storage.resolve(prefix)

    def put(shard: int) -> None:
        files = {f"{shard:05d}.tar": shard_bytes(shard, args.samples_per_shard, args.image_bytes)}
        if with_stats:
            files[f"{shard:05d}_stats.json"] = (b'{"count": %d, "successes": %d, "failed_to_download": 0}'
                                               % (args.samples_per_shard, args.samples_per_shard))
            files[f"{shard:05d}.parquet"] = b"PAR1"
        for name, data in files.items():
            with fs.open_output_stream(f"{folder}/{name}") as f:
                f.write(data)

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(put, range(args.num_shards)))


def serial_index(spec: str, buffer_size: int | None = None) -> list[int]:
    """The indexing loop as it was: the brace pattern expanded with a lookup per shard, then every shard read
    in full by the stream reader and its size asked for, one after another (`buffer_size`: buffered reads)."""
    import braceexpand

    from pipeline import storage
    from pipeline.data.tar_reader import iter_tar_samples

    fs, paths = storage.resolve_many(list(braceexpand.braceexpand(spec)))  # one client, as the loop made
    for path in paths:
        fs.get_file_info(path)
    counts = []
    for path in paths:
        with fs.open_input_stream(path, buffer_size=buffer_size) as f:
            counts.append(sum(1 for row in iter_tar_samples(f, path) if row["read_error"] is None))
        fs.get_file_info(path)
    return counts


def run(args: argparse.Namespace) -> dict:
    from pipeline.benchmarks.s3_endpoint import s3_endpoint

    with s3_endpoint(args.bucket, use_configured=args.use_configured_endpoint) as endpoint:
        env = endpoint.env
        base = f"s3://{args.bucket}/index-bench-{os.getpid()}"
        start = time.perf_counter()
        upload(f"{base}/tars", args, with_stats=False)
        upload(f"{base}/stats", args, with_stats=True)
        print(f"{args.num_shards} shards x {args.samples_per_shard} samples uploaded twice to "
              f"{env['AWS_ENDPOINT_URL']} in {time.perf_counter() - start:.0f} s", flush=True)
        pattern = f"{{00000..{args.num_shards - 1:05d}}}.tar"
        some = min(args.serial_shards, args.num_shards)
        scale = args.num_shards / some
        contenders = {
            f"(serial) the loop before: HEAD per shard, unbuffered full read, one at a time (timed on {some}, "
            f"x {scale:g})": lambda: serial_index(f"{base}/tars/{{00000..{some - 1:05d}}}.tar"),
            "(serial, buffered) the same loop, one buffered read per shard":
                lambda: serial_index(f"{base}/tars/{pattern}", buffer_size=1 << 20),
            f"(tars) index_shards, tar headers, {args.threads} threads":
                lambda: [s.num_samples for s in index_shards(f"{base}/tars/{pattern}", threads=args.threads,
                                                            progress=False).manifest.shards],
            f"(stats) index_shards, img2dataset _stats.json, {args.threads} threads":
                lambda: [s.num_samples for s in index_shards(f"{base}/stats/{pattern}", threads=args.threads,
                                                            progress=False).manifest.shards],
        }
        seconds: dict[str, list[float]] = {name: [] for name in contenders}
        for r in range(args.rounds):
            for i, (name, fn) in enumerate(contenders.items()):
                start = time.perf_counter()
                counts = fn()
                seconds[name].append((time.perf_counter() - start) * (scale if i == 0 else 1))
                if counts != [args.samples_per_shard] * (some if i == 0 else args.num_shards):
                    raise AssertionError(f"{name} counted {sum(counts)} samples in {len(counts)} shards")
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v[-1]:.2f} s" for v in seconds.values()),
                  flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    serial = next(iter(medians.values()))
    print(f"\nIndexing {args.num_shards} shards on an S3 endpoint ({env['AWS_ENDPOINT_URL']}); "
          f"{platform.machine()} {os.cpu_count()} cores, {date.today().isoformat()}")
    print("| indexer | seconds (median) | shards/s | speed-up over (serial) |\n|---|---|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.2f} | {args.num_shards / value:.0f} | {serial / value:.1f}x |")
    print(f"\ncommand: python jobs/benchmark.py index {' '.join(sys.argv[2:])}".rstrip())
    return {"seconds": medians, "speedup": {name: serial / value for name, value in medians.items()}}

