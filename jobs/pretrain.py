"""Pretrain a Vision Transformer: WebDataset shards stream through Ray Data into DeepSpeed ZeRO workers under
Ray Train; the run, its metrics and its weights are recorded in MLflow.

    python jobs/pretrain.py                       # embedded demo: local Ray, digits shards, tiny ViT, CPU
    python jobs/pretrain.py --config jobs/configs/digits_mae_pretrain.yaml    # the same images, MAE, no labels
    python jobs/pretrain.py --config jobs/configs/vit_b16_pretrain.yaml data.train='s3://b/train-{000000..001023}.tar'
    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/vit_b16_pretrain.yaml

Overrides are section.key=value with YAML values: train.steps=2000 optim.lr=3e-3 train.zero_stage=3.
Re-running with the same train.run_name and train.storage_path resumes the run.
"""

import sys
from pathlib import Path

from pipeline.config import ConfigError, load_job_config
from pipeline.train.context import JobFailed
from pipeline.train.launch import RunFinished, end_job, parse_job_args, print_outcome, run_job, start_ray
from pipeline.train.objectives import build_objective
from pipeline.train.resolved_job import resolve_job

DEMO_CONFIG = Path(__file__).parent / "configs" / "digits_pretrain.yaml"
DEMO_SHARDS = "data/digits/train-*.tar"  # the digits configs' shards, written on first use


def main(argv=None) -> int:
    args = parse_job_args(argv, doc=__doc__, demo_config=DEMO_CONFIG, sections="model/data/optim/train/tracking/mae",
                          overrides_help="section.key=value overrides applied after the YAML")
    try:
        job = load_job_config(args.config or DEMO_CONFIG, args.overrides)
        if job.data.train == DEMO_SHARDS:
            from pipeline.data.shard_writer import ensure_digits_shards

            ensure_digits_shards(job.data.train, img_size=job.data.img_size)
        run, _ = resolve_job(job, "pretrain")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(run.to_yaml(), end="")
        return 0
    start_ray(args.local_cpus)
    try:
        result = run_job(run)
    except JobFailed as err:
        return end_job(err)
    except RunFinished as err:
        print(err)
        return 0
    last_val = {key[len("last_"):]: value for key, value in result.metrics.items() if key.startswith("last_val/")}
    print(f"\nMLflow run:      {result.run_id}  (experiment {run.job.tracking.experiment!r})")
    print(f"final {build_objective(run.job, run.model_args).summary(last_val)} after {result.metrics.get('step')} "
          f"steps in {result.wall_time_s / 60:.1f} min")
    print_outcome(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
