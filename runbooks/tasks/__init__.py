"""Fabric tasks that carry out the runbooks on a gateway host over SSH; `gpugate run TASK --stack S` runs them.

`fab -r runbooks -c tasks --list` lists them too: `ns` is the collection Fabric loads.
"""

from __future__ import annotations

from invoke import Collection

from runbooks.tasks.keys import revoke_key, rotate_key
from runbooks.tasks.proxy import reload_proxy
from runbooks.tasks.service import drain, restart
from runbooks.tasks.status import logs, status

ns = Collection(status, logs, drain, restart, rotate_key, revoke_key, reload_proxy)
