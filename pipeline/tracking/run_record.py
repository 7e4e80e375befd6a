"""What a run records besides its metrics: the job's config as flat params, and the lineage tags (job kind,
git commit, parent run, package versions) that every run carries. MLflow's limits on param and tag values and
on items per request are kept here too; runs.py applies them when it logs.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

GIT_COMMIT_ENV = "VIT_PIPELINE_GIT_COMMIT"  # commit to record when the code runs outside a git checkout
VERSION_PACKAGES = ("torch", "ray", "deepspeed", "mlflow", "timm")

try:  # MLflow's own limits, so that a future change of them is followed
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH
except ImportError:  # pragma: no cover - the values of mlflow 3.17
    MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH = 6000, 100, 8000

_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def flatten_params(config: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Nested config → `{"model.img_size": "32", "optim.betas": "[0.9,0.999]", ...}`, values cut to MLflow's limit."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name))
        else:
            flat[name] = truncate(_compact(value), MAX_PARAM_VAL_LENGTH)
    return flat


def _compact(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_compact(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{key}:{_compact(item)}" for key, item in value.items()) + "}"
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def truncate(text: str, limit: int) -> str:
    """`text`, or its first `limit` characters ending in "..." when it is longer."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def git_commit(project_dir: str | os.PathLike = _PROJECT_ROOT) -> str:
    """HEAD of the project's git checkout, else $VIT_PIPELINE_GIT_COMMIT, else "unknown" (e.g. a Ray working dir)."""
    try:
        result = subprocess.run(
            ["git", "-C", os.fspath(project_dir), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        result = None
    if result is not None and result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", result.stdout.strip()):
        return result.stdout.strip()
    return os.environ.get(GIT_COMMIT_ENV, "").strip() or "unknown"


def package_versions(packages: tuple[str, ...] = VERSION_PACKAGES) -> dict[str, str]:
    """Installed versions of `packages` from their metadata, without importing them; missing ones left out."""
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def lineage_tags(job: str, parent_run_id: str | None = None) -> dict[str, str]:
    """The pipeline.* tags every run carries: job kind, git commit, parent run, package versions."""
    tags = {"pipeline.job": job, "pipeline.git_commit": git_commit()}
    if parent_run_id:
        tags["pipeline.parent_run_id"] = parent_run_id
    tags["pipeline.version.python"] = platform.python_version()
    tags.update({f"pipeline.version.{name}": version for name, version in package_versions().items()})
    return tags
