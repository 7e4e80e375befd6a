"""Every reach into a private part of Ray, DeepSpeed or MLflow, in one place.

Each function says why it reaches in, and tests/test_internals.py has one test per reach that fails on the
installed versions when the internal is gone or has changed, so an upgrade shows in CI instead of as a
slower or less safe run. At run time a missing internal is logged once as a warning and skipped.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

LIMITS_REFRESH_S = 0.1


def start_epochs_at_full_width() -> None:
    """Let every execution of a dataset (every epoch) start as many decode tasks as the cluster holds at once.

    Ray Data 2.60 learns an execution's resource limits from its autoscaling coordinator actor, with a
    non-blocking poll that it repeats once a second. The first poll of each execution has no reply yet, so for
    its first second the executor runs a single task, however many CPUs there are. Polling every 0.1 s ends
    that after 0.1 s (docs/benchmarks.md, "Data loading"). Ray offers no setting for it: this lowers the
    interval on Ray Data's private `ResourceManager` class. It runs where datasets execute: on import of
    pipeline/data/datasets.py, which the driver and Ray Data's split coordinators (they unpickle the decode
    function) both do.
    """
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager

        interval_s = ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S
    except (ImportError, AttributeError) as err:
        log.warning("Ray Data's resource-limit poll interval is not where it was (%s): epochs start narrow", err)
        return
    if interval_s > LIMITS_REFRESH_S:
        ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = LIMITS_REFRESH_S


def pin_data_stats_to_this_node() -> None:
    """Ray Data keeps one detached stats actor per cluster, for the cluster's lifetime, on the node of the
    process that first runs a dataset. Left to the rank-0 Train worker, that would keep a trainer (GPU) node
    from ever scaling down; created by the driver (private `get_or_create_stats_actor`), it lives on the
    driver's node (the head under `ray job submit`)."""
    try:
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError as err:
        log.warning("could not pin Ray Data's stats actor to the driver's node (%s)", err)
        return
    get_or_create_stats_actor()


def use_weights_only_loading(engine) -> None:
    """Make DeepSpeed unpickle its checkpoint files with `weights_only=True`: DeepSpeed offers no setting, so
    the engine's `checkpoint_engine` is swapped for a subclass of its private `TorchCheckpointEngine`."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            # DeepSpeed pickles a few small objects of its own (plain numbers inside) in the ZeRO optimizer state
            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                return torch.load(path, map_location=map_location, weights_only=True)

    if not isinstance(getattr(engine, "checkpoint_engine", None), TorchCheckpointEngine):
        raise RuntimeError("DeepSpeed's engine no longer holds a TorchCheckpointEngine: checkpoints would be "
                           "unpickled without weights_only=True")
    checkpoint_engine = WeightsOnlyCheckpointEngine()
    checkpoint_engine.zipfile_serialization = True
    engine.checkpoint_engine = checkpoint_engine


def skip_forwarded_lines(pattern: str | None) -> bool:
    """Make the driver drop the worker lines Ray forwards to it that match `pattern` (None: only the user's
    RAY_DEDUP_LOGS_SKIP_REGEX, as Ray would), beside a pattern of the user's own. Ray's documented
    RAY_DEDUP_LOGS_SKIP_REGEX sets this filter, but Ray reads it once, when `ray` is imported, before a job has
    read its config; so the pattern goes on the objects it configures, the private `stdout_deduplicator` and
    `stderr_deduplicator` (their `skip_re`). Returns False where this Ray has no such filter."""
    user = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX")
    combined = "|".join(f"(?:{p})" for p in (user, pattern) if p)
    try:
        from ray._private.ray_logging import stderr_deduplicator, stdout_deduplicator
    except ImportError as err:
        log.warning("Ray's filter of forwarded worker lines is not where it was (%s): its chatter shows", err)
        return False
    for deduplicator in (stdout_deduplicator, stderr_deduplicator):
        if not hasattr(deduplicator, "skip_re"):
            log.warning("Ray's filter of forwarded worker lines has no skip_re: its chatter shows")
            return False
        deduplicator.skip_re = re.compile(combined) if combined else None
    return True


@contextmanager
def universal_checkpoint_loading(engine) -> Iterator[None]:
    """Within the block, `engine.load_checkpoint` reads a DeepSpeed universal checkpoint (a ZeRO checkpoint of
    another world size, converted: pipeline/train/reshard.py). DeepSpeed takes that from the config's
    `checkpoint.load_universal`, which it reads only in `load_checkpoint` (`engine.load_universal_checkpoint()`);
    set in the config it would send every load, of any world size, the universal way. So it is set on the
    engine's private config object for one load."""
    config = engine._config
    if not hasattr(config, "load_universal_checkpoint"):
        raise RuntimeError("DeepSpeed's config has no load_universal_checkpoint: cannot load a universal checkpoint")
    previous = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = previous


def preemption_notice():
    """The preemption notice Ray Train's watcher has given this worker (a `ray.train.PreemptionInfo`), or None,
    without a collective. The public `ray.train.get_preemption_info()` agrees on one value through a barrier
    of Ray actor calls, milliseconds per call, which every step would pay; the loop agrees with one small gloo
    all-reduce instead (ray_context.RayTrainContext.preemption_deadline_collective). This reads the same field
    that the public call broadcasts from rank 0: the worker's private train context."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info
    except (ImportError, AttributeError) as err:
        if not getattr(preemption_notice, "warned", False):
            preemption_notice.warned = True
            log.warning("Ray Train's preemption notice is not where it was (%s): drains are not checkpointed early",
                        err)
        return None


MLFLOW_HTTP_BOUNDS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
_http_lock = threading.Lock()
_http_users = 0
_http_saved: dict[str, str | None] = {}


@contextmanager
def bounded_mlflow_http(request_timeout_s: int, max_retries: int = 0) -> Iterator[None]:
    """Within the block, MLflow HTTP requests fail after `max_retries` retries of at most `request_timeout_s`
    each (nestable, from any thread). MLflow's client takes its retries and timeout only from these two
    environment variables, which it reads on every request; by default a dead server holds a request for
    minutes (7 retries with backoff, 120 s each). The metric sender (pipeline/tracking/metrics.py) does its
    own retrying, so it bounds its requests with this. The variables are the process's: the rank-0 worker
    that sends step metrics sends nothing else to MLflow."""
    global _http_users
    bounds = dict(zip(MLFLOW_HTTP_BOUNDS, (str(max_retries), str(request_timeout_s)), strict=True))
    with _http_lock:
        if _http_users == 0:
            _http_saved.update({name: os.environ.get(name) for name in bounds})
            os.environ.update(bounds)
        _http_users += 1
    try:
        yield
    finally:
        with _http_lock:
            _http_users -= 1
            if _http_users == 0:
                for name, previous in _http_saved.items():
                    if previous is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = previous
                _http_saved.clear()
