"""deploy/k8s (a kustomize base) and deploy/grafana/sluice.json, checked statically: no cluster
runs here. Core objects are validated against Kubernetes' own schemas (kubernetes-validate,
strict: an unknown or misspelt field fails); KEDA's objects against the shape KEDA documents."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

import api.metrics
import worker.metrics
from shared.protocol import WORKERS_KEY, queue_name
from shared.settings import Settings, bundled_model_path
from tests.heartbeats import CASE_IDS, CASES, Beats
from tests.prereqs import require
from tests.procs import RedisServer, Stack, free_port

ROOT = Path(__file__).parents[1]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
TRY_OUT = K8S / "overlays" / "try-out"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
PROBE_SCRIPT = BASE / "worker_alive.py"
DASHBOARD = ROOT / "deploy" / "grafana" / "sluice.json"

K8S_VERSIONS = ("1.27", kubernetes_validate.latest_version())
"""The oldest Kubernetes the manifests claim (PDB unhealthyPodEvictionPolicy is on by default
from 1.27), and the newest whose schemas kubernetes-validate ships."""
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "components", "configMapGenerator"}
"""What `kustomization()` below understands; a kustomization using more fails the tests."""
META = {"labels", "annotations"}
"""The options of a generator that go into its objects' metadata."""
SECRET_ENV = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|REDIS_URL", re.I)
API_ROLE, WORKER_ROLE = "api", "worker"
UVICORN_EXTRA_GRACE_S = 5
"""sluice.py gives uvicorn `timeout_graceful_shutdown = SLUICE_SHUTDOWN_GRACE_S + 5`."""


# --- Rendering ----------------------------------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization(directory: Path, files: set[Path] | None = None) -> list[dict[str, Any]]:
    """What `kustomize build directory` makes, for the fields these kustomizations use, except
    the hash suffix of generated names. `files` collects every manifest file it reads."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(spec) <= KUSTOMIZE_FIELDS, f"{directory}: {set(spec) - KUSTOMIZE_FIELDS}"
    objects: list[dict[str, Any]] = []
    for entry in [*spec.get("resources", []), *spec.get("components", [])]:
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += kustomization(path, files)
        else:
            objects += documents(path)
            if files is not None:
                files.add(path)
    for generator in spec.get("configMapGenerator", []):
        options = generator.get("options", {})
        metadata = {"name": generator["name"], **{k: options[k] for k in options.keys() & META}}
        data = {Path(f).name: (directory / f).read_text() for f in generator["files"]}
        objects.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
        )
    return objects


def kubectl_kustomize(directory: Path) -> list[dict[str, Any]]:
    kustomize = [require("kubectl"), "kustomize", str(directory)]
    out = subprocess.run(kustomize, capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return kustomization(BASE)


@pytest.fixture(scope="module")
def secret() -> dict[str, Any]:
    (doc,) = documents(SECRET_EXAMPLE)
    return doc


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def deployment(objects: list[dict[str, Any]], role: str) -> dict[str, Any]:
    (found,) = [
        o
        for o in objects
        if o["kind"] == "Deployment"
        and o["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == role
    ]
    return found


def container(deploy: dict[str, Any]) -> dict[str, Any]:
    only: dict[str, Any]
    (only,) = deploy["spec"]["template"]["spec"]["containers"]
    return only


def env(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def setting(c: dict[str, Any], field: str) -> float:
    """A numeric setting as the container runs it: its env value, or the default."""
    given = env(c).get("SLUICE_" + field.upper(), {})
    return float(given.get("value", Settings.model_fields[field].default))


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in c["ports"] if p.get("name") == port]
    return int(number)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def pod_labels(deploy: dict[str, Any]) -> dict[str, str]:
    return dict(deploy["spec"]["template"]["metadata"]["labels"])


# --- Schemas ------------------------------------------------------------------------------------

MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def test_there_are_manifests_to_check() -> None:
    assert {"api.yaml", "worker.yaml", "worker-keda.yaml"} <= {p.name for p in MANIFESTS}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_is_valid_for_kubernetes_strictly(path: Path, version: str) -> None:
    for doc in documents(path):
        if doc["kind"] not in KEDA_KINDS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("directory", [BASE, TRY_OUT], ids=["base", "try-out"])
def test_every_rendered_object_is_valid_for_kubernetes_strictly(
    directory: Path, version: str
) -> None:
    for doc in kustomization(directory):
        if doc["kind"] not in KEDA_KINDS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_every_manifest_but_the_secret_example_is_in_a_kustomization() -> None:
    read: set[Path] = set()
    kustomization(TRY_OUT, read)  # the base and the try-out Redis
    assert read == {p.resolve() for p in MANIFESTS} - {SECRET_EXAMPLE.resolve()}


def test_no_kustomization_applies_a_secret() -> None:
    """Placeholder passwords are never applied: the Secret is the operator's to create."""
    assert [o for o in kustomization(TRY_OUT) if o["kind"] == "Secret"] == []


