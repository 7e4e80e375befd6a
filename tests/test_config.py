import pytest

from pipeline.config import ConfigError, JobConfig, config_from_dict, load_job_config


def test_yaml_then_overrides_with_ml_style_floats(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  betas: [0.9, 0.95]\ntrain:\n  steps: 50\ndata:\n  img_size: 32\n")
    job = load_job_config(path, ["train.steps=70", "model.args={init_values: 1e-5}", "data.train=[a.tar, b.tar]"])
    assert job.optim.lr == 1e-3 and isinstance(job.optim.lr, float)
    assert job.optim.betas == (0.9, 0.95)
    assert job.train.steps == 70
    assert job.model.args == {"init_values": 1e-5}
    assert job.data.train == ["a.tar", "b.tar"]
    assert config_from_dict(JobConfig, job.to_dict()) == job
    assert load_job_config(None, [], defaults=None).train.steps == JobConfig().train.steps


@pytest.mark.parametrize("overrides,message", [
    (["train.stepz=3"], "unknown config key 'train.stepz'; did you mean train.steps?"),
    (["trian.steps=3"], "unknown config key 'trian'; did you mean train?"),
    (["train.steps=1.5"], "train.steps: 1.5 is not a int"),
    (["train.steps=many"], "train.steps: 'many' is not a int"),
    (["train.zero_stage=4"], "train.zero_stage must be 0, 1, 2 or 3"),
    (["optim.betas=[0.9]"], "optim.betas: expected 2 values"),
    (["train.global_batch_size=10", "train.num_workers=3"],
     "global_batch_size 10 is not divisible by num_workers 3 x micro_batch_size 3"),
    (["train.global_batch_size=64", "train.micro_batch_size=12"],
     "not divisible by num_workers 2 x micro_batch_size 12"),
    (["train.num_workers=[1, 4]", "train.global_batch_size=64", "train.micro_batch_size=16"],
     "global_batch_size 64 does not split into micro_batch_size 16 x accumulation x world size at world size 3 of "
     "num_workers [1, 4]"),
    (["train.num_workers=[3, 2]"], "train.num_workers must be >= 1, or [min, max] with 1 <= min <= max; got [3, 2]"),
    (["finetune.ema_decay=0.99", "train.zero_stage=3"], "finetune.ema_decay needs train.zero_stage <= 2"),
    (["train.offload_optimizer=true", "train.zero_stage=0"], "offload_optimizer needs zero_stage >= 1"),
    (["train.steps"], "is not of the form section.key=value"),
    (["train.compile=3"], "train.compile: 3 is not a bool"),
    (["train.peak_tflops=-1"], "train.peak_tflops must be >= 0 (0 looks the GPU up in a table of known cards)"),
    (["train.objective=simclr"], "train.objective must be one of supervised, mae; got 'simclr'"),
    (["train.objective=mae", "mae.mask_ratio=1.0"], "mae.mask_ratio must be in (0, 1); got 1.0"),
    (["train.objective=mae", "mae.mask_ratio=0"], "mae.mask_ratio must be in (0, 1); got 0.0"),
    (["mae.decoder_embed_dim=100", "mae.decoder_num_heads=16"],
     "mae.decoder_num_heads 16 must divide decoder_embed_dim 100"),
    (["train.objective=mae", "optim.mixup_alpha=0.8"],
     "optim.mixup_alpha is 0.8, but train.objective=mae learns without labels, so there are none to mix"),
    (["train.objective=mae", "optim.cutmix_alpha=1.0"], "optim.cutmix_alpha is 1.0, but train.objective=mae"),
    (["train.objective=mae", "finetune.ema_decay=0.99"], "finetune.ema_decay is for supervised runs"),
])
def test_bad_configs_fail_with_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_job_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_job_config(tmp_path / "nope.yaml", [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        load_job_config(bad, [])


def test_gradient_accumulation_is_derived():
    job = load_job_config(None, ["train.global_batch_size=64", "train.num_workers=2", "train.micro_batch_size=8"])
    assert job.train.grad_accum_steps(2) == 4 and job.train.micro_batch_size_per_worker() == 8


def test_an_elastic_range_keeps_the_global_batch_at_every_world_size():
    job = load_job_config(None, ["train.global_batch_size=24", "train.micro_batch_size=2", "train.num_workers=[1, 4]"])
    train = job.train
    assert train.num_workers == (1, 4) and list(train.world_sizes) == [1, 2, 3, 4]
    assert {w: train.grad_accum_steps(w) for w in train.world_sizes} == {1: 12, 2: 6, 3: 4, 4: 3}
    # without a micro-batch size it is global / the most workers: no accumulation at full size
    train = load_job_config(None, ["train.global_batch_size=16", "train.num_workers=[1, 2]"]).train
    assert (train.micro_batch_size_per_worker(), train.grad_accum_steps(1), train.grad_accum_steps(2)) == (8, 2, 1)


def test_model_img_size_sets_the_data_crop():
    job = load_job_config(None, ["data.img_size=32", "model.img_size=64", "init_from=runs:/abc"])
    assert job.data.img_size == 64 and job.init_from == "runs:/abc"
