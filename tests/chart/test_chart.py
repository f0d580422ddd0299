"""The Helm chart: lints clean, renders valid Kubernetes objects, and refuses bad values."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from gateway.config import Config, parse_duration

from .rendering import (
    CHART_DIR,
    NAMESPACE,
    RELEASE,
    SCENARIOS,
    Manifest,
    Render,
    gateway_config,
    gateway_container,
    gateway_deployment,
    only,
    refusal,
)

FULLNAME = f"{RELEASE}-idlegate"
# The oldest Kubernetes with the shell-less preStop `sleep` action, and the newest schemas.
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
CRD_API_GROUPS = ("monitoring.coreos.com/",)
REDIS_URL_SECRET = {"storeUrl": {"existingSecret": "idlegate-redis", "key": "url"}}


# ---- lint and Kubernetes validity --------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_reports_no_errors_or_warnings(scenario: str) -> None:
    report = helm.lint(CHART_DIR, SCENARIOS[scenario], namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems
    assert report["errors"] == []


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_object_is_valid_kubernetes_in_strict_mode(
    render: Render, scenario: str
) -> None:
    manifests = render(SCENARIOS[scenario])
    assert manifests
    for manifest in manifests:
        if manifest["apiVersion"].startswith(CRD_API_GROUPS):
            continue  # no upstream schema for CRDs: checked by hand below
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(manifest, version, strict=True)


def test_defaults_render_a_working_single_replica_install(render: Render) -> None:
    kinds = sorted(m["kind"] for m in render())
    assert kinds == ["ConfigMap", "Deployment", "Pod", "Service", "Service", "ServiceAccount"]
    assert gateway_deployment(render())["spec"]["replicas"] == 1
    assert gateway_config(render())["store"]["url"] == "memory://"


def test_every_object_carries_the_standard_labels(render: Render) -> None:
    for manifest in render(SCENARIOS["network-policy"]) + render(SCENARIOS["service-monitor"]):
        labels = manifest["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "idlegate"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["helm.sh/chart"] == "idlegate-0.1.0"


def test_service_monitor_scrapes_the_metrics_port_of_the_metrics_service(
    render: Render,
) -> None:
    manifests = render(SCENARIOS["service-monitor"])
    monitor = only(manifests, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"] == FULLNAME
    assert monitor["metadata"]["labels"]["release"] == "prom"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert [e["port"] for e in spec["endpoints"]] == ["metrics"]
    assert spec["endpoints"][0]["path"] == "/metrics"
    assert re.fullmatch(r"\d+s", spec["endpoints"][0]["interval"])

    selected = [
        s
        for s in manifests
        if s["kind"] == "Service"
        and spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == [f"{FULLNAME}-metrics"]
    assert [p["name"] for p in selected[0]["spec"]["ports"]] == ["metrics"]


# ---- the gateway config --------------------------------------------------------------------


def pod_environment(manifests: list[Manifest], tmp_path: Path) -> dict[str, str]:
    """The environment the container would see: plain values as is, Secret refs faked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDLEGATE_")}
    for var in gateway_container(manifests).get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var["name"] == "IDLEGATE_STORE__URL":
            env[var["name"]] = "rediss://:not-a-real-password@redis.invalid:6380/0"
        else:  # long enough for any HS* algorithm (check-config refuses a short secret)
            env[var["name"]] = "not-a-real-secret-" + "x" * 64
    return env


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_gateway_config_passes_check_config(
    render: Render, scenario: str, tmp_path: Path
) -> None:
    manifests = render(SCENARIOS[scenario])
    configmap = only(manifests, "ConfigMap", FULLNAME)
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(configmap["data"]["gateway.yaml"], encoding="utf-8")
    env = pod_environment(manifests, tmp_path)
    env["IDLEGATE_CONFIG"] = str(config_file)
    admin = (yaml.safe_load(configmap["data"]["gateway.yaml"]) or {}).get("admin") or {}
    if admin.get("token_file"):  # mounted from a Secret in the pod: a fake one here
        token_file = tmp_path / "admin.token"
        token_file.write_text("not-a-real-admin-token\n")
        env["IDLEGATE_ADMIN__TOKEN_FILE"] = str(token_file)

    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "-c", str(config_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["admin"]["host"] == "0.0.0.0"
    assert "not-a-real-password" not in result.stdout


def test_config_mounted_where_the_container_reads_it(render: Render) -> None:
    manifests = render()
    container = gateway_container(manifests)
    assert container["args"][:3] == ["serve", "-c", "/etc/idlegate/gateway.yaml"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["config"]["mountPath"] == "/etc/idlegate"
    volumes = {
        v["name"]: v for v in gateway_deployment(manifests)["spec"]["template"]["spec"]["volumes"]
    }
    assert volumes["config"]["configMap"]["name"] == FULLNAME
    assert volumes["config"]["configMap"]["items"] == [
        {"key": "gateway.yaml", "path": "gateway.yaml"}
    ]


def test_container_ports_follow_the_gateway_config(render: Render) -> None:
    manifests = render({"config": {"listen": {"port": 8443}, "admin": {"port": 9464}}})
    ports = {p["name"]: p["containerPort"] for p in gateway_container(manifests)["ports"]}
    assert ports == {"http": 8443, "metrics": 9464}


def test_a_preset_is_not_shadowed_by_chart_defaults(render: Render) -> None:
    policy = gateway_config(render({"config": {"policy": {"preset": "nist-aal2"}}}))["policy"]
    assert policy["preset"] == "nist-aal2"
    assert "idle_timeout" not in policy
    assert "max_token_lifetime" not in policy


def test_chart_schema_config_keys_match_the_gateway_config_model(chart: helm.Chart) -> None:
    """The schema refuses keys the gateway does not know, and knows every key it does."""
    schema = chart.schema
    assert schema is not None
    config_schema = schema["properties"]["config"]

    def schema_keys(node: dict[str, Any], prefix: str) -> set[str]:
        if node.get("type") == "array":
            node = node["items"]
        keys = set()
        for key, sub in node.get("properties", {}).items():
            keys.add(prefix + key)
            # `null` or an object (forward_auth.listen): the object's keys.
            sub = next((s for s in sub.get("anyOf", []) if s.get("type") == "object"), sub)
            if sub.get("type") == "object" and "properties" in sub:
                keys |= schema_keys(sub, f"{prefix}{key}.")
            elif sub.get("type") == "array" and "properties" in sub.get("items", {}):
                keys |= schema_keys(sub, f"{prefix}{key}[].")
        return keys

    def model_keys(model: type[Any], prefix: str) -> set[str]:
        keys = set()
        for name, field in model.model_fields.items():
            keys.add(prefix + name)
            annotation = field.annotation
            inner = getattr(annotation, "__args__", (None,))[0]
            # list[Model] is `name[].key`; Model | None (forward_auth.listen) is `name.key`.
            marker = "[]." if typing.get_origin(annotation) is list else "."
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                keys |= model_keys(annotation, f"{prefix}{name}.")
            elif isinstance(inner, type) and hasattr(inner, "model_fields"):
                keys |= model_keys(inner, f"{prefix}{name}{marker}")
        return keys

    assert schema_keys(config_schema, "") == model_keys(Config, "")


# ---- refused at install time --------------------------------------------------------------


def test_a_value_of_the_wrong_type_is_refused(chart: helm.Chart) -> None:
    assert "/replicaCount" in refusal(chart, {"replicaCount": "three"})
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"replicaCount": "three"})


