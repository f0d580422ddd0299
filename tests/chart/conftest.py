"""The Helm chart, rendered offline by the real Helm engine (helm-python-sdk, no binary)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest

from .rendering import CHART_DIR, NAMESPACE, RELEASE, Manifest, Render, parse_manifests


@pytest.fixture(scope="session")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart: helm.Chart) -> Render:
    def _render(values: dict[str, Any] | None = None) -> list[Manifest]:
        return parse_manifests(chart.render(values or {}, name=RELEASE, namespace=NAMESPACE))

    return _render
