"""cluster/aws.yaml and cluster/gcp.yaml against the cluster launcher's schema of the installed Ray (and
the checks `ray up` runs first), their security settings, and every training command cluster/
documents, parsed by the training CLI itself.

    .venv/bin/python -m pytest tests/test_cluster_launcher.py     # seconds, no cloud account needed
"""

import copy
import json
import re
import shlex
import urllib.parse
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
from cluster_files import CLUSTER, LAUNCHER_CONFIGS, TRAINING_IMAGE, launcher_config, project

from densenet_ray import config as C

SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
STORAGE = {"aws": "s3", "gcp": "gs"}


def schema_errors(config: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message[:300]}" for e in validator.iter_errors(config)]


def ray_up_checks(config: dict) -> None:
    """What `ray up` does before it starts anything: fill in the provider's defaults, validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_config_is_valid_for_the_installed_ray(name):
    config = launcher_config(name)
    assert not schema_errors(config), f"cluster/{name}: " + "\n".join(schema_errors(config))
    ray_up_checks(config)


@pytest.mark.parametrize("change", [
    lambda c: c.update(max_worker=4),                                                    # misspelt key
    lambda c: c["available_node_types"][c["head_node_type"]].update(min_workers="one"),  # wrong type
    lambda c: c["available_node_types"][c["head_node_type"]].pop("node_config"),         # required
])
def test_the_schema_refuses_mistakes(change):
    config = launcher_config("aws.yaml")
    change(config)
    assert schema_errors(config)


def test_ray_up_refuses_more_min_workers_than_max_workers():
    config = launcher_config("aws.yaml")
    config["max_workers"] = 0
    with pytest.raises(ValueError, match="max_workers"):
        ray_up_checks(config)


def run_options(config: dict) -> dict[str, str]:
    """docker run options as {"--env NAME": value, "--volume": "...", ...}."""
    out = {}
    for option in config["docker"]["run_options"]:
        flag, _, value = option.partition(" ")
        if flag == "--env":
            name, _, value = value.partition("=")
            flag = f"--env {name}"
        out[flag] = value
    return out


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_secure_by_default(name):
    """Token authentication with the token from the cloud's secret store (a file readable by the Ray
    user only, mounted read-only), the dashboard on the head's loopback (reached through `ray
    dashboard`'s SSH tunnel), no cloud keys in the config."""
    config, text = launcher_config(name), (CLUSTER / name).read_text()
    options = run_options(config)
    assert options["--env RAY_AUTH_MODE"] == "token"
    host_dir, container_dir, mode = options["--volume"].split(":")
    assert mode == "ro" and options["--env RAY_AUTH_TOKEN_PATH"].startswith(container_dir + "/")
    fetch = " ".join(config["initialization_commands"])
    token_file = options["--env RAY_AUTH_TOKEN_PATH"].rsplit("/", 1)[1]
    assert "umask 077" in fetch and f"> ~/.densenet-ray/{token_file}" in fetch and host_dir.endswith("/.densenet-ray")
    assert options["--env-file"].startswith(host_dir + "/")   # the MLflow user, also from the secret store
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert not re.search(r"(?i)aws_secret_access_key|aws_access_key_id|private_key", text)
    if config["provider"]["type"] == "aws":
        rules = config["provider"]["security_group"]["IpPermissions"]
        assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
        assert all(ip["CidrIp"] != "0.0.0.0/0" for r in rules for ip in r["IpRanges"])


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_nodes_image_and_tracking(name):
    """Head without GPUs or tasks, GPU workers scaling between min and max, the image docker/ builds,
    and a tracking server every node reaches (not a node's own loopback)."""
    config = launcher_config(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    gpu = next(t for n, t in types.items() if "gpu" in n)
    assert 0 < gpu["max_workers"] and gpu["min_workers"] < gpu["max_workers"]
    assert config["docker"]["image"] == f"{TRAINING_IMAGE}:{project()['version']}"
    tracking = urllib.parse.urlparse(run_options(config)["--env MLFLOW_TRACKING_URI"])
    assert tracking.scheme in ("http", "https") and tracking.hostname not in ("localhost", "127.0.0.1")


def train_commands(text: str) -> list[list[str]]:
    """The arguments of every `python -m densenet_ray.train` in `text` (shell comments and code blocks
    alike; backslash continuations joined)."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    out = []
    for line in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines():
        if "python -m densenet_ray.train" in line:
            words = shlex.split(line.split("python -m densenet_ray.train", 1)[1].split("`")[0], comments=True)
            out.append(words[:next((i for i, w in enumerate(words) if w in (";", "&&", "|")), len(words))])
    return out


DOCUMENTED = [(path.name, argv) for path in [CLUSTER / "README.md", *(CLUSTER / n for n in LAUNCHER_CONFIGS)]
              for argv in train_commands(path.read_text())]


def test_cluster_documents_training_commands():
    assert {name for name, _ in DOCUMENTED} == {"README.md", *LAUNCHER_CONFIGS}


@pytest.mark.parametrize("name,argv", DOCUMENTED, ids=[f"{n}:{i}" for i, (n, _) in enumerate(DOCUMENTED)])
def test_documented_training_command_is_valid(name, argv):
    """Each documented command parses with the training CLI (flags and values as it checks them), and
    on a cluster keeps data and checkpoints in shared storage."""
    cfg = C.from_args(argv)
    provider = name.removesuffix(".yaml")
    if provider in STORAGE:
        assert urllib.parse.urlparse(cfg.data).scheme == urllib.parse.urlparse(cfg.storage).scheme == STORAGE[provider]
