"""What every service tells its operators: logs, traces and metrics.

- `logs`: structured JSON log lines on stderr, one event per line, no secrets
  (`configure_logging`).
- `tracing`: OpenTelemetry spans exported over OTLP/HTTP when configured
  (`configure_tracing`), and the span attributes the services share.
- `metrics`: one way to declare a service's Prometheus metrics under the
  `switchboard` namespace, its subsystem and a registry of its own
  (`MetricFactory`).

The package itself imports nothing; import the module you need.
"""
