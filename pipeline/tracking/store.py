"""Where the tracking store is: an absolute URI, its artifact root, and a check that it can be used.

The default store is a sqlite file at an absolute path. MLflow's own default, `sqlite:///mlflow.db`, is
relative to the current directory, and under `ray job submit` that directory is a temporary unpacked copy
of the working dir that Ray deletes later: results logged there would vanish. The rule, in order:

    explicit uri  >  $MLFLOW_TRACKING_URI  >  $VIT_PIPELINE_HOME/mlflow.db
                  >  ./mlflow.db (absolute)  unless ./ is a Ray job's working dir, then ~/.vit-pipeline/mlflow.db

Local stores (sqlite, plain folders) are always returned as absolute URIs. A sqlite store also gets an
absolute artifact root, `<db dir>/mlartifacts` (artifact_root_for), which runs.py sets on every experiment it
creates, because with a sqlite backend MLflow would otherwise resolve artifact locations against the current
directory.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)

HOME_ENV = "VIT_PIPELINE_HOME"  # folder for the default store when set
DB_FILENAME = "mlflow.db"
ARTIFACTS_DIRNAME = "mlartifacts"
BARE_REMOTE_URIS = ("databricks", "databricks-uc", "uc")  # tracking URIs with no scheme that are not folders


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be used; the message is one line that says what to do."""


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
