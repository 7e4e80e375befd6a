"""Benchmarks behind the figures in docs/benchmarks.md.

    python jobs/benchmark.py model --preset vit_small_patch16_224 --img-size 224 --batch-size 8
    python jobs/benchmark.py data
    python jobs/benchmark.py decode       # decoders per core, decode workers' memory and start, GPU decode
    python jobs/benchmark.py storage      # S3 endpoint against local disk (a moto server on 127.0.0.1 by default)
    python jobs/benchmark.py index
    python jobs/benchmark.py resume       # checkpoint save time with the sample-exact data position
    python jobs/benchmark.py tracking     # MLflow requests of a training run, by thread
    python jobs/benchmark.py gpu          # one GPU + 16 cores, under 8 min: step MFU, GPU decode, data, scaling
    python jobs/benchmark.py mae          # MAE against supervised: step speed, label efficiency, decode cores

Each suite prints a markdown table with the command, machine and date; copy it into docs/benchmarks.md.
`python jobs/benchmark.py SUITE --help` lists a suite's options.
"""

import argparse
import importlib
import sys

# suite -> (module in pipeline.benchmarks with add_arguments(parser) and run(args), one-line help)
SUITES = {
    "model": ("model_speed", "forward+backward step time of our ViT against timm's, side by side"),
    "data": ("data_speed", "images/s of the Ray Data pipeline against webdataset's loader and a bare loop"),
    "decode": ("decode_speed", "decoders per core on the same crops, decode workers' memory and start, GPU decode"),
    "train": ("train_speed", "Ray Train + DeepSpeed step against plain torch, per-rank ZeRO state bytes, GPU MFU"),
    "storage": ("storage_speed", "images/s from shards on an S3 endpoint against the same shards on local disk"),
    "index": ("index_speed", "indexing 2,000 shards on an S3 endpoint, with and without img2dataset's stats"),
    "resume": ("resume_speed", "checkpoint save time with the sample-exact data position, 10,000 shards x 1,250"),
    "gpu": ("gpu_suite", "the GPU machine's figures in one table: bf16 step MFU, GPU decode, data ratios, scaling"),
    "tracking": ("tracking_calls", "MLflow requests of a training run by thread: none per step on the training one"),
    "mae": ("mae_suite", "MAE against supervised: step images/s on one ViT, label efficiency, decode cores per GPU"),
}


def parse(argv: list[str]):
    """(the chosen suite's module, its parsed arguments)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="suite", required=True)
    for name, (_, help_text) in SUITES.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    suite = parser.parse_known_args(argv)[0].suite
    # import only the chosen suite: the data suite pulls in Ray, the model suite does not
    module = importlib.import_module(f"pipeline.benchmarks.{SUITES[suite][0]}")
    suite_parser = argparse.ArgumentParser(prog=f"benchmark.py {suite}", description=module.__doc__)
    module.add_arguments(suite_parser)
    return module, suite_parser.parse_args(argv[argv.index(suite) + 1:])


def main(argv=None):
    module, args = parse(sys.argv[1:] if argv is None else argv)
    module.run(args)


if __name__ == "__main__":
    main()
