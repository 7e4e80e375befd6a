"""The console of a training job: lines for people, not the libraries' chatter.

By default a job prints its own lines (the run's start, a step line every `train.log_every_n_steps`, eval
results, one `checkpoint step N: <location>` line per checkpoint from rank 0, failures and the final summary)
and every library's real warnings and errors. What is quieted is a list of known messages, each by the
narrowest knob that reaches it; nothing lowers a library's WARNING or ERROR level as a whole.

- Ray Data, per epoch and split, from its SplitCoordinator actors: "Starting execution of Dataset …" and
  "Execution plan of Dataset …" (DataContext.print_on_execution_start = False, set before rank 0 builds the
  datasets, which copy it); "Dataset … execution finished in … seconds" (forwarded-line filter, below).
  Once per coordinator: "Progress bars disabled …" (forwarded-line filter; the bars themselves, one per epoch
  and rank, are off in every mode).
- Ray Train workers, per checkpoint and rank: "Reporting training result N: TrainingReport(…)" (a metrics
  dump) and "Checkpoint successfully created at: …" (forwarded-line filter); rank 0 of the loop prints one
  `checkpoint step N: <location>` line instead.
- Ray Train controller: core_worker.cc's error that Ray's own PreemptionWatcher actor "has constructor
  arguments in the object store and max_restarts > 0" (forwarded-line filter).
- Ray Train, per start of the worker group, the two lines that repeat its neighbours: "Attempting to start
  training worker group of size N with the following resources: …" (after "Requesting resources: …") and
  rank 0's "Setting up process group for: env:// [rank=0, world_size=N]" (forwarded-line filter).
- Ray Train's elastic policy, every `train.resize_check_s`: "Did not detect any changes in the cluster
  resources. Training will continue with the same worker group size (N)." (forwarded-line filter); a resize
  shows in Ray's "Detected changes in the cluster resources…" and in our "world size N (was M)".
- DeepSpeed, per rank: the print "DeepSpeed … built successfully" (forwarded-line filter).
- DeepSpeed, per rank and resharded load (a checkpoint of another world size): "MPU is not provided, setting
  tp size to 1 in checkpoint loading." (a filter for that message on that logger; there is no tensor
  parallelism here).
- torch, per rank: "No CUDA runtime is found, using CUDA_HOME=…" on CPU workers, when DeepSpeed's op builder
  imports torch.utils.cpp_extension (a filter for that message on that logger); the FutureWarning
  "`torch.distributed.*` is deprecated" for the collectives DeepSpeed's ZeRO calls (warnings.filterwarnings).
- torch, per Train worker: the UserWarning "The given NumPy array is not writable" for the zero-copy tensors of
  Ray Data's `iter_torch_batches`, which Ray means to suppress but whose `catch_warnings` is not thread-safe
  (warnings.filterwarnings; the loop never writes into a batch).
- MLflow, on the driver, for a new sqlite store: "Creating initial MLflow database tables…", "Updating database
  tables" (logger mlflow.store.db.utils at WARNING).

Ray's start-up lines (the token-authentication notice, the dashboard address) stay, and so do Ray Train's
"Requesting resources: …" and "Started training worker group of size N:" with its ranks: once per attempt, they
say what a start waits for, and show restarts.

The filter of forwarded lines is the one Ray's documented `RAY_DEDUP_LOGS_SKIP_REGEX` sets up (the driver drops
every forwarded worker line that matches it). Ray reads that variable once, when `ray` is imported, which is
before a job has read its config; so `quiet_driver` sets the same pattern on the objects that variable
configures (`pipeline.internals.skip_forwarded_lines`, the one Ray internal used here). A pattern of your own in
RAY_DEDUP_LOGS_SKIP_REGEX is kept beside ours. With `RAY_DEDUP_LOGS=0` Ray applies no skip pattern, so those
lines show.

Bring everything back with `train.verbose=true` or the environment variable `VIT_PIPELINE_VERBOSE=1`.

Measure: `VIT_PIPELINE_CONSOLE_TAG=1` makes our log lines start with `[pipeline] ` (driver and workers), so that
`python -m pipeline.console CONSOLE_FILE` (or stdin) can count the lines that are not ours:

    VIT_PIPELINE_CONSOLE_TAG=1 python jobs/pretrain.py 2>&1 | tee console.txt
    python -m pipeline.console console.txt --show
"""

