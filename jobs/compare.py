"""Compare runs in MLflow: a table of lineage, resolution, best val top-1, speed and wall time, and a PNG that
overlays their val top-1 and train loss curves.

    python jobs/compare.py                              # every run of the default experiment
    python jobs/compare.py --last 2                     # its two newest runs (what `make demo` shows)
    python jobs/compare.py --experiment vit-b16 --out b16.png
    python jobs/compare.py --runs <pretrain id> <finetune id> --tracking-uri http://mlflow.internal:5000
"""

import argparse
import sys

from pipeline.config import TrackingConfig
from pipeline.tracking.compare import CompareError, compare_runs, format_table, plot_comparison
from pipeline.tracking.store import resolve_tracking_uri


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default=TrackingConfig().experiment, help="MLflow experiment to compare")
    parser.add_argument("--runs", nargs="+", help="compare these run ids instead of a whole experiment")
    parser.add_argument("--last", type=int, default=0, help="only the experiment's N newest runs (0: all)")
    parser.add_argument("--tracking-uri", default="",
                        help="MLflow URI; default $MLFLOW_TRACKING_URI or the local store")
    parser.add_argument("--out", default="compare.png", help="where to write the curves PNG")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        rows = compare_runs(uri, experiment=args.experiment, run_ids=args.runs, last=args.last)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(rows))
    plot_comparison(uri, rows).savefig(args.out, dpi=110)
    print(f"\ncurves: {args.out}  ({len(rows)} runs, store {uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
