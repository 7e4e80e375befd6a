"""Where runs are stored, and how the driver creates, annotates and closes them.

The default store is a sqlite file at an absolute path. MLflow's own default, `sqlite:///mlflow.db`, is
relative to the current directory, and under `ray job submit` that directory is a temporary unpacked copy
of the working dir that Ray deletes later: results logged there would vanish. The rule, in order:

    explicit uri  >  $MLFLOW_TRACKING_URI  >  $VIT_PIPELINE_HOME/mlflow.db
                  >  ./mlflow.db (absolute)  unless ./ is a Ray job's working dir, then ~/.vit-pipeline/mlflow.db

Local stores (sqlite, plain folders) are always returned as absolute URIs. A sqlite store also gets an
absolute artifact root, `<db dir>/mlartifacts`, set on every experiment this module creates, because with a
sqlite backend MLflow would otherwise resolve artifact locations against the current directory.

Runs are created with `MlflowClient`, never with `mlflow.start_run`, so no run is left active in the driver
process: the driver hands the run id to the Train workers, which log metrics into it (metrics.py).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import os
import platform
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HOME_ENV = "VIT_PIPELINE_HOME"  # folder for the default store when set
GIT_COMMIT_ENV = "VIT_PIPELINE_GIT_COMMIT"  # commit to record when the code runs outside a git checkout
DB_FILENAME = "mlflow.db"
ARTIFACTS_DIRNAME = "mlartifacts"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
BARE_REMOTE_URIS = ("databricks", "databricks-uc", "uc")  # tracking URIs with no scheme that are not folders
VERSION_PACKAGES = ("torch", "ray", "deepspeed", "mlflow", "timm")

try:  # MLflow's own limits, so that a future change of them is followed
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH
except ImportError:  # pragma: no cover - the values of mlflow 3.17
    MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH = 6000, 100, 8000

_PROJECT_ROOT = Path(__file__).resolve().parents[2]


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be used; the message is one line that says what to do."""


# ---------------------------------------------------------------------------------------------------------
# Where the store is


def in_ray_job_working_dir(path: str | os.PathLike | None = None) -> bool:
    """True when `path` (default: the cwd) lies in a working dir that Ray unpacked for a job."""
    parts = Path(path if path is not None else os.getcwd()).resolve().parts
    # Ray unpacks working_dir under <temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>
    return "runtime_resources" in parts or any(part.startswith("_ray_pkg_") for part in parts)


def default_store_dir() -> Path:
    """The folder that holds the default sqlite store (see the module docstring for the rule)."""
    home = os.environ.get(HOME_ENV, "").strip()
    if home:
        return Path(home).expanduser().resolve()
    if in_ray_job_working_dir():
        return Path.home() / ".vit-pipeline"
    return Path.cwd().resolve()