def test_an_unknown_top_level_value_is_refused(chart: helm.Chart) -> None:
    assert "replicas" in refusal(chart, {"replicas": 3})


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"config": {"store": {"on_error": "maybe"}}}, "/config/store/on_error"),
        ({"config": {"policy": {"track_by": "sub"}}}, "/config/policy/track_by"),
        ({"config": {"policy": {"idle_timeout": "15 minutes"}}}, "/config/policy/idle_timeout"),
        ({"config": {"server": {"shutdown_grace": "-5s"}}}, "/config/server/shutdown_grace"),
        ({"config": {"store": {"url": "mysql://db"}}}, "/config/store/url"),
        ({"config": {"store": {"tls": True}}}, "/config/store"),
        ({"config": {"routes": []}}, "/config/routes"),
        ({"service": {"type": "ExternalName"}}, "/service/type"),
        ({"secrets": {"hmac": [{"env": "IDLEGATE_HMAC", "existingSecret": "s", "key": "k"}]}},
         "/secrets/hmac/0/env"),
    ],
)  # fmt: skip
def test_schema_refuses_bad_values(chart: helm.Chart, values: dict[str, Any], where: str) -> None:
    assert where in refusal(chart, values)


@pytest.mark.parametrize(
    "values",
    [
        {"replicaCount": 2},
        {"autoscaling": {"enabled": True}},
        {"workers": 4},
        {"replicaCount": 2, "config": {"store": {"url": "memory://"}}},
    ],
)
def test_more_than_one_process_with_the_memory_store_is_refused(
    chart: helm.Chart, values: dict[str, Any]
) -> None:
    assert "shared store" in refusal(chart, values)


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"redis": {"enabled": True}, "secrets": REDIS_URL_SECRET}, "choose one"),
        ({"config": {"store": {"url": "redis://:hunter2@redis:6379/0"}}}, "password"),
        ({"config": {"store": {"url": "redis+sentinel://s:26379/m?sentinel_password=x"}}},
         "password"),
        ({"config": {"admin": {"host": "127.0.0.1"}}}, "loopback"),
        ({"config": {"admin": {"port": 8080}}}, "must differ"),
        ({"terminationGracePeriodSeconds": 20}, "must exceed"),
        ({"config": {"providers": [{"name": "m", "issuer": "i", "audiences": ["a"],
                                    "algorithms": ["HS256"], "hmac_secret_env": "HMAC_M"}]}},
         "no entry in secrets.hmac"),
        ({"podDisruptionBudget": {"enabled": True, "minAvailable": 1}}, "not both"),
        ({"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}},
         "metrics.service.enabled"),
    ],
)  # fmt: skip
def test_values_that_would_not_work_are_refused(
    chart: helm.Chart, values: dict[str, Any], reason: str
) -> None:
    assert reason in refusal(chart, values)


