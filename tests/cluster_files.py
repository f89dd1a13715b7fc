"""What tests/test_cluster_*.py and tests/test_docker.py read: cluster/ and docker/ of this repository,
and the schemas in ../shared/schemas next to it (the KubeRay CRDs; see that folder's README.md).

    from cluster_files import kuberay_documents, ray_cluster_specs, pins
"""

import functools
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
DOCKER = REPO / "docker"
SCHEMAS = REPO.parent / "shared" / "schemas"
LAUNCHER_CONFIGS = ("aws.yaml", "gcp.yaml")
TRAINING_IMAGE = "registry.example.com/densenet-ray"   # the placeholder cluster/README.md tells to replace


def shared(relative: str) -> Path:
    """A file of ../shared/schemas; a clear failure, not a skip, when CI's checkout lacks it."""
    path = SCHEMAS / relative
    if not path.is_file():
        pytest.fail(f"{path} is missing: the tests validate cluster/ against the schemas in ../shared/schemas, "
                    f"the folder next to this repository ({REPO.name}/); see its README.md", pytrace=False)
    return path


@functools.cache
def documents(path: Path) -> tuple[dict, ...]:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def kuberay_documents() -> list[tuple[str, dict]]:
    """(file name, document) of every Kubernetes object under cluster/kuberay/."""
    return [(p.name, d) for p in sorted(KUBERAY.glob("*.yaml")) if p.name != "kustomization.yaml"
            for d in documents(p)]


def of_kind(kind: str, *, templates: bool = True) -> list[dict]:
    return [d for name, d in kuberay_documents() if d["kind"] == kind and (templates or "template" not in name)]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """Every Ray cluster KubeRay would create: RayCluster specs and RayJob rayClusterSpecs."""
    return ([(f"RayCluster/{d['metadata']['name']}", d["spec"]) for d in of_kind("RayCluster")]
            + [(f"RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in of_kind("RayJob")])


def ray_pod_templates() -> list[tuple[str, str, dict]]:
    """(where, "head"/group name, pod template) of every Ray node."""
    out = []
    for where, spec in ray_cluster_specs():
        out.append((where, "head", spec["headGroupSpec"]["template"]))
        out += [(where, g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return out


def pod_templates() -> list[tuple[str, dict]]:
    """(where, pod template) of every pod the manifests make, Ray nodes included."""
    out = [(f"{where} {group}", t) for where, group, t in ray_pod_templates()]
    out += [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"])
            for kind in ("Deployment", "StatefulSet") for d in of_kind(kind)]
    return out


def pins() -> dict[str, str]:
    """docker/constraints.txt: package name -> pinned version."""
    out = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[name.strip().lower()] = version.strip()
    return out


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def launcher_config(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())
