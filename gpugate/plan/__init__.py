"""The offline plan's parts: the resource inventory, capacity, cost and the report that gathers them.

Running the Pulumi program under mocks and evaluating the policy pack is the command-line layer's
job (gpugate/cli/plan.py), the only layer that imports infra/.
"""