def resolve_tracking_uri(uri: str = "") -> str:
    """The tracking URI to use: `uri`, else $MLFLOW_TRACKING_URI, else the default sqlite store; local ones absolute."""
    chosen = (uri or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not chosen:
        return sqlite_uri(default_store_dir() / DB_FILENAME)
    return _absolute_local_uri(chosen)


def sqlite_uri(db_path: str | os.PathLike) -> str:
    """`sqlite:////abs/path/to.db` for a database file (four slashes: SQLAlchemy's absolute form)."""
    return "sqlite:///" + Path(db_path).expanduser().resolve().as_posix()


def local_store_path(uri: str) -> Path | None:
    """The sqlite file or store folder behind a local URI, or None for servers, in-memory and remote databases."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        db = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
        db = db.split("?", 1)[0]
        return None if db in ("", ":memory:") else Path(db)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if uri in BARE_REMOTE_URIS:
        return None
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


def artifact_root_for(uri: str) -> str | None:
    """The absolute artifact root (a file URI) for a sqlite store: `<db dir>/mlartifacts`; None otherwise.

    A folder (file) store keeps artifacts inside its own root, which is already absolute once the URI is,
    and a server decides its artifact location itself, so both return None.
    """
    if urllib.parse.urlparse(uri).scheme != "sqlite":
        return None
    db = local_store_path(uri)
    if db is None:
        return None
    return (db.expanduser().resolve().parent / ARTIFACTS_DIRNAME).as_uri()


def _absolute_local_uri(uri: str) -> str:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        db = local_store_path(uri)
        if db is None or db.is_absolute():
            return uri
        _warn_if_in_ray_working_dir(uri)
        query = uri.split("?", 1)[1] if "?" in uri else ""
        return sqlite_uri(db) + (f"?{query}" if query else "")
    if parsed.scheme == "file":
        path = local_store_path(uri)
        return path.resolve().as_uri() if path is not None else uri
    if parsed.scheme == "" and uri not in BARE_REMOTE_URIS:  # a plain folder path: MLflow's file store
        _warn_if_in_ray_working_dir(uri)
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def _warn_if_in_ray_working_dir(uri: str) -> None:
    if in_ray_job_working_dir():
        log.warning(
            "tracking URI %s is relative and the job runs in a Ray working dir that is deleted later; "
            "use an absolute path or a tracking server",
            uri,
        )


def check_tracking_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Raise TrackingUnavailable (one line) if the store behind `uri` cannot be used; return quickly if it can.

    http(s): GET <uri>/health must answer within timeout_s. sqlite and folders: the folder must be creatable
    and writable. Other schemes (databricks, postgresql, ...) are left to MLflow.
    """
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        _check_server(uri, timeout_s)
        return
    path = local_store_path(uri)
    if path is None:
        return
    folder = path.parent if scheme == "sqlite" else path
    fix = f"set tracking.uri or MLFLOW_TRACKING_URI to a writable location, or {HOME_ENV} to a writable folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingUnavailable(f"MLflow store {uri}: cannot create {folder} ({exc.strerror}); {fix}") from exc
    if not os.access(folder, os.W_OK | os.X_OK) or (path.is_file() and not os.access(path, os.W_OK)):
        raise TrackingUnavailable(f"MLflow store {uri}: {folder} is not writable; {fix}")


def _check_server(uri: str, timeout_s: float) -> None:
    url = uri.rstrip("/") + "/health"
    fix = (
        "start it (mlflow server --backend-store-uri sqlite:///ABS/PATH/mlflow.db --host 127.0.0.1 --port PORT) "
        "or point tracking.uri / MLFLOW_TRACKING_URI at a running server or a sqlite:/// file"
    )
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(f"MLflow tracking server {uri} is not reachable ({reason}); {fix}") from exc
    # 401/403: the server is up and guards /health with auth; the MLflow client brings the credentials
    if status not in (200, 401, 403):
        raise TrackingUnavailable(f"MLflow tracking server {uri} answered GET /health with HTTP {status}; {fix}")


# ---------------------------------------------------------------------------------------------------------
# What a run records


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
            flat[name] = _truncate(_compact(value), MAX_PARAM_VAL_LENGTH)
    return flat


def _compact(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_compact(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{key}:{_compact(item)}" for key, item in value.items()) + "}"
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _truncate(text: str, limit: int) -> str:
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


# ---------------------------------------------------------------------------------------------------------
# Creating, annotating and closing runs


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, experiment: str) -> str:
    """The id of `experiment`, created if missing (with the absolute artifact root for sqlite stores)."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        root = artifact_root_for(uri)
        location = f"{root}/{_safe_dirname(experiment)}" if root else None
        try:
            return client.create_experiment(experiment, artifact_location=location)
        except MlflowException as exc:  # another job created it between the lookup and the create
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise TrackingUnavailable(f"cannot create MLflow experiment {experiment!r} in {uri}: {exc}") from exc
    if found.lifecycle_stage == "deleted":
        log.warning("MLflow experiment %r was deleted; restoring it to log into it", experiment)
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


def _safe_dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


def start_job_run(
    *,
    uri: str,
    experiment: str,
    run_name: str,
    job: str,
    config: Mapping[str, Any] | Any,
    parent_run_id: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> str:
    """Create a RUNNING run with flattened params and lineage tags, leave it inactive here, return its id."""
    from mlflow.entities import Param

    client = _client(uri)
    experiment_id = ensure_experiment(uri, experiment)
    tags = _context_tags()
    tags.update(lineage_tags(job, parent_run_id))
    tags.update({str(key): str(value) for key, value in (extra_tags or {}).items()})
    tags = {key: _truncate(value, MAX_TAG_VAL_LENGTH) for key, value in tags.items()}
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    params = [Param(key, value) for key, value in flatten_params(config).items()]
    try:
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])
    except Exception:
        client.set_terminated(run_id, "FAILED")  # no half-made RUNNING run left behind
        raise
    return run_id


def _context_tags() -> dict[str, str]:
    """MLflow's own source tags (user, entry point), which `mlflow.start_run` would add and `create_run` does not."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return {key: str(value) for key, value in resolve_tags({}).items()}
    except Exception:  # a context provider failing must not stop a job
        return {}


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run FINISHED, FAILED or KILLED, with the end time of now."""
    if status not in RUN_STATUSES:
        raise ValueError(f"run status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
    _client(uri).set_terminated(run_id, status)


def child_run_ids(uri: str, parent_run_id: str) -> list[str]:
    """Ids of the runs whose `pipeline.parent_run_id` is `parent_run_id`, in any experiment, oldest first."""
    client = _client(uri)
    experiment_ids, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        experiment_ids += [experiment.experiment_id for experiment in page]
        token = page.token
        if not token:
            break
    found = []
    for start in range(0, len(experiment_ids), 100):  # keep each query's experiment list short
        found += client.search_runs(
            experiment_ids[start : start + 100],
            filter_string=f"tags.`pipeline.parent_run_id` = '{parent_run_id}'",
            max_results=10_000,
        )
    return [run.info.run_id for run in sorted(found, key=lambda run: (run.info.start_time, run.info.run_id))]


def log_run_artifacts(
    uri: str,
    run_id: str,
    *,
    config_yaml: str | None = None,
    figures: Mapping[str, Any] | None = None,
    files: Mapping[str, str | os.PathLike] | None = None,
) -> list[str]:
    """Log the resolved config (`config.yaml`), figures (`plots/<name>.png`) and files/folders (`<subdir>/...`).

    Returns the artifact paths logged. Missing local files are reported before anything is uploaded.
    """
    missing = [os.fspath(path) for path in (files or {}).values() if not os.path.exists(path)]
    if missing:
        raise FileNotFoundError(f"cannot log artifacts for run {run_id}, missing: {', '.join(missing)}")
    client = _client(uri)
    logged = []
    if config_yaml is not None:
        client.log_text(run_id, config_yaml, "config.yaml")
        logged.append("config.yaml")
    for name, figure in (figures or {}).items():
        artifact = f"plots/{name}" if Path(name).suffix else f"plots/{name}.png"
        client.log_figure(run_id, figure, artifact)
        logged.append(artifact)
    for subdir, local_path in (files or {}).items():
        subdir = str(subdir).strip("/") or None
        if os.path.isdir(local_path):
            client.log_artifacts(run_id, os.fspath(local_path), subdir)
            logged.append(subdir or ".")
        else:
            client.log_artifact(run_id, os.fspath(local_path), subdir)
            name = os.path.basename(local_path)
            logged.append(f"{subdir}/{name}" if subdir else name)
    return logged