def test_lint_reports_a_refused_value_as_an_error() -> None:
    report = helm.lint(CHART_DIR, {"replicaCount": "three"})
    assert any(m["severity"] == 3 for m in report["messages"])


# ---- pod hardening, probes, drain ----------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gateway_pod_runs_non_root_read_only_without_capabilities(
    render: Render, scenario: str
) -> None:
    manifests = render(SCENARIOS[scenario])
    pod = gateway_deployment(manifests)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False  # would inject IDLEGATE_* variables
    container = gateway_container(manifests)
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == 10001
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"]
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[tmp["name"]]


def test_probes_use_healthz_and_readyz_on_the_admin_port(render: Render) -> None:
    container = gateway_container(render())
    admin_port = next(p for p in container["ports"] if p["containerPort"] == 9090)
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": admin_port["name"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": admin_port["name"]}


@pytest.mark.parametrize("shutdown_grace", ["20s", 45, "1m30s", "2m", "250ms"])
def test_termination_grace_outlasts_prestop_sleep_plus_shutdown_grace(
    render: Render, shutdown_grace: str | int
) -> None:
    manifests = render({"config": {"server": {"shutdown_grace": shutdown_grace}}})
    pod = gateway_deployment(manifests)["spec"]["template"]["spec"]
    rendered_grace = parse_duration(gateway_config(manifests)["server"]["shutdown_grace"])
    pre_stop = gateway_container(manifests)["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + rendered_grace


def test_default_termination_grace_is_35_seconds(render: Render) -> None:
    manifests = render()
    assert gateway_deployment(manifests)["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ] == 35  # fmt: skip
    assert gateway_container(manifests)["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}


def test_prestop_sleep_can_be_turned_off(render: Render) -> None:
    manifests = render({"drain": {"preStopSleepSeconds": 0}})
    assert "lifecycle" not in gateway_container(manifests)
    spec = gateway_deployment(manifests)["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 30


def test_checksum_annotation_changes_only_when_the_config_changes(render: Render) -> None:
    def checksum(values: dict[str, Any]) -> str:
        template = gateway_deployment(render(values))["spec"]["template"]
        value: str = template["metadata"]["annotations"]["checksum/config"]
        return value

    base = checksum({})
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert checksum({"config": {"server": {"log_level": "debug"}}}) != base
    assert checksum({"config": {"routes": [{"prefix": "/v2/", "upstream": "http://b:80"}]}}) != base
    assert checksum({"resources": {"requests": {"cpu": "1"}}}) == base


# ---- secrets -------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_secret_value_is_rendered(render: Render, scenario: str) -> None:
    manifests = render(SCENARIOS[scenario])
    assert not [m for m in manifests if m["kind"] == "Secret"]
    for configmap in (m for m in manifests if m["kind"] == "ConfigMap"):
        for text in configmap["data"].values():
            assert not re.search(r"://[^/@\s]*:[^/@\s]+@", text), "URL with a password"
    secret_envs = {"IDLEGATE_STORE__URL", "STORE_HASH_KEY", "HMAC_INTERNAL"}
    for var in gateway_container(manifests).get("env", []):
        if var["name"] in secret_envs:
            assert set(var) == {"name", "valueFrom"}
            assert "secretKeyRef" in var["valueFrom"]


def test_external_redis_url_comes_from_the_existing_secret(render: Render) -> None:
    manifests = render(SCENARIOS["external-redis"])
    env = {v["name"]: v for v in gateway_container(manifests)["env"]}
    assert env["IDLEGATE_STORE__URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "idlegate-redis",
        "key": "url",
    }
    config = gateway_config(manifests)
    assert "url" not in config["store"]
    assert config["store"]["hash_key_env"] == "STORE_HASH_KEY"
    assert env["STORE_HASH_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "idlegate-hash"
    assert env["HMAC_INTERNAL"]["valueFrom"]["secretKeyRef"] == {
        "name": "idlegate-hmac",
        "key": "k",
    }
    assert gateway_container(manifests)["args"][-2:] == ["--workers", "2"]


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://s1.redis:26379,s2.redis:26379,s3.redis:26379/mymaster/0",
        "redis+cluster://n1.redis:6379,n2.redis:6379,n3.redis:6379",
        "rediss+sentinel://s1.redis:26379,s2.redis:26379/mymaster/0",
        "rediss+cluster://n1.redis:6379,n2.redis:6379?ssl_check_hostname=false",
    ],
)
def test_sentinel_and_cluster_urls_without_a_password_go_in_the_config(
    render: Render, url: str, tmp_path: Path
) -> None:
    """docs/deployment.md's Helm values for each topology: a password-free URL may sit in
    config.store.url (it renders as given and passes check-config)."""
    manifests = render({"replicaCount": 2, "config": {"store": {"url": url}}})
    assert gateway_config(manifests)["store"]["url"] == url
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(only(manifests, "ConfigMap", FULLNAME)["data"]["gateway.yaml"])
    checked = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "-c", str(config_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://:hunter2@s1:26379,s2:26379/mymaster",
        "redis+cluster://:hunter2@n1:6379,n2:6379",
        "redis+cluster://default:hunter2@n1:6379",
        "rediss+cluster://:hunter2@n1:6379?ssl_ca_certs=/etc/idlegate/redis-ca/ca.pem",
        "rediss+sentinel://s1:26379/mymaster?sentinel_password=hunter2",
    ],
)
def test_a_sentinel_or_cluster_url_with_a_password_is_refused_in_the_config(
    chart: helm.Chart, url: str
) -> None:
    assert "password" in refusal(chart, {"config": {"store": {"url": url}}})


def test_a_tls_cluster_url_and_its_ca_mounted_from_a_configmap_render_and_validate(
    render: Render,
) -> None:
    """docs/deployment.md's recipe: `rediss+cluster://` with `ssl_ca_certs` pointing into an
    extraVolumes mount. (Not a SCENARIO: check-config would look for the CA file here.)"""
    url = "rediss+cluster://n1:6379,n2:6379?ssl_ca_certs=/etc/idlegate/redis-ca/ca.pem"
    manifests = render(
        {
            "replicaCount": 3,
            "config": {"store": {"url": url}},
            "extraVolumes": [{"name": "redis-ca", "configMap": {"name": "redis-ca"}}],
            "extraVolumeMounts": [
                {"name": "redis-ca", "mountPath": "/etc/idlegate/redis-ca", "readOnly": True}
            ],
        }
    )
    assert gateway_config(manifests)["store"]["url"] == url
    mounts = {m["name"]: m for m in gateway_container(manifests)["volumeMounts"]}
    assert mounts["redis-ca"]["mountPath"] == "/etc/idlegate/redis-ca"
    volumes = gateway_deployment(manifests)["spec"]["template"]["spec"]["volumes"]
    assert {"name": "redis-ca", "configMap": {"name": "redis-ca"}} in volumes
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(gateway_deployment(manifests), version, strict=True)


def test_admin_token_secret_is_mounted_where_token_file_points(render: Render) -> None:
    manifests = render(SCENARIOS["external-redis"])
    token_file = Path(gateway_config(manifests)["admin"]["token_file"])
    mount = next(
        m
        for m in gateway_container(manifests)["volumeMounts"]
        if m["mountPath"] == str(token_file.parent)
    )
    assert mount["readOnly"] is True
    volumes = gateway_deployment(manifests)["spec"]["template"]["spec"]["volumes"]
    secret = next(v for v in volumes if v["name"] == mount["name"])["secret"]
    assert secret["secretName"] == "idlegate-admin"
    assert secret["items"] == [{"key": "token", "path": token_file.name}]
    assert "token_file" not in gateway_config(render()).get("admin", {})


# ---- optional objects ----------------------------------------------------------------------


def test_hpa_scales_the_deployment_and_owns_the_replica_count(render: Render) -> None:
    manifests = render(SCENARIOS["hpa"])
    hpa = only(manifests, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": FULLNAME,
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert "replicas" not in gateway_deployment(manifests)["spec"]


def test_pdb_selects_the_gateway_pods_only(render: Render) -> None:
    manifests = render(SCENARIOS["pdb"])
    pdb = only(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2
    assert "maxUnavailable" not in pdb["spec"]
    gateway_labels = gateway_deployment(manifests)["spec"]["template"]["metadata"]["labels"]
    redis = only(manifests, "Deployment", f"{FULLNAME}-redis")
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    selector = pdb["spec"]["selector"]["matchLabels"].items()
    assert selector <= gateway_labels.items()
    assert not selector <= redis_labels.items()


def test_in_chart_redis_is_hardened_ephemeral_and_used_by_the_gateway(render: Render) -> None:
    manifests = render(SCENARIOS["in-chart-redis"])
    service = only(manifests, "Service", f"{FULLNAME}-redis")
    port = service["spec"]["ports"][0]["port"]
    assert gateway_config(manifests)["store"]["url"] == f"redis://{FULLNAME}-redis:{port}/0"
    redis = only(manifests, "Deployment", f"{FULLNAME}-redis")
    pod = redis["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].startswith("redis:7")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert all("persistentVolumeClaim" not in v for v in pod["volumes"])
    assert container["args"][container["args"].index("--save") + 1] == ""
    assert container["args"][container["args"].index("--maxmemory-policy") + 1] == "noeviction"
    assert not [m for m in render() if "redis" in m["metadata"]["name"]]


def test_network_policies_open_the_named_ports_to_the_given_peers(render: Render) -> None:
    manifests = render(SCENARIOS["network-policy"])
    policy = only(manifests, "NetworkPolicy", FULLNAME)
    port_names = {p["name"] for p in gateway_container(manifests)["ports"]}
    rules = {rule["ports"][0]["port"]: rule for rule in policy["spec"]["ingress"]}
    assert set(rules) == port_names == {"http", "metrics"}
    assert rules["http"]["from"] == SCENARIOS["network-policy"]["networkPolicy"]["proxyFrom"]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
    assert {53, 6379, 8000} <= egress_ports

    redis_policy = only(manifests, "NetworkPolicy", f"{FULLNAME}-redis")
    (rule,) = redis_policy["spec"]["ingress"]
    gateway_selector = gateway_deployment(manifests)["spec"]["selector"]["matchLabels"]
    assert rule["from"] == [{"podSelector": {"matchLabels": gateway_selector}}]


def test_proxy_service_never_exposes_the_admin_port(render: Render) -> None:
    manifests = render(SCENARIOS["load-balancer"])
    service = only(manifests, "Service", FULLNAME)
    assert service["spec"]["type"] == "LoadBalancer"
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    metrics = only(manifests, "Service", f"{FULLNAME}-metrics")
    assert metrics["spec"]["type"] == "ClusterIP"
    assert [(p["name"], p["port"]) for p in metrics["spec"]["ports"]] == [("metrics", 9090)]
    annotations = gateway_deployment(manifests)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9090"


def test_image_tag_defaults_to_app_version_and_digest_wins(render: Render) -> None:
    assert gateway_container(render())["image"] == "idlegate:0.1.0"
    digest = "sha256:" + "a" * 64
    pinned = gateway_container(render({"image": {"tag": "x", "digest": digest}}))
    assert pinned["image"] == f"idlegate@{digest}"


def test_notes_tell_how_to_reach_the_proxy_and_the_metrics(chart: helm.Chart) -> None:
    rendered = chart.render({}, name=RELEASE, namespace=NAMESPACE)
    notes = next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))
    assert f"http://{FULLNAME}.{NAMESPACE}.svc:8080" in notes
    assert "/metrics" in notes
    assert f"{FULLNAME}-metrics" in notes
    assert "memory://" in notes


# ---- forward-auth mode ---------------------------------------------------------------------


def test_forward_auth_mode_enables_the_endpoint_and_needs_no_upstream(render: Render) -> None:
    config = gateway_config(render(SCENARIOS["forward-auth"]))
    assert config["forward_auth"]["enabled"] is True
    assert config["forward_auth"]["trusted_proxies"] == ["10.244.0.0/16"]
    assert config["routes"] == [{"prefix": "/"}, {"prefix": "/health/", "auth": "none"}]
    assert gateway_config(render())["forward_auth"]["enabled"] is False


def test_proxy_mode_still_requires_each_routes_upstream(chart: helm.Chart) -> None:
    assert "upstream" in refusal(chart, {"config": {"routes": [{"prefix": "/"}]}})
    assert "/mode" in refusal(chart, {"mode": "sidecar"})


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"mode": "forward-auth"}, "trusted_proxies"),
        ({"mode": "forward-auth", "config": {"forward_auth": {"trusted_proxies": ["::1/128"]}}},
         "trusted_proxies"),
        ({"config": {"forward_auth": {"listen": {"port": 9091}}}}, "mode: forward-auth"),
    ],
)  # fmt: skip
def test_forward_auth_values_that_would_not_work_are_refused(
    chart: helm.Chart, values: dict[str, Any], reason: str
) -> None:
    assert reason in refusal(chart, values)


