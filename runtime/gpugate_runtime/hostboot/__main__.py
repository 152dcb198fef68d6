"""python3 -m gpugate_hostboot (on a host) or python -m gpugate_runtime.hostboot: fetch and install."""

import sys

from .install import main

sys.exit(main())
