"""The cluster configs of cluster/: Ray's own schema check for the launcher YAMLs, and the KubeRay manifests'
autoscaling, worker groups, token authentication and entrypoint."""

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml
from jsonschema import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.config import load_job_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"


def load(name: str):
    return yaml.safe_load((CLUSTER / name).read_text())


def test_aws_launcher_config_passes_rays_schema_check_with_gpu_and_data_node_types():
    config = load("aws.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))  # fills the AWS defaults, then Ray's JSON schema
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0} and "GPU" not in head["resources"]
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    data = [t for t in types.values() if t["resources"].get("data_node")]
    assert len(gpu) == 2 and all(t["max_workers"] >= 1 for t in gpu)  # on-demand, and spot for elastic runs
    assert [t["node_config"].get("InstanceMarketOptions") for t in gpu] == [None, {"MarketType": "spot"}]
    assert len(data) == 1 and data[0]["min_workers"] == 0 and data[0]["max_workers"] >= 1
    assert "GPU" not in data[0]["resources"]
    assert 0 < config["idle_timeout_minutes"]
    commands = " ".join(config["setup_commands"] + config["head_start_ray_commands"])
    assert "pip install -q -e ~/vit-pipeline/src" in commands and config["file_mounts"] == {"~/vit-pipeline/src": "."}
    assert "secretsmanager get-secret-value" in commands and "~/.ray/auth_token" in commands
    for start in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE=token" in start
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])

    broken = copy.deepcopy(config)
    broken["available_node_types"]["cpu_data"]["resources"]["data_node"] = "many"
    with pytest.raises(ValidationError):  # the check is real: a bad resource count is refused
        validate_config(prepare_config(broken))


def test_local_autoscaling_config_passes_rays_schema_check():
    text = (CLUSTER / "local-autoscaling.yaml").read_text().replace("${RAY_GCS_ADDRESS}", "127.0.0.1:6379")
    config = yaml.safe_load(text)
    validate_config(config)  # prepare_config would look for the fake provider's example.yaml, absent from the wheel
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert max(t.get("max_workers", 0) for t in types.values() if "data_node" not in t["resources"]) >= 2
    assert config["provider"]["type"] == "fake_multinode" and config["idle_timeout_minutes"] <= 0.25


def worker_groups(spec: dict) -> dict[str, dict]:
    return {group["groupName"]: group for group in spec["workerGroupSpecs"]}


def container_resources(group: dict) -> dict:
    (container,) = group["template"]["spec"]["containers"]
    return container["resources"]["limits"]


def check_cluster_spec(spec: dict, gpu_groups: int = 1) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["authOptions"] == {"mode": "token", "secretName": "vit-ray-auth"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = worker_groups(spec)
    gpu = [g for g in groups.values() if "nvidia.com/gpu" in container_resources(g)]
    data = [g for g in groups.values() if "data_node" in g["rayStartParams"].get("resources", "")]
    assert len(gpu) == gpu_groups and len(data) == 1 and gpu != data
    for group in gpu + data:
        assert group["minReplicas"] == 0 < group["maxReplicas"]
    assert "nvidia.com/gpu" not in container_resources(data[0])
    text = yaml.safe_dump(spec)
    assert not re.search(r"https?://(?!example)", text), "a URL is written into the manifest"
    assert "s3://" not in text


def test_kuberay_raycluster_autoscales_gpu_and_data_groups_with_token_auth():
    manifest = load("kuberay/raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    check_cluster_spec(manifest["spec"], gpu_groups=2)  # on-demand, and spot for elastic runs
    spot = worker_groups(manifest["spec"])["gpu-trainer-spot"]["template"]["spec"]["nodeSelector"]
    assert spot == {"karpenter.sh/capacity-type": "spot"}


def test_kuberay_rayjob_runs_pretrain_with_an_existing_config():
    manifest = load("kuberay/rayjob.yaml")
    assert manifest["kind"] == "RayJob" and manifest["spec"]["shutdownAfterJobFinishes"] is True
    check_cluster_spec(manifest["spec"]["rayClusterSpec"])
    words = shlex.split(manifest["spec"]["entrypoint"])
    assert words[:2] == ["python", "jobs/pretrain.py"] and (ROOT / words[1]).is_file()
    config = words[words.index("--config") + 1]
    assert (ROOT / config).is_file()
    overrides = [w for w in words[2:] if "=" in w and not w.startswith("train.storage_path")]
    job = load_job_config(ROOT / config, overrides)  # the entrypoint's config and overrides are valid
    assert job.data.decode_resources == {"data_node": 1}
    runtime_env = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "${MLFLOW_TRACKING_URI}"


def test_runtime_env_takes_tracking_and_storage_from_the_environment():
    runtime_env = load("runtime_env.yaml")
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "${MLFLOW_TRACKING_URI}"
    assert runtime_env["env_vars"]["VIT_STORAGE_PATH"] == "${VIT_STORAGE_PATH}"
    assert {".venv", "data/", "runs/"} <= set(runtime_env["excludes"])
