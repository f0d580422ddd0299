"""Every object the chart renders has a name and labels the API server accepts, whatever the
release name (up to Helm's 53 characters) and overrides; values that cannot give such names are
refused before anything reaches the cluster."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest

from .rendering import NAMESPACE, SCENARIOS, Manifest, parse_manifests, refusal

# Kubernetes' name formats (k8s.io/apimachinery/pkg/util/validation).
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # Service names
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")

HELM_MAX_RELEASE = "r" * 53
# Everything optional the chart can render, at once: every kind of object and every name suffix.
EVERYTHING: dict[str, Any] = {
    "redis": {"enabled": True},
    "autoscaling": {"enabled": True},
    "podDisruptionBudget": {"enabled": True},
    "metrics": {"serviceMonitor": {"enabled": True}},
    "networkPolicy": {"enabled": True},
}


def render_as(chart: helm.Chart, release: str, values: dict[str, Any]) -> list[Manifest]:
    return parse_manifests(chart.render(values, name=release, namespace=NAMESPACE))


def label_maps(manifest: Manifest) -> Iterator[tuple[str, dict[str, str]]]:
    """Every label set of an object: its own, its pod template's, and its selectors'."""
    yield "metadata.labels", manifest["metadata"].get("labels") or {}
    spec = manifest.get("spec") or {}
    template = (spec.get("template") or {}).get("metadata") or {}
    yield "spec.template.metadata.labels", template.get("labels") or {}
    selector = spec.get("selector") or {}
    if isinstance(selector, dict):
        yield "spec.selector", selector.get("matchLabels", selector)
    yield "spec.podSelector", (spec.get("podSelector") or {}).get("matchLabels") or {}


def name_problems(manifests: list[Manifest]) -> list[str]:
    problems = []
    seen: set[tuple[str, str]] = set()
    for manifest in manifests:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        pattern = DNS1035_LABEL if kind == "Service" else DNS1123_LABEL
        if len(name) > 63 or not pattern.fullmatch(name):
            problems.append(f"{kind} name {name!r} ({len(name)} chars)")
        if (kind, name) in seen:
            problems.append(f"two {kind}s named {name!r}")
        seen.add((kind, name))
        for where, labels in label_maps(manifest):
            for key, value in labels.items():
                valid = isinstance(value, str) and len(value) <= 63
                if not valid or not LABEL_VALUE.fullmatch(value):
                    problems.append(f"{kind} {name}: {where} {key}={value!r}")
                label_name = key.rpartition("/")[2]
                if len(label_name) > 63 or not LABEL_NAME.fullmatch(label_name):
                    problems.append(f"{kind} {name}: {where} label name {key!r}")
    return problems


@pytest.mark.parametrize(
    "release",
    [HELM_MAX_RELEASE, "r" * 47, "idlegate-" + "r" * 44, "edge"],
    ids=["53-chars", "47-chars", "53-chars-with-chart-name", "short"],
)
@pytest.mark.parametrize("scenario", ["everything", *SCENARIOS])
def test_every_name_and_label_is_valid_for_any_release_name(
    chart: helm.Chart, release: str, scenario: str
) -> None:
    values = EVERYTHING if scenario == "everything" else SCENARIOS[scenario]
    assert name_problems(render_as(chart, release, values)) == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"fullnameOverride": "g" * 63},
        {"fullnameOverride": "g" * 54 + "-" + "g" * 8},
        {"nameOverride": "n" * 63},
        {"nameOverride": "n" * 63, "fullnameOverride": "g" * 63},
    ],
    ids=["fullname-63", "fullname-63-dash-at-the-cut", "name-63", "both-63"],
)
def test_every_name_and_label_is_valid_with_the_longest_overrides(
    chart: helm.Chart, overrides: dict[str, Any]
) -> None:
    manifests = render_as(chart, HELM_MAX_RELEASE, {**EVERYTHING, **overrides})
    assert name_problems(manifests) == []


def test_suffixed_names_keep_the_suffix_when_truncated(chart: helm.Chart) -> None:
    manifests = render_as(chart, HELM_MAX_RELEASE, EVERYTHING)
    names = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    services = [name for kind, name in names if kind == "Service"]
    assert sorted(name.rpartition("-")[2] for name in services) == ["idlegate", "metrics", "redis"]
    assert any(kind == "Pod" and name.endswith("-test-healthz") for kind, name in names)


def test_the_healthz_test_calls_the_metrics_service_by_its_real_name(chart: helm.Chart) -> None:
    manifests = render_as(chart, HELM_MAX_RELEASE, {})
    metrics = next(
        m["metadata"]["name"] for m in manifests if m["metadata"]["name"].endswith("-metrics")
    )
    pod = next(m for m in manifests if m["kind"] == "Pod")
    assert f"http://{metrics}:9090/healthz" in pod["spec"]["containers"][0]["command"][-1]
    notes = chart.render({}, name=HELM_MAX_RELEASE, namespace=NAMESPACE)
    assert f"Service {metrics}," in next(t for p, t in notes.items() if p.endswith("NOTES.txt"))


@pytest.mark.parametrize(
    ("tag", "label"),
    [
        ("0.1.0-rc1", "0.1.0-rc1"),
        ("_build.7.", "build.7"),
        ("v" + "1" * 127, "v" + "1" * 62),
        ("a" * 62 + "._x", "a" * 62),
        ("___", None),
    ],
)
def test_the_version_label_is_the_image_tag_made_a_valid_label_or_left_out(
    chart: helm.Chart, tag: str, label: str | None
) -> None:
    manifests = render_as(chart, "edge", {"image": {"tag": tag}})
    assert name_problems(manifests) == []
    for manifest in manifests:
        assert manifest["metadata"]["labels"].get("app.kubernetes.io/version") == label
    deployment = next(m for m in manifests if m["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == f"idlegate:{tag}"


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"fullnameOverride": "Idle_Gate"}, "/fullnameOverride"),
        ({"fullnameOverride": "idle.gate"}, "/fullnameOverride"),
        ({"fullnameOverride": "1gate"}, "/fullnameOverride"),
        ({"fullnameOverride": "gate-"}, "/fullnameOverride"),
        ({"fullnameOverride": "g" * 64}, "/fullnameOverride"),
        ({"nameOverride": "Gate"}, "/nameOverride"),
        ({"nameOverride": "gate_way"}, "/nameOverride"),
        ({"nameOverride": "-gate"}, "/nameOverride"),
        ({"nameOverride": "n" * 64}, "/nameOverride"),
        ({"image": {"tag": "v1:rc+1"}}, "/image/tag"),
        ({"image": {"tag": "-rc1"}}, "/image/tag"),
        ({"image": {"tag": ".rc1"}}, "/image/tag"),
        ({"image": {"tag": "1.0@sha256:" + "a" * 64}}, "/image/tag"),
        ({"image": {"tag": "t" * 129}}, "/image/tag"),
        ({"image": {"digest": "sha256:" + "A" * 64}}, "/image/digest"),
        ({"redis": {"image": {"tag": "7.4 alpine"}}}, "/redis/image/tag"),
        ({"serviceAccount": {"name": "Gate_SA"}}, "/serviceAccount/name"),
    ],
)
def test_values_that_cannot_make_a_valid_name_are_refused_by_the_schema(
    chart: helm.Chart, values: dict[str, Any], where: str
) -> None:
    assert where in refusal(chart, values)
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


@pytest.mark.parametrize("suffix", ["-metrics", "-redis"])
def test_a_fullname_that_truncation_would_make_clash_is_refused(
    chart: helm.Chart, suffix: str
) -> None:
    fullname = "g" * (63 - len(suffix)) + suffix  # cut and suffixed, it is itself again
    assert "fullnameOverride" in refusal(chart, {**EVERYTHING, "fullnameOverride": fullname})


@pytest.mark.parametrize("release", ["1edge", "edge.prod"])
def test_a_release_name_that_is_no_service_name_is_refused_with_the_way_out(
    chart: helm.Chart, release: str
) -> None:
    """Helm allows these release names; a Service may not be named after them."""
    message = refusal(chart, {}, release=release)
    assert "fullnameOverride" in message
    assert render_as(chart, release, {"fullnameOverride": "edge-gate"})