import logging
import os
import re
import sys
import warnings

VERBOSE_ENV = "VIT_PIPELINE_VERBOSE"
TAG_ENV = "VIT_PIPELINE_CONSOLE_TAG"
TAG = "[pipeline] "

# Lines that Ray forwards from its workers and actors to the driver, dropped there unless verbose.
FORWARDED_QUIET = (
    r"Dataset \S+ execution finished in [\d.]+ seconds",  # Ray Data, per epoch and split
    r"Progress bars disabled\. To enable, set `ray\.data\.DataContext",  # Ray Data, per coordinator
    r"Reporting training result \d+: TrainingReport\(",  # Ray Train, per checkpoint and rank
    r"Checkpoint successfully created at: Checkpoint\(",  # Ray Train, per checkpoint and rank
    r"Actor with class name: 'PreemptionWatcher' .*has constructor arguments in the object store",  # Ray Train
    r"^Attempting to start training worker group of size \d+ with the following resources: ",  # per attempt
    r"^Setting up process group for: ",  # Ray Train, rank 0, per attempt
    r"^Did not detect any changes in the cluster resources\. Training will continue",  # elastic, per check
    r"^DeepSpeed \S+ built successfully$",  # DeepSpeed's print, per rank
)
# (logger, message) pairs dropped in the Train workers unless verbose
WORKER_QUIET = (
    ("torch.utils.cpp_extension", r"^No CUDA runtime is found, using CUDA_HOME="),
    ("DeepSpeed", r"^MPU is not provided, setting tp size to 1 in checkpoint loading"),  # resharded loads, per rank
)
# loggers whose INFO lines are not for people; their warnings and errors still show
DRIVER_WARNING_LEVEL = ("mlflow.store.db.utils",)
TORCH_COLLECTIVES_WARNING = r"`torch\.distributed\.\w+` is deprecated"
# Ray Data's torch_utils suppresses this for its zero-copy tensors inside warnings.catch_warnings(), which is not
# thread-safe: with other threads in the worker, the warning leaks now and then. Nothing here writes into a batch.
NUMPY_NOT_WRITABLE_WARNING = r"The given NumPy array is not writable"

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RAY_PREFIX = re.compile(r"^\((?:[\w.:-]+ )?pid=[^)]*\) ")  # "(RayTrainWorker pid=123) ", "(pid=123, ip=…) "
# what the jobs print (not through logging): the summary, a one-line error; and our shard writer's tqdm bars
_JOB_OUTPUT = re.compile(r"^$|^(MLflow run|final val top-1|resolution|checkpoint|look at it): |^error: "
                         r"|^(train|val) shards: |^indexing (train|val)")


def is_verbose(flag: bool = False) -> bool:
    """`train.verbose` (`flag`) or the environment variable VIT_PIPELINE_VERBOSE."""
    return bool(flag) or os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class ConsoleFormatter(logging.Formatter):
    """The message alone; with VIT_PIPELINE_CONSOLE_TAG set, each line of a `pipeline.*` record starts with TAG."""

    def __init__(self):
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if os.environ.get(TAG_ENV) and (record.name == "pipeline" or record.name.startswith("pipeline.")):
            text = "\n".join(TAG + line for line in text.split("\n"))
        return text


