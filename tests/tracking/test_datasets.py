"""The shards a run reads, as MLflow datasets (pipeline/tracking/datasets.py), on a sqlite store and a real
`mlflow server`: the digest says when two runs read the same shards, wherever they are stored, and changes
when a shard does (rewritten, and indexed again by the real indexer)."""

import io
import json
import shutil
import tarfile

from mlflow import MlflowClient

from pipeline.data.shard_set import read_shard_set
from pipeline.data.shard_writer import index_shards
from pipeline.tracking.datasets import CONTEXT_TAG, PRETRAIN_RUN_TAG, log_datasets
from pipeline.tracking.runs import start_job_run


def inputs_of(client: MlflowClient, run_id: str) -> dict[str, tuple[str, str, dict, dict]]:
    """context -> (name, digest, source, profile) of the run's dataset inputs."""
    found = {}
    for item in client.get_run(run_id).inputs.dataset_inputs:
        context = {tag.key: tag.value for tag in item.tags}[CONTEXT_TAG]
        dataset = item.dataset
        found[context] = (dataset.name, dataset.digest, json.loads(dataset.source), json.loads(dataset.profile))
    return found


def test_runs_on_the_same_shards_share_a_digest_and_a_changed_shard_changes_it(any_store, job_config,
                                                                                 digits_shards, tmp_path):
    client = MlflowClient(any_store)
    copy = tmp_path / "digits"
    shutil.copytree(digits_shards, copy)
    changed = tmp_path / "changed" / "digits"
    shutil.copytree(digits_shards, changed)
    # one shard rewritten with its first half only, and the split indexed again, as a user would
    shard = changed / "train-000003.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({member.name.split(".")[0] for member, _ in members})
    keep = set(keys[: len(keys) // 2])
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name.split(".")[0] in keep:
                tar.addfile(member, io.BytesIO(data))
    index_shards(str(changed / "train-*.tar"), progress=False)

    runs = {}
    for name, folder in (("a", digits_shards), ("copy", copy), ("changed", changed)):
        runs[name] = start_job_run(uri=any_store, experiment="datasets", run_name=name, job="pretrain",
                                   config=job_config)
        log_datasets(client, runs[name], train=read_shard_set(str(folder / "train-*.tar")),
                     val=read_shard_set(str(folder / "val-*.tar")))
    a, copied, other = (inputs_of(client, runs[name]) for name in ("a", "copy", "changed"))

    assert set(a) == {"train", "validation"}
    name, digest, source, profile = a["train"]
    assert name == f"{digits_shards.name}/train" and source == {"uri": str(digits_shards / "train-*.tar")}
    assert profile["num_shards"] == 8 and profile["num_samples"] == 1438 and profile["num_classes"] == 10
    assert profile["classes"] == [str(i) for i in range(10)] and profile["split"] == "train"
    assert a["validation"][3]["num_samples"] == 359
    # the same shards in another folder: the same digest; one shard changed: another digest, the val split's kept
    assert copied["train"][1] == digest and copied["validation"][1] == a["validation"][1]
    assert other["train"][1] != digest and other["validation"][1] == a["validation"][1]
    assert other["train"][3]["num_samples"] < 1438


def test_a_finetune_records_its_parents_training_data(any_store, job_config, digits_shards, tmp_path):
    client = MlflowClient(any_store)
    train, val = read_shard_set(str(digits_shards / "train-*.tar")), read_shard_set(str(digits_shards / "val-*.tar"))
    parent = start_job_run(uri=any_store, experiment="datasets", run_name="pretrain", job="pretrain",
                           config=job_config)
    log_datasets(client, parent, train=train, val=val)
    # a fine-tune on other data: the parent's is an input of context "pretrain"
    other = read_shard_set(str(digits_shards / "val-*.tar"))
    child = start_job_run(uri=any_store, experiment="datasets", run_name="finetune", job="finetune",
                          config=job_config, parent_run_id=parent)
    log_datasets(client, child, train=other, val=None, parent_run_id=parent)
    found = inputs_of(client, child)
    assert set(found) == {"train", "pretrain"}
    assert found["pretrain"][:2] == inputs_of(client, parent)["train"][:2]
    assert found["train"][:2] == inputs_of(client, parent)["validation"][:2]
    # on the same data (the demo's): one input, tagged as the parent's training data too
    same = start_job_run(uri=any_store, experiment="datasets", run_name="finetune-same", job="finetune",
                         config=job_config, parent_run_id=parent)
    log_datasets(client, same, train=train, val=val, parent_run_id=parent)
    tags = {next(t.value for t in item.tags if t.key == CONTEXT_TAG): {t.key: t.value for t in item.tags}
            for item in client.get_run(same).inputs.dataset_inputs}
    assert tags == {"train": {CONTEXT_TAG: "train", PRETRAIN_RUN_TAG: parent},
                    "validation": {CONTEXT_TAG: "validation"}}
    # children in MLflow's own sense: search_runs and the UI nest them under their parent
    rows = client.search_runs([client.get_run(parent).info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(row.info.run_id for row in rows) == sorted([child, same])
