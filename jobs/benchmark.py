"""Benchmarks behind the figures in docs/benchmarks.md.

    python jobs/benchmark.py model --preset vit_small_patch16_224 --batch-size 8
    python jobs/benchmark.py data

Each suite prints a table and the command line that produced it; copy both into docs/benchmarks.md.
"""

import argparse
import importlib

# suite name -> module in pipeline.benchmarks exposing add_arguments(parser) and run(args)
SUITES = {"model": "model_speed", "data": "data_speed"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="suite", required=True, metavar="{" + ",".join(SUITES) + "}")
    modules = {}
    for name, module_name in SUITES.items():
        module = importlib.import_module(f"pipeline.benchmarks.{module_name}")
        modules[name] = module
        module.add_arguments(subparsers.add_parser(name, help=module.__doc__.strip().splitlines()[0]))
    args = parser.parse_args(argv)
    modules[args.suite].run(args)


if __name__ == "__main__":
    main()