def test_notes_show_the_auth_url_and_ingress_annotations(chart: helm.Chart) -> None:
    rendered = chart.render(SCENARIOS["forward-auth"], name=RELEASE, namespace=NAMESPACE)
    notes = next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))
    url = f"http://{FULLNAME}.{NAMESPACE}.svc.cluster.local:8080/.idlegate/auth"
    assert f'nginx.ingress.kubernetes.io/auth-url: "{url}"' in notes
    assert (
        'nginx.ingress.kubernetes.io/auth-response-headers: "X-Auth-Scope,X-Auth-Subject,'
        'X-Auth-Token-Id"' in notes
    )
    assert "10.244.0.0/16" in notes


# ---- forward-auth on its own port (forward_auth.listen) ------------------------------------


def with_auth_listen(listen: dict[str, Any], **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "mode": "forward-auth",
        "config": {"forward_auth": {"trusted_proxies": ["10.0.0.0/8"], "listen": listen}},
    }
    for key, value in extra.items():
        if key == "config":
            values["config"].update(value)
        else:
            values[key] = value
    return values


def test_dedicated_forward_auth_port_is_a_named_container_port(render: Render) -> None:
    manifests = render(SCENARIOS["forward-auth-port"])
    container = gateway_container(manifests)
    ports = {p["name"]: (p["containerPort"], p["protocol"]) for p in container["ports"]}
    assert ports == {"http": (8080, "TCP"), "metrics": (9090, "TCP"), "auth": (9091, "TCP")}
    # The pod reads the same listener from its config, with forward-auth on.
    forward_auth = gateway_config(manifests)["forward_auth"]
    assert forward_auth["enabled"] is True
    assert forward_auth["listen"] == {"host": "0.0.0.0", "port": 9091}


