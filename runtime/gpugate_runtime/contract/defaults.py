"""Defaults the operator's stack spec and the runtime's settings share.

A stack that leaves a key out gets these, and so does a runtime service started without a rendered
env file; the spec (gpugate/spec.py) and the settings models both take them from here.
"""

from __future__ import annotations

# Loopback ports of a host's internal services start here (PortsSpec.internal_base).
INTERNAL_PORT_BASE = 18000
HTTPS_PORT = 443
HTTP_PORT = 80

# Per client key (KeyLimits).
KEY_RPM = 600
KEY_MAX_CONCURRENT = 8
KEY_MAX_BODY_KIB = 1024
KEY_EXPIRES_DAYS = 90
KEY_ROTATION_DAYS = 90
KEY_ROTATION_OVERLAP_HOURS = 24

# Prometheus keeps this much history on a host (local and VM alike).
PROMETHEUS_RETENTION = "15d"
