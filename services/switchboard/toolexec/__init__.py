"""The toolexec service: server-side function tools behind gRPC.

`registry` defines what a tool is (`Tool`) and holds the registered ones with a
concurrency limit each; `builtins` holds the tools shipped with Switchboard,
written as examples of how to add one; `validation` checks call arguments
against a tool's JSON Schema; `service` is the `ToolExecService` servicer that
turns every call into a typed `ExecuteResponse`. docs/toolexec.md is the user
guide.
"""
