"""Every `python jobs/…` command of the README and docs/operations.md, as written, parses with its job's own parser
and, for the training jobs, gives a config that validates. The local ones also run (`--dry-run`, against real
shards and a real pretrain run) in the demo chain test, tests/e2e/test_finetune.py."""

import importlib.util
from pathlib import Path

import pytest

from pipeline.config import load_job_config
from pipeline.train.launch import parse_job_args

ROOT = Path(__file__).resolve().parents[1]
FILLED_IN = {"RUN_ID": "0123456789abcdef0123456789abcdef", "$PWD": str(ROOT),
             "$MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "$VIT_STORAGE_PATH": "s3://bucket/runs"}


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"readme_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fill_in(words: list[str]) -> list[str]:
    for key, value in FILLED_IN.items():
        words = [word.replace(key, value) for word in words]
    return words


def test_documented_commands_parse_and_validate(readme_commands, monkeypatch):
    monkeypatch.chdir(ROOT)  # the README's commands run from the checkout
    commands = readme_commands("README.md", "docs/operations.md")
    jobs = {Path(words[0]).stem for words in commands}
    assert {"pretrain", "finetune", "make_shards", "compare", "benchmark"} <= jobs and len(commands) >= 20
    for words in commands:
        job, argv = Path(words[0]).stem, fill_in(words[1:])
        module = load_job(job)
        if job in ("pretrain", "finetune"):
            args = parse_job_args(argv, doc="", demo_config=module.DEMO_CONFIG, sections="", overrides_help="")
            config = load_job_config(args.config or module.DEMO_CONFIG, args.overrides)
            assert config.train.steps >= 1, words
        elif job == "benchmark":
            suite, _ = module.parse(argv)
            assert suite.__name__.startswith("pipeline.benchmarks."), words
        else:
            module.build_parser().parse_args(argv)
    assert not [word for words in commands for word in fill_in(words) if "$" in word]  # every variable is known
    with pytest.raises(SystemExit):  # the parsers refuse what they do not know, so this test can fail
        load_job("make_shards").build_parser().parse_args(["--sorce", "digits"])
