"""Write image datasets as webdataset tar shards plus a manifest per split.

    python jobs/make_shards.py                                        # digits -> data/digits/{train,val}-*.tar
    python jobs/make_shards.py --source imagefolder:/data/train --out s3://bucket/in1k --split train
    python jobs/make_shards.py --source 'shards:/data/laion/{00000..00099}.tar'   # index img2dataset's output

Each split becomes `{split}-000000.tar …` and `{split}.manifest.json` (written last, atomically). Existing
shards are indexed in place: their counts come from img2dataset's `NNNNN_stats.json` where those sit beside
them, else from the tar headers, and `{split}.manifest.json` is written beside them.
"""

import argparse
import logging
import sys

from pipeline.data.shard_writer import INDEX_THREADS, index_shards, write_source
from pipeline.data.sources import build_source


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="digits",
                        help="'digits' (scikit-learn's digits), 'imagefolder:PATH' (one sub-folder per class) or "
                             "'shards:PATTERN' (count existing shards and write only their manifest)")
    parser.add_argument("--out", default="data/digits",
                        help="output folder or pyarrow filesystem URI (s3://, gs://, file://)")
    parser.add_argument("--split", default=None,
                        help="split name: of an imagefolder source (default train), or of indexed shards whose names "
                             "carry none, such as img2dataset's 00000.tar (default train; overrides a name prefix)")
    parser.add_argument("--img-size", type=int, default=32, help="side in pixels of the upscaled digits")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="fraction of each digit class held out as the val split")
    parser.add_argument("--max-count", type=int, default=1000, help="at most this many samples per shard")
    parser.add_argument("--max-size", type=float, default=512e6,
                        help="cut a shard once this many bytes of member data are written (tar headers not counted)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sample order across shards and of the digits train/val split")
    parser.add_argument("--classes", default="",
                        help="comma-separated class names for --source shards: (index i is label i)")
    parser.add_argument("--verify", type=int, default=0,
                        help="--source shards: also count this many shards (chosen at random) from their tars and "
                             "check them against img2dataset's _stats.json counts")
    parser.add_argument("--threads", type=int, default=INDEX_THREADS,
                        help="--source shards: shards counted at once (the work waits on storage requests)")
    parser.add_argument("--no-progress", action="store_true", help="do not draw a progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.source.startswith("shards:"):
            index(args)
            return 0
        source = build_source(args.source, img_size=args.img_size, val_fraction=args.val_fraction,
                              split=args.split or "train", seed=args.seed)
        manifests = write_source(source, args.out, max_count=args.max_count, max_size=int(args.max_size),
                                 progress=not args.no_progress)
    except (ValueError, OSError) as err:  # bad specs, missing files, storage refusing access: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, manifest in manifests.items():
        print(f"{split}: {manifest.num_samples} samples, {len(manifest.shards)} shards, "
              f"{manifest.num_bytes / 2**20:.1f} MiB, {manifest.skipped} skipped -> {args.out}")
    return 0


def index(args) -> None:
    """--source shards:PATTERN: the manifest of existing shards, and what a job training on them must set."""
    classes = [c for c in args.classes.split(",") if c]
    report = index_shards(args.source.split(":", 1)[1], classes=classes, split=args.split, verify=args.verify,
                          threads=args.threads, progress=not args.no_progress)
    manifest = report.manifest
    counted = [f"{report.from_stats} counted from img2dataset's _stats.json"] if report.from_stats else []
    counted += [f"{report.from_tars} from their tar headers"] if report.from_tars else []
    counted += [f"{report.verified} checked against their tars"] if report.verified else []
    print(f"{manifest.split}: {manifest.num_samples} samples in {len(manifest.shards)} shards "
          f"({'; '.join(counted)}) -> {report.path}")
    members = manifest.sample_members
    if "cls" in members:
        print("labels: .cls members")
    elif "json" in members:
        keys = ", ".join(manifest.json_keys) or "none"
        print(f"labels: no .cls members; train with data.label_key=KEY, KEY one of the .json keys: {keys}")
    else:
        print(f"labels: none (the samples hold {', '.join(members) or 'nothing'}); label them before training")
    if not manifest.classes:
        print("classes: not named; pass --classes a,b,c here, or train with data.num_classes=N")


if __name__ == "__main__":
    sys.exit(main())
