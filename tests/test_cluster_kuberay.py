"""cluster/kuberay/: every RayCluster and RayJob against KubeRay's own CRD schemas (../shared/schemas),
and what the manifests promise: token authentication, nothing reachable from outside the cluster or
from pods that have no business there, non-root pods, the images docker/ builds, a training job that
parses and fits the cluster it asks for, Secrets only as placeholders.

    .venv/bin/python -m pytest tests/test_cluster_kuberay.py     # seconds, no Kubernetes needed
"""

import copy
import functools
import re
import shlex
import urllib.parse

import jsonschema
import pytest
import yaml
from cluster_files import (KUBERAY, TRAINING_IMAGE, documents, kuberay_documents, of_kind, pins, pod_templates,
                           project, ray_cluster_specs, ray_pod_templates, shared)

from densenet_ray import config as C

NAMESPACE = "densenet-ray"
CRDS = {"RayCluster": "kuberay/ray.io_rayclusters.yaml", "RayJob": "kuberay/ray.io_rayjobs.yaml"}


# --- KubeRay's CRD schemas --------------------------------------------------------------------------

def as_json_schema(node):
    """A CRD's OpenAPI v3 schema as JSON Schema that judges like `kubectl apply` (strict field
    validation, its default): an unknown field is an error unless x-kubernetes-preserve-unknown-fields;
    x-kubernetes-int-or-string takes an integer or a string; nullable takes null. CEL rules
    (x-kubernetes-validations) are the API server's to run and are left out."""
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    for key in ("properties", "patternProperties"):
        if key in node:
            out[key] = {name: as_json_schema(sub) for name, sub in node[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            out[key] = as_json_schema(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [as_json_schema(sub) for sub in node[key]]
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str, version: str = "v1") -> jsonschema.Draft7Validator:
    crd = yaml.load(shared(CRDS[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    served = {v["name"]: v for v in crd["spec"]["versions"] if v["served"]}
    assert version in served, f"{CRDS[kind]} serves {sorted(served)}, not {version}"
    return jsonschema.Draft7Validator(as_json_schema(served[version]["schema"]["openAPIV3Schema"]))


def crd_errors(doc: dict) -> list[str]:
    group, version = doc["apiVersion"].split("/")
    assert group == "ray.io", doc["apiVersion"]
    errors = crd_validator(doc["kind"], version).iter_errors({k: v for k, v in doc.items() if k != "status"})
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message[:300]}" for e in errors]


KUBERAY_OBJECTS = [(name, d) for name, d in kuberay_documents() if d["kind"] in CRDS]


def test_there_is_a_raycluster_and_a_rayjob():
    assert sorted({d["kind"] for _, d in KUBERAY_OBJECTS}) == ["RayCluster", "RayJob"]


@pytest.mark.parametrize("name,doc", KUBERAY_OBJECTS, ids=[f"{n}:{d['kind']}/{d['metadata']['name']}"
                                                           for n, d in KUBERAY_OBJECTS])
def test_manifest_is_valid_against_the_kuberay_crd(name, doc):
    assert not crd_errors(doc), f"cluster/kuberay/{name}: " + "\n".join(crd_errors(doc))


def _raycluster() -> dict:
    return copy.deepcopy(of_kind("RayCluster")[0])


def _set(doc: dict, path: str, value) -> dict:
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for p in parents:
        node = node[p]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()


@pytest.mark.parametrize("path,value,valid", [
    ("spec.headGroupSpec.rayStartParms", {}, False),                     # misspelt field
    ("spec.workerGroupSpecs.0.maxReplicas", "eight", False),              # wrong type
    ("spec.headGroupSpec", _DELETE, False),                               # required
    ("spec.authOptions.mode", "password", False),                         # not in the enum
    ("spec.headGroupSpec.template.spec.containers.0.imagePullPolicy", 3, False),
    ("spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.cpu", 8, True),  # int-or-string
    ("spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.cpu", "7500m", True),
])
def test_the_schema_check_tells_mistakes_from_valid_changes(path, value, valid):
    """The adapter really judges: what kubectl would refuse is refused, what it takes is taken."""
    errors = crd_errors(_set(_raycluster(), path, value))
    assert (not errors) == valid, errors


# --- security ---------------------------------------------------------------------------------------

def secret_keys() -> dict[str, set[str]]:
    """Secret name -> its keys, from the template (the only place the Secrets are described)."""
    return {d["metadata"]["name"]: set(d["stringData"]) for d in documents(KUBERAY / "secrets.template.yaml")}


@pytest.mark.parametrize("where,spec", ray_cluster_specs(), ids=[w for w, _ in ray_cluster_specs()])
def test_ray_token_authentication_is_on_with_the_token_from_a_secret(where, spec):
    assert spec["authOptions"]["mode"] == "token", where
    assert "auth_token" in secret_keys()[spec["authOptions"]["secretName"]], where  # the key KubeRay reads


def test_secrets_are_templates_with_placeholders_only():
    template = documents(KUBERAY / "secrets.template.yaml")
    assert {d["kind"] for d in template} == {"Secret"}
    for d in template:
        for key, value in d["stringData"].items():
            assert key == "username" or value.startswith("REPLACE_WITH_"), f"{d['metadata']['name']}.{key}: {value}"
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    assert "secrets.template.yaml" not in kustomization["resources"]
    others = [d for name, d in kuberay_documents() if name != "secrets.template.yaml"]
    assert not [d for d in others if d["kind"] == "Secret"], "real Secrets are created by hand, never committed"


def containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec["containers"] + spec.get("initContainers", [])


def test_every_secret_reference_exists_and_no_credential_is_inline():
    keys = secret_keys()
    for where, template in pod_templates():
        for c in containers(template):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in keys.get(ref["name"], ()), f"{where} {env['name']}: no {ref}"
                elif re.search("PASSWORD|TOKEN|SECRET", env["name"]) and env["name"] != "MLFLOW_TRACKING_USERNAME":
                    pytest.fail(f"{where}: {env['name']} has an inline value; take it from a Secret")


def test_nothing_is_exposed_outside_the_cluster():
    for name, d in kuberay_documents():
        assert d["kind"] not in ("Ingress", "Route", "Gateway", "HTTPRoute"), f"{name}: {d['kind']}"
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", f"{name}: Service {d['metadata']['name']}"
    for where, spec in ray_cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType") == "ClusterIP" and not head.get("enableIngress"), where
    for where, template in pod_templates():
        assert not template["spec"].get("hostNetwork"), where
        assert not [p for c in containers(template) for p in c.get("ports", []) if "hostPort" in p], where


@pytest.mark.parametrize("where,template", pod_templates(), ids=[w for w, _ in pod_templates()])
def test_pods_run_as_non_root_without_privileges(where, template):
    pod = template["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True and pod.get("runAsUser", 0) > 0, where
    assert pod["seccompProfile"]["type"] == "RuntimeDefault", where
    for c in containers(template):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], f"{where} {c['name']}"
    for where, spec in ray_cluster_specs():  # the autoscaler sidecar KubeRay adds to the head
        sc = spec["autoscalerOptions"]["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], where


def test_ray_pods_run_as_the_user_the_image_has():
    """docker/Dockerfile's numeric USER is every Ray pod's runAsUser/runAsGroup (Kubernetes checks
    runAsNonRoot against numbers, and the image's Python belongs to that user)."""
    user = re.search(r"^USER (\d+):(\d+)$", (KUBERAY.parents[1] / "docker" / "Dockerfile").read_text(), re.M)
    for where, group, template in ray_pod_templates():
        pod = template["spec"]["securityContext"]
        assert (str(pod["runAsUser"]), str(pod["runAsGroup"])) == user.groups(), f"{where} {group}"


def mlflow_server() -> tuple[dict, dict, str]:
    """(Deployment, its container, the shell script the container runs)."""
    deployment = next(d for d in of_kind("Deployment") if d["metadata"]["name"] == "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-ec"]
    return deployment, container, container["args"][0]


def allowed_hosts(script: str) -> list[str]:
    return re.search(r'--allowed-hosts "([^"]+)"', script).group(1).split(",")


def test_mlflow_requires_a_user_checks_hosts_and_takes_its_admin_password_from_a_secret():
    _, container, script = mlflow_server()
    assert "--app-name basic-auth" in script
    assert "*" not in ",".join(allowed_hosts(script))
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-server",
                                                                              "key": "admin-password"}
    assert "REPLACE" in script and "exit 1" in script  # refuses the template's placeholder (run in test_cluster_mlflow)


def service(name: str) -> dict:
    return next(d for d in of_kind("Service") if d["metadata"]["name"] == name)


@pytest.mark.parametrize("where,group,template", ray_pod_templates(), ids=[f"{w} {g}" for w, g, _ in ray_pod_templates()])
def test_ray_pods_track_to_the_mlflow_service_as_a_user(where, group, template):
    env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
    uri = urllib.parse.urlparse(env["MLFLOW_TRACKING_URI"]["value"])
    svc = service("mlflow")
    assert uri.hostname == svc["metadata"]["name"] and uri.port == svc["spec"]["ports"][0]["port"]
    assert uri.netloc in allowed_hosts(mlflow_server()[2]), "the server would answer 403 to the workers"
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-trainer"


def test_every_service_selects_pods_and_mlflow_finds_its_database():
    pods = [t["metadata"]["labels"] for kind in ("Deployment", "StatefulSet") for d in of_kind(kind)
            for t in [d["spec"]["template"]]]
    for kind in ("Deployment", "StatefulSet"):
        for d in of_kind(kind):
            assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    for svc in of_kind("Service"):
        assert any(svc["spec"]["selector"].items() <= labels.items() for labels in pods), svc["metadata"]["name"]
    _, container, _ = mlflow_server()
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    postgres = service("mlflow-postgres")
    init = next(d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "mlflow-postgres-init")
    for name, database in (("MLFLOW_BACKEND_STORE_URI", "mlflow"), ("MLFLOW_AUTH_DATABASE_URI", "mlflow_auth")):
        uri = urllib.parse.urlparse(env[name].replace("$(POSTGRES_PASSWORD)", "pw"))
        assert (uri.hostname, uri.port, uri.path) == (postgres["metadata"]["name"], postgres["spec"]["ports"][0]["port"],
                                                      f"/{database}")
    assert "CREATE DATABASE mlflow_auth" in "".join(init["data"].values())
    assert urllib.parse.urlparse(env["MLFLOW_ARTIFACTS_DESTINATION"]).scheme in ("s3", "gs")


# --- network policies: who reaches whom -------------------------------------------------------------

KUBERAY_LABELS = {"head": {"ray.io/is-ray-node": "yes", "ray.io/node-type": "head"},
                  "worker": {"ray.io/is-ray-node": "yes", "ray.io/node-type": "worker"}}


def pod(kind_or_group: str) -> tuple[str, dict]:
    """(namespace, labels) of a pod as it runs, KubeRay's labels included."""
    if kind_or_group in ("ray-head", "ray-worker"):
        _, group, template = next(p for p in ray_pod_templates() if (p[1] == "head") == (kind_or_group == "ray-head"))
        return NAMESPACE, {**template["metadata"]["labels"], **KUBERAY_LABELS[kind_or_group[4:]],
                           "ray.io/cluster": "densenet-ray"}
    named = {"mlflow": ("Deployment", "mlflow"), "postgres": ("StatefulSet", "mlflow-postgres")}
    if kind_or_group in named:
        kind, name = named[kind_or_group]
        return NAMESPACE, next(d for d in of_kind(kind) if d["metadata"]["name"] == name)["spec"]["template"][
            "metadata"]["labels"]
    return {"operator": ("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"}),
            "stranger": (NAMESPACE, {"app": "notebook"}),
            "outsider": ("default", {"app": "anything"})}[kind_or_group]


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "matchExpressions: extend this test's evaluator"
    return selector.get("matchLabels", {}).items() <= labels.items()


def reachable(source: str, destination: str, port: int) -> bool:
    """Whether NetworkPolicies let `source` open `destination`:`port` (ingress rules; as a CNI would)."""
    src_ns, src_labels = pod(source)
    dst_ns, dst_labels = pod(destination)
    policies = [p["spec"] for p in of_kind("NetworkPolicy")
                if dst_ns == NAMESPACE and "Ingress" in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], dst_labels)]
    if not policies:
        return True

    def peer_matches(peer: dict) -> bool:
        if "namespaceSelector" in peer:
            ns_ok = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": src_ns})
        else:
            ns_ok = src_ns == NAMESPACE
        return ns_ok and selects(peer.get("podSelector", {}), src_labels)

    return any((not rule.get("from") or any(peer_matches(p) for p in rule["from"]))
               and (not rule.get("ports") or any(p["port"] == port for p in rule["ports"]))
               for policy in policies for rule in policy.get("ingress", []))


@pytest.mark.parametrize("source,destination,port,allowed", [
    ("ray-worker", "ray-head", 6379, True),      # GCS
    ("ray-worker", "ray-head", 8265, True),
    ("ray-head", "ray-worker", 10002, True),     # workers, object manager: any port
    ("ray-worker", "mlflow", 5000, True),        # rank 0 logs runs and uploads the model
    ("mlflow", "postgres", 5432, True),
    ("operator", "ray-head", 8265, True),        # the operator follows RayJobs
    ("operator", "ray-head", 6379, False),
    ("operator", "mlflow", 5000, False),
    ("stranger", "ray-head", 8265, False),       # any other pod, even in the namespace
    ("stranger", "ray-head", 10001, False),
    ("stranger", "mlflow", 5000, False),
    ("outsider", "ray-head", 8265, False),
    ("ray-worker", "postgres", 5432, False),     # the database takes the server only
])
def test_network_policies(source, destination, port, allowed):
    assert reachable(source, destination, port) == allowed


# --- the images and the job -------------------------------------------------------------------------

def test_images_are_the_ones_docker_builds():
    version, pinned = project()["version"], pins()
    for where, group, template in ray_pod_templates():
        for c in template["spec"]["containers"]:
            assert c["image"] == f"{TRAINING_IMAGE}:{version}", f"{where} {group}"
    for where, spec in ray_cluster_specs():
        assert spec["rayVersion"] == pinned["ray"], where
    _, container, _ = mlflow_server()
    assert container["image"] == f"{TRAINING_IMAGE}-mlflow:{pinned['mlflow']}"


def cluster_capacity(spec: dict, which: str) -> dict[str, float]:
    """CPUs and GPUs Ray sees with every worker group at its min or max replicas."""
    def node(group: dict) -> dict[str, float]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        params = group.get("rayStartParams", {})
        cpu = str(params.get("num-cpus", limits["cpu"]))
        return {"CPU": float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu),
                "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}

    total = node(spec["headGroupSpec"])
    for group in spec.get("workerGroupSpecs", []):
        n = group["minReplicas" if which == "min" else "maxReplicas"]
        total = {k: total[k] + n * node(group)[k] for k in total}
    return total


@pytest.mark.parametrize("job", of_kind("RayJob"), ids=lambda j: j["metadata"]["name"])
def test_the_job_parses_and_fits_its_cluster(job):
    """The entrypoint is a valid training command (the CLI's own parser), keeps data and checkpoints on
    object storage, and passes the driver's pre-flight on its cluster at minimum size (KubeRay submits
    once the minimum workers have joined): GPUs for every worker, a CPU to spare for Ray Data."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "densenet_ray.train"], argv
    cfg = C.from_args(argv[3:])
    assert cfg.preset == "imagenet" and cfg.gpus_per_worker > 0
    for uri in (cfg.data, cfg.storage):
        assert urllib.parse.urlparse(uri).scheme in ("s3", "gs"), f"{uri}: shared object storage, not a node's disk"
    low = cluster_capacity(job["spec"]["rayClusterSpec"], "min")
    assert low["GPU"] >= cfg.workers * cfg.gpus_per_worker, low
    assert low["CPU"] - cfg.workers * cfg.cpus_per_worker >= 1, low


def test_the_long_lived_cluster_autoscales_gpu_workers_and_runs_the_job_at_minimum_size():
    """RayCluster: GPU workers between min and max replicas, a CPU group for decoding, a head without
    GPUs; the RayJob's command submitted to it passes the driver's pre-flight before any scale-up."""
    spec = of_kind("RayCluster")[0]["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert spec["enableInTreeAutoscaling"] is True
    assert groups["gpu"]["minReplicas"] < groups["gpu"]["maxReplicas"]
    assert "nvidia.com/gpu" in groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert cluster_capacity({"headGroupSpec": spec["headGroupSpec"]}, "min")["GPU"] == 0
    cfg = C.from_args(shlex.split(of_kind("RayJob")[0]["spec"]["entrypoint"])[3:])
    low, high = cluster_capacity(spec, "min"), cluster_capacity(spec, "max")
    assert low["CPU"] - cfg.workers * cfg.cpus_per_worker >= 1 and high["GPU"] >= cfg.workers * cfg.gpus_per_worker
