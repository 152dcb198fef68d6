"""Bundle rendering: the target-neutral files of a stack (Caddyfile, vLLM launch spec, Prometheus,
alert rules, Alertmanager, runtime settings, dashboards) and the bundle they are collected in.

The targets (gpugate.local, gpugate.vm, gpugate.kubernetes) add their own process definitions,
each generated from the runtime contract's service table.
"""