class DropMessages(logging.Filter):
    """Drops the records whose message matches `pattern`; every other record passes."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.pattern.search(record.getMessage())
        except Exception:  # a record that cannot be formatted is not one of ours to judge
            return True


def driver_console() -> None:
    """The job's driver logging: our INFO lines, every other library's warnings and errors (stderr)."""
    handler = logging.StreamHandler()
    handler.setFormatter(ConsoleFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("pipeline").setLevel(logging.INFO)


def quiet_driver(verbose: bool) -> None:
    """Before the run starts (MLflow, `trainer.fit()`): quiet the known lines on the driver, or with `verbose`
    bring them back. Safe to call again with the other value."""
    from pipeline.internals import skip_forwarded_lines

    for name in DRIVER_WARNING_LEVEL:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    skip_forwarded_lines(None if verbose else forwarded_pattern())


def forwarded_pattern() -> str:
    return "|".join(f"(?:{pattern})" for pattern in FORWARDED_QUIET)


def worker_runtime_env(verbose: bool) -> dict:
    """`RunConfig(worker_runtime_env=…)`: the driver's console settings (verbose, the measuring tag) for the Train
    workers, which on a cluster do not share the driver's environment."""
    env_vars = {VERBOSE_ENV: "1"} if verbose else {}
    if os.environ.get(TAG_ENV):
        env_vars[TAG_ENV] = os.environ[TAG_ENV]
    return {"env_vars": env_vars} if env_vars else {}


def ray_data_console(verbose: bool) -> None:
    """In a Train worker, before rank 0 builds its datasets (they copy the context): Ray Data's progress bars off
    (one per epoch and rank); unless `verbose`, its execution-start lines too."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = verbose


def worker_console(verbose: bool) -> None:
    """First thing in the training loop: our INFO lines reach the driver with their own handler; unless
    `verbose`, the worker's known library lines (WORKER_QUIET, two torch warnings) are
    quieted. Imports no Ray; safe to call again."""
    for name, pattern in WORKER_QUIET:
        _set_drop(logging.getLogger(name), pattern, on=not verbose)
    _set_ignored_warning(TORCH_COLLECTIVES_WARNING, FutureWarning, on=not verbose)
    _set_ignored_warning(NUMPY_NOT_WRITABLE_WARNING, UserWarning, on=not verbose)
    logger = logging.getLogger("pipeline")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(ConsoleFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # Ray Train's root handlers would print every line a second time


def _set_drop(logger: logging.Logger, pattern: str, *, on: bool) -> None:
    for existing in [f for f in logger.filters if isinstance(f, DropMessages) and f.pattern.pattern == pattern]:
        logger.removeFilter(existing)
    if on:
        logger.addFilter(DropMessages(pattern))


def _set_ignored_warning(message: str, category: type[Warning], *, on: bool) -> None:
    if on:
        warnings.filterwarnings("ignore", message=message, category=category)
        return
    # an "ignore" filter leaves nothing in the warnings registries, so it can simply be taken out again
    warnings.filters[:] = [f for f in warnings.filters
                           if not (f[0] == "ignore" and f[2] is category and getattr(f[1], "pattern", None) == message)]


def is_ours(line: str) -> bool:
    """A console line of the pipeline: a tagged log line (VIT_PIPELINE_CONSOLE_TAG=1), from the driver or, behind
    Ray's `(… pid=…)` prefix, from a worker; or what the jobs print."""
    line = _ANSI.sub("", line).rstrip("\r").split("\r")[-1]  # a redrawn progress bar: what the terminal shows
    line = _RAY_PREFIX.sub("", line)
    return line.startswith(TAG) or bool(_JOB_OUTPUT.search(line))


def count_lines(text: str) -> tuple[int, list[str]]:
    """(lines, the lines that are not ours) of a captured console, lines as `wc -l` counts them (a progress bar
    redrawn with carriage returns is one line, as a terminal shows it). Blank lines count as ours: the jobs'
    summary starts with one."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return len(lines), [line for line in lines if not is_ours(line)]


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Count the console lines of a job (run with "
                                                 f"{TAG_ENV}=1) that are not the pipeline's.")
    parser.add_argument("console", nargs="?", help="captured stdout+stderr; default stdin")
    parser.add_argument("--show", action="store_true", help="list the lines that are not ours")
    args = parser.parse_args(argv)
    # bytes: a text stream would make every carriage return of a progress bar a line of its own
    if args.console:
        with open(args.console, "rb") as file:
            data = file.read()
    else:
        data = sys.stdin.buffer.read()
    text = data.decode("utf-8", errors="replace")
    total, foreign = count_lines(text)
    if args.show:
        print("\n".join(foreign))
    print(f"{total} lines, {len(foreign)} not from the pipeline ({100 * len(foreign) / max(total, 1):.0f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