def test_dedicated_forward_auth_port_is_on_the_proxy_service(render: Render) -> None:
    manifests = render(SCENARIOS["forward-auth-port"])
    service = only(manifests, "Service", FULLNAME)
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [
        ("http", 8080, "http"),
        ("auth", 9091, "auth"),
    ]
    metrics = only(manifests, "Service", f"{FULLNAME}-metrics")
    assert [p["name"] for p in metrics["spec"]["ports"]] == ["metrics"]
    moved = render(with_auth_listen({"port": 9091}, service={"authPort": 80}))
    ports = only(moved, "Service", FULLNAME)["spec"]["ports"]
    assert [(p["name"], p["port"], p["targetPort"]) for p in ports][1] == ("auth", 80, "auth")


def test_probes_stay_on_the_admin_port_with_a_dedicated_forward_auth_port(
    render: Render,
) -> None:
    container = gateway_container(render(SCENARIOS["forward-auth-port"]))
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_only_the_ingress_controller_may_reach_the_forward_auth_port(render: Render) -> None:
    manifests = render(SCENARIOS["forward-auth-port"])
    policy = only(manifests, "NetworkPolicy", FULLNAME)
    rules = {rule["ports"][0]["port"]: rule for rule in policy["spec"]["ingress"]}
    assert set(rules) == {p["name"] for p in gateway_container(manifests)["ports"]}
    network_policy = SCENARIOS["forward-auth-port"]["networkPolicy"]
    assert rules["auth"]["from"] == network_policy["authFrom"]
    assert rules["http"]["from"] == network_policy["proxyFrom"]
    # Without authFrom the auth port has the proxy port's peers, never "everyone".
    fallback = render(
        with_auth_listen(
            {"port": 9091},
            networkPolicy={"enabled": True, "proxyFrom": network_policy["authFrom"]},
        )
    )
    rules = {r["ports"][0]["port"]: r for r in only(fallback, "NetworkPolicy")["spec"]["ingress"]}
    assert rules["auth"]["from"] == network_policy["authFrom"]