@pytest.mark.parametrize("directory", [BASE, TRY_OUT], ids=["base", "try-out"])
def test_kustomize_renders_what_the_checks_read(directory: Path) -> None:
    rendered = kubectl_kustomize(directory)
    probes = one(rendered, "ConfigMap")["metadata"]["name"]
    assert re.fullmatch(r"sluice-worker-probes-[a-z0-9]{10}", probes)

    def unhashed(o: dict[str, Any]) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"].removesuffix(probes[-11:])

    assert sorted(map(unhashed, rendered)) == sorted(map(unhashed, kustomization(directory)))
    for doc in rendered:
        if doc["kind"] not in KEDA_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    volumes = deployment(rendered, WORKER_ROLE)["spec"]["template"]["spec"]["volumes"]
    assert probes in [v.get("configMap", {}).get("name") for v in volumes]


# --- The API ------------------------------------------------------------------------------------


def test_api_probes_ask_ready_and_health_on_the_api_port(base: list[dict[str, Any]]) -> None:
    api = container(deployment(base, API_ROLE))
    port = int(setting(api, "port"))
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        get = api[probe]["httpGet"]
        assert get["path"] == path
        assert port_number(api, get["port"]) == port


def prestop_seconds(c: dict[str, Any]) -> float:
    pre_stop = c.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


