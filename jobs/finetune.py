"""Fine-tune a pretrained ViT, usually at a higher resolution than it was pretrained at: the patch size stays,
the token grid grows, and the pretrained position embeddings are interpolated in 2D to the new grid. Same
Ray Data pipeline, DeepSpeed trainer, checkpoints and fault tolerance as pretraining; the run is linked to
its pretrain run in MLflow.

    python jobs/finetune.py                       # embedded demo: the latest pretrain run, at 2x its resolution
    python jobs/finetune.py --config jobs/configs/vit_b16_ft384.yaml init_from=runs:/<mlflow run id>
    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/vit_b16_ft384.yaml \\
        init_from=runs:/<mlflow run id>

init_from= takes a checkpoint folder, a model.safetensors, runs:/<run id>, or a timm state_dict file, local or
on any storage URI (s3://…). The resolution is model.img_size when set, otherwise twice the pretrain's.
"""

import sys
from pathlib import Path

from pipeline.config import ConfigError, load_job_config
from pipeline.train.context import JobFailed
from pipeline.train.launch import RunFinished, end_job, parse_job_args, print_outcome, run_job, start_ray
from pipeline.train.resolved_job import resolve_job

DEMO_CONFIG = Path(__file__).parent / "configs" / "digits_finetune.yaml"


def main(argv=None) -> int:
    args = parse_job_args(argv, doc=__doc__, demo_config=DEMO_CONFIG,
                          sections="model/data/optim/train/tracking/finetune",
                          overrides_help="section.key=value overrides, and init_from=...")
    try:
        run, init_state = resolve_job(load_job_config(args.config or DEMO_CONFIG, args.overrides), "finetune")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(run.to_yaml(), end="")
        return 0
    start_ray(args.local_cpus)
    try:
        result = run_job(run, init_state)
    except JobFailed as err:
        return end_job(err)
    except RunFinished as err:
        print(err)
        return 0
    init = run.init
    print(f"\nMLflow run:      {result.run_id}  (experiment {run.job.tracking.experiment!r}), from "
          f"{init.parent_run_id or init.spec}")
    print(f"resolution:      {init.source_img_size} -> {run.job.data.img_size} px"
          f"{', new head' if init.reset_head else ''}")
    print(f"final val top-1: {result.metrics.get('last_val/top1', float('nan')):.4f}"
          + (f" (EMA {result.metrics['last_val_ema/top1']:.4f})" if "last_val_ema/top1" in result.metrics else "")
          + f" after {result.metrics.get('step')} steps in {result.wall_time_s / 60:.1f} min")
    print_outcome(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
