"""The toolexec service: server-side function tools behind gRPC.

- `registry`: what a tool is (`Tool`, `CallInfo`) and the `Registry` of built-ins.
- `builtins`: the tools shipped with Switchboard, written as examples.
- `validation`: call arguments checked against a tool's JSON Schema (Draft 2020-12).
- `tools_config`: the tools file, which tenant may use which built-in, and
  each tenant's webhook tools.
- `catalog`: what each tenant may list and call; `LiveCatalog` reloads the file.
- `webhooks`: the HTTP client that calls webhook tools; `signing` signs the
  requests (and `verify_signature` checks them, for receivers); `addresses`
  keeps webhooks away from private addresses.
- `results`: idempotency records, in memory or in Redis across replicas.
- `service`: the `ToolExecService` servicer; `outcomes` builds its answers.

docs/toolexec.md is the user guide.
"""