def test_api_grace_outlasts_prestop_and_the_graceful_shutdown(base: list[dict[str, Any]]) -> None:
    api = deployment(base, API_ROLE)
    c = container(api)
    needed = prestop_seconds(c) + setting(c, "shutdown_grace_s") + UVICORN_EXTRA_GRACE_S
    assert api["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > needed


def test_api_has_a_cpu_request_for_the_hpa(base: list[dict[str, Any]]) -> None:
    assert container(deployment(base, API_ROLE))["resources"]["requests"]["cpu"]


def test_hpa_scales_the_api_deployment_on_cpu(base: list[dict[str, Any]]) -> None:
    hpa = one(base, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert target["name"] == deployment(base, API_ROLE)["metadata"]["name"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]


def test_service_selects_the_api_pods_only_on_the_api_port(base: list[dict[str, Any]]) -> None:
    service = one(base, "Service")
    selector = service["spec"]["selector"]
    assert selects(selector, pod_labels(deployment(base, API_ROLE)))
    assert not selects(selector, pod_labels(deployment(base, WORKER_ROLE)))
    api = container(deployment(base, API_ROLE))
    (port,) = service["spec"]["ports"]
    assert port_number(api, port["targetPort"]) == int(setting(api, "port"))


# --- The worker ---------------------------------------------------------------------------------


def test_worker_grace_outlasts_the_drain(base: list[dict[str, Any]]) -> None:
    w = deployment(base, WORKER_ROLE)
    grace = w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= setting(container(w), "drain_s") + 10  # + writing the ends, leaving Redis


def test_worker_threads_are_its_whole_cpu_limit(base: list[dict[str, Any]]) -> None:
    c = container(deployment(base, WORKER_ROLE))
    ref = env(c)["SLUICE_N_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert ref["resource"] == "limits.cpu"
    assert ref.get("containerName", c["name"]) == c["name"]
    assert str(ref.get("divisor", "1")) == "1"
    limit = str(c["resources"]["limits"]["cpu"])
    assert limit.isdigit(), "a fractional limit would round the threads up, past the limit"
    assert str(c["resources"]["requests"]["cpu"]) == limit


def probe_command(c: dict[str, Any], probe: str) -> list[str]:
    command: list[str] = c[probe]["exec"]["command"]
    return command


def test_worker_probes_run_the_probe_script_from_its_configmap(
    base: list[dict[str, Any]],
) -> None:
    w = deployment(base, WORKER_ROLE)
    c = container(w)
    generated = one(base, "ConfigMap", "sluice-worker-probes")
    assert PROBE_SCRIPT.name in generated["data"]
    (volume,) = [
        v
        for v in w["spec"]["template"]["spec"]["volumes"]
        if v.get("configMap", {}).get("name") == "sluice-worker-probes"
    ]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
    script = f"{mount['mountPath']}/{PROBE_SCRIPT.name}"
    assert probe_command(c, "startupProbe") == ["python", script]
    assert probe_command(c, "livenessProbe") == ["python", script, "--redis-down-ok"]


def test_worker_serves_metrics_where_prometheus_is_told_to_look(
    base: list[dict[str, Any]],
) -> None:
    for role, port_setting in ((WORKER_ROLE, "SLUICE_WORKER_METRICS_PORT"), (API_ROLE, None)):
        d = deployment(base, role)
        c = container(d)
        port = int(env(c)[port_setting]["value"]) if port_setting else int(setting(c, "port"))
        annotations = d["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/path"] == "/metrics"
        assert int(annotations["prometheus.io/port"]) == port
        assert port in [p["containerPort"] for p in c["ports"]]


# --- Both ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [API_ROLE, WORKER_ROLE])
def test_deployment_runs_its_sluice_role_from_the_compose_image(
    base: list[dict[str, Any]], role: str
) -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    c = container(deployment(base, role))
    assert c["image"] == compose[role]["image"]
    assert c["command"] == ["sluice", role]


@pytest.mark.parametrize("role", [API_ROLE, WORKER_ROLE])
def test_deployment_selects_its_own_pods(base: list[dict[str, Any]], role: str) -> None:
    d = deployment(base, role)
    assert selects(d["spec"]["selector"]["matchLabels"], pod_labels(d))


@pytest.mark.parametrize("role", [API_ROLE, WORKER_ROLE])
def test_autoscaled_deployment_leaves_replicas_to_its_autoscaler(
    base: list[dict[str, Any]], role: str
) -> None:
    """`kubectl apply` would reset the autoscaler's count on every deploy."""
    assert "replicas" not in deployment(base, role)["spec"]


@pytest.mark.parametrize("role", [API_ROLE, WORKER_ROLE])
def test_pdb_covers_its_role_only_and_autoscaling_keeps_one_pod_through_it(
    base: list[dict[str, Any]], role: str
) -> None:
    (pdb,) = [
        p
        for p in base
        if p["kind"] == "PodDisruptionBudget"
        and selects(p["spec"]["selector"]["matchLabels"], pod_labels(deployment(base, role)))
    ]
    other = WORKER_ROLE if role == API_ROLE else API_ROLE
    assert not selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(deployment(base, other)))
    minimum = (
        one(base, "HorizontalPodAutoscaler")["spec"]["minReplicas"]
        if role == API_ROLE
        else one(base, "ScaledObject")["spec"]["minReplicaCount"]
    )
    assert minimum > pdb["spec"]["maxUnavailable"]


def all_containers(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for o in objects:
        if o["kind"] == "Deployment":
            yield from o["spec"]["template"]["spec"]["containers"]


def test_every_sluice_variable_is_a_setting() -> None:
    names = {n for c in all_containers(kustomization(TRY_OUT)) for n in env(c) if "SLUICE_" in n}
    assert names
    assert {n.removeprefix("SLUICE_").lower() for n in names} <= set(Settings.model_fields)


def test_secrets_come_from_the_secret_and_its_keys_exist(
    secret: dict[str, Any],
) -> None:
    keys = set(secret["stringData"])
    referenced = 0
    for c in all_containers(kustomization(TRY_OUT)):
        for name, e in env(c).items():
            if SECRET_ENV.search(name) or name == "REDISCLI_AUTH":
                ref = e["valueFrom"]["secretKeyRef"]  # never a literal `value`
                assert ref["name"] == secret["metadata"]["name"], name
                assert ref["key"] in keys, name
                # Optional only where absent means "not used": Sentinel, which a Secret made
                # before sluice spoke to Sentinels does not name.
                assert ref.get("optional", False) == (ref["key"] in SENTINEL_KEYS.values()), name
                referenced += 1
    assert referenced >= 4  # the Redis URL twice, the API keys, Redis's password


SENTINEL_KEYS = {
    "SLUICE_REDIS_SENTINELS": "redis-sentinels",
    "SLUICE_REDIS_SENTINEL_MASTER": "redis-sentinel-master",
    "SLUICE_REDIS_SENTINEL_PASSWORD": "redis-sentinel-password",
}


@pytest.mark.parametrize("role", [API_ROLE, WORKER_ROLE])
def test_both_roles_take_the_sentinel_settings_from_the_secret_if_it_has_them(
    base: list[dict[str, Any]], secret: dict[str, Any], role: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Sentinel-managed Redis (README, Redis high availability) is a matter of the Secret:
    the API and the workers read the same keys, and an empty value is no setting."""
    variables = env(container(deployment(base, role)))
    for name, key in SENTINEL_KEYS.items():
        ref = variables[name]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"], ref.get("optional")) == ("sluice", key, True)
        assert secret["stringData"][key] == ""
        monkeypatch.setenv(name, "")
    settings = Settings()
    assert (settings.redis_sentinels, settings.redis_sentinel_master) == ("", "mymaster")
    assert settings.redis_sentinel_password is None


def test_the_example_secret_names_one_redis_for_sluice_and_keda(
    base: list[dict[str, Any]], secret: dict[str, Any]
) -> None:
    data = secret["stringData"]
    url = urlsplit(data["redis-url"])
    assert f"{url.hostname}:{url.port}" == data["redis-address"]
    assert url.password == data["redis-password"]
    (trigger,) = one(base, "ScaledObject")["spec"]["triggers"]
    assert url.path.lstrip("/") == trigger["metadata"].get("databaseIndex", "0")


# --- KEDA ---------------------------------------------------------------------------------------

_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"const": "apps/v1"},
                        "kind": {"const": "Deployment"},
                        "name": _NAME,
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "advanced": {"type": "object"},
                "fallback": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "metadata": _STRINGS,  # KEDA takes strings only: "8", not 8
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {
                                    "name": _NAME,
                                    "kind": {"enum": ["TriggerAuthentication"]},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
TRIGGER_AUTHENTICATION = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "spec": {
            "type": "object",
            "required": ["secretTargetRef"],
            "additionalProperties": False,
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["parameter", "name", "key"],
                        "additionalProperties": False,
                        "properties": {"parameter": {"type": "string"}, "name": _NAME, "key": {}},
                    },
                }
            },
        },
    },
}
REDIS_TRIGGER_METADATA = {
    "listName",
    "listLength",
    "activationListLength",
    "databaseIndex",
    "enableTLS",
    "unsafeSsl",
}
"""KEDA's `redis` scaler's metadata (docs: scalers/redis-lists), less what belongs in the
TriggerAuthentication (address, password) or in plain environment variables."""


def test_keda_objects_have_the_shape_keda_documents(base: list[dict[str, Any]]) -> None:
    jsonschema.validate(one(base, "ScaledObject"), SCALED_OBJECT)
    jsonschema.validate(one(base, "TriggerAuthentication"), TRIGGER_AUTHENTICATION)


def test_scaled_object_scales_the_worker_deployment(base: list[dict[str, Any]]) -> None:
    spec = one(base, "ScaledObject")["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment(base, WORKER_ROLE)["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]


def test_scaled_object_counts_the_queue_one_worker_per_max_jobs(
    base: list[dict[str, Any]],
) -> None:
    """The worker's model's queue holds waiting and running jobs; a worker runs
    SLUICE_WORKER_MAX_JOBS."""
    (trigger,) = one(base, "ScaledObject")["spec"]["triggers"]
    assert trigger["type"] == "redis"
    assert trigger.get("metricType", "AverageValue") == "AverageValue"
    metadata = trigger["metadata"]
    assert set(metadata) <= REDIS_TRIGGER_METADATA
    worker_env = env(container(deployment(base, WORKER_ROLE)))
    assert metadata["listName"] == queue_name(worker_env["SLUICE_SERVED_MODEL_NAME"]["value"])
    max_jobs = worker_env["SLUICE_WORKER_MAX_JOBS"]["value"]
    assert metadata["listLength"] == max_jobs


def test_worker_serves_the_bundled_model_under_its_own_name(base: list[dict[str, Any]]) -> None:
    """The name is spelt out (for KEDA's listName); it must stay the one the image's GGUF has."""
    bundled = bundled_model_path()
    assert bundled is not None
    served = env(container(deployment(base, WORKER_ROLE)))["SLUICE_SERVED_MODEL_NAME"]["value"]
    assert served == bundled.stem


def test_scaled_object_authenticates_from_the_secret(
    base: list[dict[str, Any]], secret: dict[str, Any]
) -> None:
    (trigger,) = one(base, "ScaledObject")["spec"]["triggers"]
    auth = one(base, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert {"address", "password"} <= set(refs)
    for ref in refs.values():
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]


# --- The worker's probe, run --------------------------------------------------------------------


def run_probe(redis_url: str, *args: str, offset: str | None = None) -> int:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    environment |= {
        "SLUICE_REDIS_URL": redis_url,
        "SLUICE_BACKEND": "synthetic",
        "PYTHONPATH": str(ROOT),
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    command = [sys.executable, str(PROBE_SCRIPT), *args]
    if offset is not None:
        command = [require("faketime"), "-f", offset, *command]
    return subprocess.run(command, env=environment, timeout=30, check=False).returncode


def test_probe_reads_the_workers_key_by_redis_clock() -> None:
    source = PROBE_SCRIPT.read_text()
    assert "WORKERS_KEY" in source
    assert f'"{WORKERS_KEY}"' not in source  # the key from shared.protocol, spelt once
    assert "time.time" not in source


@pytest.mark.parametrize("offset", ["+0s", "+1h", "-1h"])
def test_probe_passes_beside_a_live_worker_whatever_the_containers_clock(
    synthetic: Stack, offset: str
) -> None:
    """The synthetic stack's workers run on this host, so their ids start with its name, as a
    pod's worker's start with the pod's."""
    assert run_probe(synthetic.redis_url, offset=offset) == 0
    assert run_probe(synthetic.redis_url, "--redis-down-ok", offset=offset) == 0


@pytest.mark.parametrize("beats", CASES, ids=CASE_IDS)
def test_liveness_probe_passes_only_while_this_pods_own_worker_beats(
    redis_server: RedisServer, beats: Beats
) -> None:
    url = beats.write(redis_server)

    assert run_probe(url, "--redis-down-ok") == (0 if beats.alive else 1)


def test_probe_passes_liveness_but_not_startup_while_redis_is_down() -> None:
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    assert run_probe(nobody) == 1
    assert run_probe(nobody, "--redis-down-ok") == 0


# --- The Grafana dashboard ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


@pytest.fixture(scope="module")
def exported() -> dict[str, tuple[str, set[str]]]:
    """Every series name the code exports -> (metric type, labels)."""
    series: dict[str, tuple[str, set[str]]] = {}
    for module in (api.metrics, worker.metrics):
        for metric in vars(module).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            # prometheus_client keeps these as attributes; a metric's name has no _total.
            name, kind, labels = metric._name, str(metric._type), set(metric._labelnames)
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
            for suffix in suffixes.get(kind, [""]):
                series[name + suffix] = (kind, labels | ({"le"} if suffix == "_bucket" else set()))
    return series


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(PromQL, legend) of every target."""
    return [(t["expr"], t.get("legendFormat", "")) for p in panels(dashboard) for t in p["targets"]]


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
PROMQL_WORDS |= {"and", "or", "unless", "inf", "nan"}


def promql_names(expr: str) -> tuple[list[str], set[str]]:
    """The series an expression reads, and the labels it names (matchers, by/without)."""
    labels = set(
        re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", " ".join(re.findall(r"\{[^}]*\}", expr)))
    )
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in grouping.split(",") if label.strip()}
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    words = re.finditer(r"\b[a-zA-Z_:][\w:]*+(?!\s*\()", bare)
    series = [w.group() for w in words if w.group().lower() not in PROMQL_WORDS]
    return series, labels


def test_dashboard_has_a_prometheus_datasource_variable_every_panel_uses(
    dashboard: dict[str, Any],
) -> None:
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    uses = {"type": "prometheus", "uid": f"${{{variable['name']}}}"}
    for panel in panels(dashboard):
        assert panel["datasource"] == uses
        assert all(t["datasource"] == uses for t in panel["targets"])


def test_dashboard_panels_are_well_formed(dashboard: dict[str, Any]) -> None:
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard["uid"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_every_dashboard_panel_queries_prometheus(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        targets = panel["targets"]
        assert targets, panel["title"]
        assert all(t["expr"].strip() for t in targets), panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]


def test_dashboard_queries_are_balanced(dashboard: dict[str, Any]) -> None:
    for expr, _ in queries(dashboard):
        for opening, closing in ("()", "[]", "{}"):
            assert expr.count(opening) == expr.count(closing), expr


def test_dashboard_reads_only_series_and_labels_the_code_exports(
    dashboard: dict[str, Any], exported: dict[str, tuple[str, set[str]]]
) -> None:
    """So the dashboard cannot drift from api/metrics.py and worker/metrics.py."""
    for expr, legend in queries(dashboard):
        series, labels = promql_names(expr)
        assert series, expr
        assert set(series) <= set(exported), expr
        allowed = set().union(*(exported[s][1] for s in series))
        assert labels | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend)) <= allowed, expr
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
            assert found, variable["definition"]
            name, label = found.groups()
            assert label in exported[name][1], variable["definition"]


def test_dashboard_rates_counters_and_never_sums_deployment_gauges(
    dashboard: dict[str, Any], exported: dict[str, tuple[str, set[str]]]
) -> None:
    """Counters only make sense as rates. The gauges are the deployment's, read from Redis by
    every API process alike: summed over processes they would count each job N times."""
    for expr, _ in queries(dashboard):
        for name in promql_names(expr)[0]:
            kind = exported[name][0]
            if kind == "counter" or name.endswith(("_bucket", "_sum", "_count")):
                assert re.search(rf"\b(?:rate|increase)\(\s*{name}\b", expr), expr
            if kind == "gauge":
                assert re.match(r"\s*(?:max|min|avg)\b", expr), expr


def test_dashboard_shows_the_ttft_split_throughput_queue_and_workers(
    dashboard: dict[str, Any],
) -> None:
    exprs = [expr for expr, _ in queries(dashboard)]
    split = [
        "sluice_request_queue_time_seconds",
        "sluice_request_prefill_time_seconds",
        "sluice_relay_delay_seconds",
        "sluice_time_to_first_token_seconds",
    ]
    for quantile in ("0.5", "0.95"):
        for name in split:
            assert any(
                e.startswith(f"histogram_quantile({quantile},") and f"{name}_bucket" in e
                for e in exprs
            ), (quantile, name)
    wanted = {  # series -> the labels it is split by
        "sluice_generation_tokens_total": set(),
        "sluice_requests_total": {"outcome"},
        "sluice_requests_waiting": set(),
        "sluice_requests_running": set(),
        "sluice_workers": set(),
        "sluice_worker_slots": {"state"},
        "sluice_rejected_total": {"code"},
    }
    read = [promql_names(e) for e in exprs]
    for name, by in wanted.items():
        assert any(name in series and by <= labels for series, labels in read), name