def test_notes_point_the_auth_url_at_the_dedicated_port(chart: helm.Chart) -> None:
    rendered = chart.render(SCENARIOS["forward-auth-port"], name=RELEASE, namespace=NAMESPACE)
    notes = next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))
    url = f"http://{FULLNAME}.{NAMESPACE}.svc.cluster.local:9091/.idlegate/auth"
    assert f'nginx.ingress.kubernetes.io/auth-url: "{url}"' in notes
    assert f"address: {url}" in notes
    assert "networkPolicy.authFrom" in notes


def test_without_a_dedicated_port_nothing_extra_is_rendered(render: Render) -> None:
    manifests = render(SCENARIOS["forward-auth"])
    assert {p["name"] for p in gateway_container(manifests)["ports"]} == {"http", "metrics"}
    assert [p["name"] for p in only(manifests, "Service", FULLNAME)["spec"]["ports"]] == ["http"]
    assert "listen" not in gateway_config(manifests)["forward_auth"]


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        # config.py's clash rule: each listener needs its own port (the gateway's default
        # forward_auth.listen port is 8080, the proxy's).
        (with_auth_listen({"port": 8080}), "is also config.listen.port"),
        (with_auth_listen({"host": "0.0.0.0"}), "is also config.listen.port"),
        (with_auth_listen({"port": 9090}), "is also config.admin.port"),
        (with_auth_listen({"port": 9443}, config={"listen": {"port": 9443}}),
         "is also config.listen.port"),
        (with_auth_listen({"port": 9091}, service={"authPort": 8080}), "is also service.port"),
        (with_auth_listen({"host": "127.0.0.1", "port": 9091}), "loopback"),
    ],
)  # fmt: skip
def test_a_dedicated_forward_auth_port_that_would_not_work_is_refused(
    chart: helm.Chart, values: dict[str, Any], reason: str
) -> None:
    assert reason in refusal(chart, values)


@pytest.mark.parametrize(
    ("values", "where"),
    [
        (with_auth_listen({"port": 0}), "/config/forward_auth/listen"),
        (with_auth_listen({"port": "auth"}), "/config/forward_auth/listen"),
        (with_auth_listen({"port": 9091, "tls": True}), "/config/forward_auth/listen"),
        (with_auth_listen({"port": 9091}, service={"authPort": 70000}), "/service/authPort"),
    ],
)  # fmt: skip
def test_schema_refuses_a_bad_forward_auth_listener(
    chart: helm.Chart, values: dict[str, Any], where: str
) -> None:
    assert where in refusal(chart, values)
