"""The shards of one split, read once: their locations, each one's sample count, and the class names.

The driver reads a `ShardSet` once per split (one listing per folder, one manifest read) and ships it to the
Train workers inside the resolved job, so no worker and no dataset build lists a folder or reads a manifest
again. Locations stay URIs with their scheme (pipeline/storage.py); the filesystem is resolved from them in
whichever process opens the shards.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipeline import storage
from pipeline.data.manifest import content_digest, find_manifest
from pipeline.data.shard_specs import expand_shards


@dataclass(frozen=True)
class ShardSet:
    spec: str | list[str]  # the shard spec as the config gave it
    uris: list[str]  # every shard's location: URIs with their scheme, or absolute local paths
    counts: list[int] | None  # samples per shard, from the manifest; None without one
    classes: list[str] = field(default_factory=list)  # class names from the manifest; [] when it names none
    split: str = ""  # the manifest's split name
    sample_members: list[str] = field(default_factory=list)  # member suffixes of a sample, e.g. jpg, cls
    json_keys: list[str] = field(default_factory=list)  # keys of a sample's .json member
    digest: str = ""  # of the shards' names and, with a manifest, their sample and byte counts (manifest.py)

    @property
    def num_shards(self) -> int:
        return len(self.uris)

    @property
    def num_samples(self) -> int | None:
        return sum(self.counts) if self.counts is not None else None

    def count_of(self) -> dict[str, int]:
        """Shard location -> sample count; raises ValueError without a manifest."""
        if self.counts is None:
            raise ValueError(f"no manifest beside {self.uris[0]}, so the epoch size is unknown; write one with "
                             "`python jobs/make_shards.py --source shards:PATTERN`")
        return dict(zip(self.uris, self.counts, strict=True))

    def subset(self, uris: list[str]) -> ShardSet:
        """The shards `uris` of this set, in that order, with their counts."""
        counts = self.count_of()
        return dataclasses.replace(self, spec=list(uris), uris=list(uris), counts=[counts[uri] for uri in uris])

    def filesystem(self):
        """(pyarrow filesystem, paths on it) of the shards, resolved in the calling process."""
        return storage.resolve_many(self.uris)

    def label_problem(self, label_key: str) -> str | None:
        """Why the samples hold no label where `label_key` looks (empty: `.cls`), or None when they do or the
        manifest does not say."""
        if not self.sample_members:
            return None
        if not label_key and "cls" not in self.sample_members:
            keys = f" (its keys: {', '.join(self.json_keys)})" if self.json_keys else ""
            return (f"the samples have no .cls member (members: {', '.join(self.sample_members)}); set "
                    f"data.label_key to the key of their .json that holds the label{keys}")
        if label_key and self.json_keys and label_key not in self.json_keys:
            return (f"data.label_key {label_key!r} is not a key of the samples' .json; its keys are "
                    f"{', '.join(self.json_keys)}")
        return None

    def summary(self) -> dict:
        """What MLflow params and config.json record of the set (not the per-shard lists)."""
        return {"spec": self.spec, "num_shards": self.num_shards, "num_samples": self.num_samples,
                "split": self.split, "num_classes": len(self.classes)}


def read_shard_set(spec: str | list[str]) -> ShardSet:
    """List the shards of `spec` (every one must exist) and read their manifest, if there is one."""
    uris = expand_shards(spec)
    manifest = find_manifest(uris)
    if manifest is None:
        return ShardSet(spec=spec, uris=uris, counts=None, digest=content_digest([storage.basename(u) for u in uris]))
    return ShardSet(spec=spec, uris=uris, counts=manifest.sample_counts(uris), classes=list(manifest.classes),
                    split=manifest.split, sample_members=list(manifest.sample_members),
                    json_keys=list(manifest.json_keys), digest=manifest.digest(uris))
