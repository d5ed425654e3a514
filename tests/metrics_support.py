"""The Prometheus naming rules every service's metrics are checked against.

docs/metrics.md: names `switchboard_<service>_...`, counters ending in `_total`,
histograms in their unit, gauges in one of the service's chosen suffixes,
labels from a bounded set, and help text on every metric.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric


def conventional_families(
    registry: CollectorRegistry,
    *,
    service: str,
    gauge_suffixes: tuple[str, ...],
    labels: Collection[str],
    histogram_suffixes: tuple[str, ...] = ("_seconds",),
) -> list[Metric]:
    """Every metric family of `registry`, after asserting that each follows the rules.

    Only labelled families that have samples show their labels: use them first.
    """
    name = re.compile(rf"switchboard_{service}_[a-z][a-z0-9_]*")
    families = list(registry.collect())
    for family in families:
        assert name.fullmatch(family.name), family.name
        if family.type == "counter":
            # prometheus_client strips `_total` from the family name; samples carry it.
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        elif family.type == "histogram":
            assert family.name.endswith(histogram_suffixes), family.name
        else:
            assert family.name.endswith(gauge_suffixes), family.name
        for sample in family.samples:
            used = set(sample.labels) - {"le"}
            assert used <= set(labels), (family.name, used)
        assert family.documentation, family.name
    return families
