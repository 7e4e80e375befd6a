"""The bad-sample ledger of a dataset decoded by Ray Data: one small named actor that every decode task of
the dataset reports to, and that any process of the job (driver, Train worker, task) can read by name.

The in-process counterpart, with the same `record`/`report`/`check`, is `bad_samples.LocalLedger`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import ray

from pipeline.data.bad_samples import BadSampleReport, LedgerSnapshot, LedgerState, check_bad_fraction


@ray.remote(num_cpus=0)
class BadSampleLedger(LedgerState):
    """Running totals of one dataset's bad samples, shared by all its decode tasks and readers."""

    def get(self) -> BadSampleReport:
        return self.totals


@dataclass(frozen=True)
class RayLedger:
    """A handle on a `BadSampleLedger` and the limit it enforces; decode tasks receive it pickled. Holding it
    keeps the actor alive."""

    name: str
    max_bad_fraction: float
    min_samples: int
    handle: ray.actor.ActorHandle = field(repr=False, compare=False)

    def record(self, seen: int, bad: dict[str, int], examples: list[str], bad_ids=()) -> BadSampleReport:
        """Add one decode call's counts, then raise TooManyBadSamples if the running totals cross the limit."""
        totals = ray.get(self.handle.record.remote(seen, bad, examples, list(bad_ids)))
        check_bad_fraction(totals, self.max_bad_fraction, self.min_samples)
        return totals

    def start_pass(self) -> None:
        ray.get(self.handle.start_pass.remote())

    def snapshot(self) -> LedgerSnapshot:
        return ray.get(self.handle.snapshot.remote())

    def restore(self, totals: BadSampleReport) -> None:
        ray.get(self.handle.restore.remote(totals))

    def report(self) -> BadSampleReport:
        return ray.get(self.handle.get.remote())

    def check(self) -> None:
        """Raise TooManyBadSamples if the totals are over the limit; a ledger that is gone (its owner died)
        says nothing."""
        try:
            totals = self.report()
        except ray.exceptions.RayError:
            return
        check_bad_fraction(totals, self.max_bad_fraction, self.min_samples)


def start_ledger(max_bad_fraction: float, min_samples: int) -> RayLedger:
    """Start a ledger actor, owned by the calling process."""
    name = f"bad-samples-{uuid.uuid4().hex[:12]}"
    return RayLedger(name, max_bad_fraction, min_samples, BadSampleLedger.options(name=name).remote())


def attach_ledger(name: str, max_bad_fraction: float, min_samples: int) -> RayLedger:
    """The ledger another process of the job started, by its name."""
    return RayLedger(name, max_bad_fraction, min_samples, ray.get_actor(name))
