"""Switchboard's Grafana dashboards, generated into deploy/grafana/dashboards.

`python -m tools.dashboards` (`make dashboards`) writes one JSON file per
dashboard; tests/deploy/test_dashboards.py fails when the committed files
differ from what the generator writes, and validates them against Grafana's
dashboard schema.
"""
