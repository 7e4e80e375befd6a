"""Bad samples are skipped and counted, never fatal one by one, and fatal in bulk.

Design: the decode stage drops bad rows, so nothing downstream of it can count them. Every decode call
therefore reports how many rows it saw and which were bad (with shard/key examples) to the dataset's
ledger: on Ray one small named actor per dataset (ledger.py), in one process a `LocalLedger`. The call is
synchronous, one per batch of `decode_batch_size` rows (about a millisecond against hundreds of
milliseconds of decoding), so the ledger is exact whenever the consumer has received a batch, and each
decode call sees the running totals and stops the job itself when the bad fraction crosses the limit: the
error then reaches whoever consumes the dataset (a Train worker, an eval loop, a benchmark) with the counts
and up to five examples. Both ledgers have the same methods: `record` (what a decode call saw; raises
TooManyBadSamples over the limit), `report` (the totals, which Train workers log as metrics), `check`, and
for a sample-exact resume (epochs.py) `start_pass` / `snapshot` (the totals with the (shard, index) of each
bad sample of the pass in progress, which a checkpoint keeps) / `restore` (the totals a checkpoint kept).

Counting in-band (count columns riding along with the good rows) was rejected: a decode batch whose rows
are all bad has no row to carry its counts, and rows cut by drop_last or the equal split lose theirs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

UNDECODABLE = "undecodable"  # the image bytes do not decode
BAD_LABEL = "bad_label"  # label member missing, unparsable or out of range
TOO_MANY_PIXELS = "too_many_pixels"  # width*height over data.max_image_pixels (decompression bomb)
TRUNCATED_TAR = "truncated_tar"  # the tar stops mid-way or is not a tar; counted once per broken shard
NO_IMAGE = "no_image"  # a key without an image member
REASONS = (UNDECODABLE, BAD_LABEL, TOO_MANY_PIXELS, TRUNCATED_TAR, NO_IMAGE)
MAX_EXAMPLES = 5


class BadSample(Exception):
    """One sample that is skipped; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TooManyBadSamples(RuntimeError):
    """The bad fraction crossed data.max_bad_fraction: the data needs fixing before training on it."""


@dataclass
class BadSampleReport:
    seen: int = 0  # rows the decode stage looked at, good and bad
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    examples: list[str] = field(default_factory=list)  # "shard/key (reason: detail)", at most MAX_EXAMPLES

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    @property
    def bad_fraction(self) -> float:
        return self.num_bad / self.seen if self.seen else 0.0

    def exceeds(self, max_bad_fraction: float, min_samples: int) -> bool:
        return self.seen >= min_samples and self.bad_fraction > max_bad_fraction

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Flat numbers for ray.train.report / MLflow."""
        out = {f"{prefix}samples_seen": self.seen, f"{prefix}bad_samples": self.num_bad,
               f"{prefix}bad_fraction": self.bad_fraction}
        out.update({f"{prefix}bad_{reason}": n for reason, n in self.bad.items()})
        return out

    def describe(self) -> str:
        counts = ", ".join(f"{reason} {n}" for reason, n in self.bad.items() if n) or "none"
        examples = "; ".join(self.examples) or "none recorded"
        return (f"{self.num_bad} of {self.seen} samples were bad ({self.bad_fraction:.2%}): {counts}. "
                f"Examples: {examples}")


def check_bad_fraction(report: BadSampleReport, max_bad_fraction: float, min_samples: int) -> None:
    """Raise TooManyBadSamples, with the counts and examples, when `report` is over the limit."""
    if report.exceeds(max_bad_fraction, min_samples):
        raise TooManyBadSamples(
            f"too many bad samples: {report.describe()} This is over data.max_bad_fraction="
            f"{max_bad_fraction} (checked after data.min_samples_for_bad_check={min_samples}).")


@dataclass
class LedgerSnapshot:
    """A ledger's totals, and what the decode stage saw of the pass in progress: rows, and the bad ones by
    (shard index in the pass, position in the shard)."""

    totals: BadSampleReport
    pass_seen: int
    pass_bad: list[tuple[int, int]]


class LedgerState:
    """What both ledgers keep: the run's totals and the pass in progress."""

    def __init__(self):
        self.totals = BadSampleReport()
        self.pass_seen = 0
        self.pass_bad: list[tuple[int, int]] = []

    def record(self, seen: int, bad: dict[str, int], examples: list[str], bad_ids=()) -> BadSampleReport:
        add_counts(self.totals, seen, bad, examples)
        self.pass_seen += seen
        self.pass_bad.extend(tuple(i) for i in bad_ids)
        return self.totals

    def start_pass(self) -> None:
        self.pass_seen, self.pass_bad = 0, []

    def snapshot(self) -> LedgerSnapshot:
        return LedgerSnapshot(copy.deepcopy(self.totals), self.pass_seen, list(self.pass_bad))

    def restore(self, totals: BadSampleReport) -> None:
        self.totals = copy.deepcopy(totals)
        self.start_pass()


class LocalLedger(LedgerState):
    """The ledger of a dataset decoded in this process (`LocalContext`): the same counts, no Ray."""

    def __init__(self, max_bad_fraction: float, min_samples: int):
        super().__init__()
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples

    def record(self, seen: int, bad: dict[str, int], examples: list[str], bad_ids=()) -> BadSampleReport:
        super().record(seen, bad, examples, bad_ids)
        self.check()
        return self.totals

    def report(self) -> BadSampleReport:
        return self.totals

    def check(self) -> None:
        check_bad_fraction(self.totals, self.max_bad_fraction, self.min_samples)


def add_counts(report: BadSampleReport, seen: int, bad: dict[str, int], examples: list[str]) -> None:
    """Add one decode call's counts and examples to running totals."""
    report.seen += seen
    for reason, n in bad.items():
        report.bad[reason] = report.bad.get(reason, 0) + n
    room = MAX_EXAMPLES - len(report.examples)
    report.examples.extend(examples[:max(room, 0)])
