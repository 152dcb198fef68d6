"""The runtime's shared contract: where things live on a host, the loopback ports, the services that
run there, the metric names, the exit codes and the defaults every layer above agrees on.

Everything else (the runtime services, the operator's renderer, the targets, the Pulumi program)
reads these facts from here; none of them re-declares one.
"""
