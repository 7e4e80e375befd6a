"""The shards a run reads, as MLflow datasets: the runs table's "Dataset" column, and the dataset that val
metrics are linked to.

A dataset is MLflow's record of data, not a copy of it: a name, the shard spec as its source, a digest and a
profile (shard, sample and class counts, the class names). The digest is the shard set's (data/manifest.py):
two runs on the same shards show the same digest wherever the shards are stored, and a shard rewritten with
other samples gives another. A fine-tune also records its pretrain run's training data, so the data behind its
weights is on the fine-tune's page.
"""

from __future__ import annotations

import json

from pipeline import storage
from pipeline.data.shard_set import ShardSet

CONTEXT_TAG = "mlflow.data.context"  # MLflow's own input tag: what the run used the dataset for
PRETRAIN_RUN_TAG = "pipeline.pretrain_run"  # on a fine-tune's input: its parent trained on this dataset too
SOURCE_TYPE = "webdataset-shards"
MAX_CLASSES_IN_PROFILE = 1000  # the profile names the classes up to ImageNet-1k's; past that it counts them


def dataset_name(shards: ShardSet) -> str:
    """The shards' folder and split, e.g. `digits/train`: what the runs table shows."""
    folder = storage.basename(storage.parent(shards.uris[0])) if shards.uris else ""
    return "/".join(part for part in (folder, shards.split) if part) or "shards"


def dataset_key(shards: ShardSet) -> tuple[str, str]:
    """(name, digest): how a metric names the dataset it was measured on."""
    return dataset_name(shards), shards.digest


def dataset_input(shards: ShardSet, context: str):
    """An `mlflow.entities.DatasetInput` of the shard set, used for `context` (train, validation, pretrain)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    profile = {"num_shards": shards.num_shards, "num_samples": shards.num_samples,
               "num_classes": len(shards.classes), "split": shards.split}
    if len(shards.classes) <= MAX_CLASSES_IN_PROFILE:
        profile["classes"] = shards.classes
    spec = shards.spec if isinstance(shards.spec, str) else f"{len(shards.spec)} shards, first {shards.spec[0]}"
    dataset = Dataset(name=dataset_name(shards), digest=shards.digest, source_type=SOURCE_TYPE,
                      source=json.dumps({"uri": spec}), profile=json.dumps(profile))
    return DatasetInput(dataset=dataset, tags=[InputTag(key=CONTEXT_TAG, value=context)])


def log_datasets(client, run_id: str, *, train: ShardSet, val: ShardSet | None, parent_run_id: str = "") -> None:
    """Record the run's train and val shards as its inputs. A fine-tune also records the data its parent trained
    on: as an input of context `pretrain`, or, when it is one of the fine-tune's own (MLflow keeps one input per
    dataset and run), as the tag `pipeline.pretrain_run` on that input."""
    from mlflow.entities import DatasetInput, InputTag

    inputs = [dataset_input(train, "train")] + ([dataset_input(val, "validation")] if val else [])
    if parent_run_id:
        parent = client.get_run(parent_run_id).inputs
        ours = {(item.dataset.name, item.dataset.digest): item for item in inputs}
        for item in parent.dataset_inputs if parent else []:
            if {tag.key: tag.value for tag in item.tags}.get(CONTEXT_TAG) != "train":
                continue
            same = ours.get((item.dataset.name, item.dataset.digest))
            if same is not None:
                same._add_tag(InputTag(key=PRETRAIN_RUN_TAG, value=parent_run_id))
            else:
                inputs.append(DatasetInput(dataset=item.dataset, tags=[InputTag(key=CONTEXT_TAG, value="pretrain")]))
    client.log_inputs(run_id, datasets=inputs)
