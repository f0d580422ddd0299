"""Rendering the Helm chart and picking objects out of the result."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "idlegate"
RELEASE = "edge"
NAMESPACE = "gateway"

Manifest = dict[str, Any]
Render = Callable[..., list[Manifest]]

# Value sets a cluster operator would really install; each must render, lint and validate.
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "hpa": {
        "secrets": {"storeUrl": {"existingSecret": "idlegate-redis", "key": "url"}},
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
    },
    "service-monitor": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    },
    "in-chart-redis": {"redis": {"enabled": True}, "replicaCount": 2},
    "external-redis": {
        "replicaCount": 3,
        "workers": 2,
        "secrets": {
            "storeUrl": {"existingSecret": "idlegate-redis", "key": "url"},
            "adminToken": {"existingSecret": "idlegate-admin", "key": "token"},
            "storeHashKey": {"existingSecret": "idlegate-hash", "key": "hash-key"},
            "hmac": [{"env": "HMAC_INTERNAL", "existingSecret": "idlegate-hmac", "key": "k"}],
        },
        "config": {
            "providers": [
                {
                    "name": "main",
                    "issuer": "https://login.example.com/",
                    "audiences": ["orders-api"],
                    "discovery": True,
                },
                {
                    "name": "internal",
                    "issuer": "internal-batch",
                    "audiences": ["orders-api"],
                    "algorithms": ["HS256"],
                    "hmac_secret_env": "HMAC_INTERNAL",
                },
            ],
        },
    },
    "network-policy": {
        "redis": {"enabled": True},
        "networkPolicy": {
            "enabled": True,
            "proxyFrom": [{"namespaceSelector": {"matchLabels": {"role": "ingress"}}}],
            "metricsFrom": [{"podSelector": {"matchLabels": {"app": "prometheus"}}}],
            "egress": {
                "restrict": True,
                "to": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 8000}]}],
            },
        },
    },
    "pdb": {
        "redis": {"enabled": True},
        "replicaCount": 3,
        "podDisruptionBudget": {"enabled": True, "minAvailable": 2, "maxUnavailable": None},
    },
    "forward-auth": {
        "mode": "forward-auth",
        "redis": {"enabled": True},
        "replicaCount": 2,
        "networkPolicy": {
            "enabled": True,
            "proxyFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}
            ],
        },
        "config": {
            "routes": [{"prefix": "/"}, {"prefix": "/health/", "auth": "none"}],
            "forward_auth": {"trusted_proxies": ["10.244.0.0/16"]},
        },
    },
    "forward-auth-port": {
        "mode": "forward-auth",
        "redis": {"enabled": True},
        "replicaCount": 2,
        "networkPolicy": {
            "enabled": True,
            "proxyFrom": [{"podSelector": {"matchLabels": {"app": "web"}}}],
            "authFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}
            ],
        },
        "config": {
            "routes": [{"prefix": "/"}],
            "forward_auth": {
                "listen": {"host": "0.0.0.0", "port": 9091},
                "trusted_proxies": ["10.244.0.0/16"],
            },
        },
    },
    "load-balancer": {
        "service": {"type": "LoadBalancer", "annotations": {"example.com/lb": "internal"}},
        "metrics": {"podAnnotations": True},
        "image": {"repository": "registry.example.com/idlegate", "tag": "0.1.0-rc1"},
    },
}


def refusal(chart: helm.Chart, values: dict[str, Any], *, release: str = RELEASE) -> str:
    """The message with which an install of these values is refused."""
    with pytest.raises(helm.HelmError) as excinfo:
        chart.render(values, name=release, namespace=NAMESPACE)
    return str(excinfo.value)


def parse_manifests(rendered: dict[str, str]) -> list[Manifest]:
    """Every Kubernetes object of a render, NOTES.txt left out."""
    objects: list[Manifest] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def only(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    """The one object of that kind (and name), failing loudly otherwise."""
    found = [
        m
        for m in manifests
        if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def gateway_deployment(manifests: list[Manifest]) -> Manifest:
    return only(manifests, "Deployment", f"{RELEASE}-idlegate")


def gateway_container(manifests: list[Manifest]) -> Manifest:
    containers = gateway_deployment(manifests)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "idlegate")


def gateway_config(manifests: list[Manifest]) -> dict[str, Any]:
    """The gateway.yaml the pods read, parsed."""
    configmap = only(manifests, "ConfigMap", f"{RELEASE}-idlegate")
    parsed: dict[str, Any] = yaml.safe_load(configmap["data"]["gateway.yaml"])
    return parsed
