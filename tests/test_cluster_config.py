"""cluster.yaml: Ray's own launcher validation (schema + checks), then what Tessera needs from the cluster.

No cloud calls: ``prepare_config`` merges Ray's AWS defaults and ``validate_config`` checks the result
against ``ray/autoscaler/ray-schema.json``, the steps ``ray up`` runs before it talks to AWS.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
VENV_BIN = "~/tessera-venv/bin/"  # where setup_commands install the project and its Ray


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validate(config: dict) -> dict:
    """What ``ray up`` does with the file before any cloud call; raises on an invalid config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def pinned_versions() -> dict[str, str]:
    """``name -> version`` for every ``name[extras]==version`` dependency of pyproject.toml."""
    pins = {}
    for dep in pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^;\s]+)", dep.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def node_types(config: dict) -> dict[str, dict]:
    return config["available_node_types"]


def worker_types(config: dict) -> dict[str, dict]:
    return {k: v for k, v in node_types(config).items() if k != config["head_node_type"]}


def effective_setup(prepared: dict, name: str) -> list[str]:
    """Setup commands a node of this type runs (after prepare_config merged setup_commands in)."""
    if name == prepared["head_node_type"]:
        return prepared["head_setup_commands"]
    return node_types(prepared)[name].get("worker_setup_commands", prepared["worker_setup_commands"])


def start_commands(config: dict) -> list[str]:
    return config["head_start_ray_commands"] + config["worker_start_ray_commands"]


def ray_start_commands(config: dict) -> list[str]:
    return [c for c in start_commands(config) if "ray start" in c]


# --- Ray's validation --------------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_launcher_validation():
    prepared = ray_validate(load_cluster())
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in node_types(prepared)


def _unknown_node_type_key(c):
    node_types(c)["gpu_worker"]["min_worker"] = 1  # typo of min_workers


def _gpu_count_as_string(c):
    node_types(c)["gpu_worker"]["resources"]["GPU"] = "1"


def _head_type_missing(c):
    c["head_node_type"] = "no_such_type"


def _min_workers_over_global_max(c):
    node_types(c)["cpu_worker"]["min_workers"] = c["max_workers"] + 1


def _unknown_top_level_key(c):
    c["setup_command"] = ["echo typo"]


@pytest.mark.parametrize("breakage", [_unknown_node_type_key, _gpu_count_as_string, _head_type_missing,
                                      _min_workers_over_global_max, _unknown_top_level_key])
def test_rays_validation_rejects_a_broken_copy(breakage):
    config = load_cluster()
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(config)


# --- What Tessera needs --------------------------------------------------------------------------------


def test_head_cpu_and_gpu_worker_types_with_sane_bounds():
    config = load_cluster()
    types = node_types(config)
    head = types[config["head_node_type"]]
    assert head.get("max_workers", 0) == 0, "the head type is the head, not a worker group"

    workers = worker_types(config)
    gpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    cpu = {k: v for k, v in workers.items() if not v["resources"].get("GPU") and v["resources"].get("CPU", 0) > 0}
    assert gpu, "no worker type declares a GPU resource (the encoder pools ask for num_gpus)"
    assert cpu, "no CPU-only worker type (decode stages, index builds, Serve)"
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"], \
        "per-type max_workers add up past the global max_workers: some could never start"
    for name, t in gpu.items():
        # AWS GPU families are g* / p*; an m6i with resources {GPU: 1} would make Ray schedule onto no GPU.
        assert re.match(r"^[gp]\d", t["node_config"]["InstanceType"]), name


def test_every_node_installs_this_repo_with_python_311():
    config = load_cluster()
    prepared = ray_validate(config)
    assert config["file_mounts"].get("~/tessera") == ".", "the working tree must be mounted at ~/tessera"
    requires = pyproject()["project"]["requires-python"]
    assert ">=3.11" in requires and "<3.12" in requires
    for name in node_types(prepared):
        setup = "\n".join(effective_setup(prepared, name))
        assert "python3.11 -m venv ~/tessera-venv" in setup, name
        assert re.search(r"tessera-venv/bin/python -m pip install .*-e ~/tessera(\s|$)", setup), name


def test_commands_pin_nothing_that_disagrees_with_pyproject():
    pins = pinned_versions()
    assert pins["ray"] == ray.__version__, "the laptop's Ray runs `ray up`; it must match the cluster's"
    config = load_cluster()
    commands = config["setup_commands"] + start_commands(config)
    for cmd in commands:
        for name, version in re.findall(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9][^\s'\"]*)", cmd):
            assert pins.get(name.lower()) == version, f"{cmd!r} pins {name}=={version}; pyproject says {pins.get(name)}"


def test_ray_starts_from_the_project_venv_with_token_auth_and_a_region():
    config = load_cluster()
    starts = ray_start_commands(config)
    assert len(starts) == 2
    for cmd in starts:
        assert f"{VENV_BIN}ray start" in cmd, cmd
        assert "RAY_AUTH_MODE=token" in cmd, cmd
        assert re.search(r"AWS_REGION=[a-z]{2}-[a-z]+-\d", cmd), cmd
        assert "AWS_ENDPOINT_URL" not in cmd and "127.0.0.1" not in cmd, "embedded-stack settings on a cluster"
    assert "--num-cpus=0" in config["head_start_ray_commands"][-1]
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_nodes_get_s3_access_from_an_instance_profile():
    for name, t in node_types(load_cluster()).items():
        assert t["node_config"].get("IamInstanceProfile"), f"{name}: no IamInstanceProfile"


SECRET_PATTERNS = [
    re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),  # AWS access key id
    re.compile(r"aws_secret_access_key|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN", re.I),
    # secret-key shaped: a 40-character base64 run with upper, lower case and digits (paths rarely are)
    re.compile(r"(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]*[A-Z])(?=[A-Za-z0-9/+]*[a-z])(?=[A-Za-z0-9/+]*[0-9])"
               r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
    re.compile(r"RAY_AUTH_TOKEN\s*="),  # a Ray token given by value
]


def secrets_in(text: str) -> list[str]:
    return [m.group(0) for p in SECRET_PATTERNS for m in p.finditer(text)]


def test_no_credentials_in_cluster_yaml():
    assert secrets_in(CLUSTER_YAML.read_text()) == []


def test_secret_scan_catches_keys():
    key_id = "AKIA" + "IOSFODNN7" + "EXAMPLE"  # AWS's documentation example, assembled so no scanner trips here
    secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    leaked = CLUSTER_YAML.read_text() + f"\n# AWS_ACCESS_KEY_ID={key_id}\n# export X={secret}\n"
    found = secrets_in(leaked)
    assert key_id in found and secret in found
