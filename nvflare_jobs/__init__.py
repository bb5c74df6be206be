"""NVFlare jobs for federated fetal brain segmentation (see ``docs/site_admin.md``).

``nvflare_jobs.fetal_brain`` holds the job in NVFlare's own idiom (``model.py``, ``client.py``, ``job.py``) and its
default config; the modules here are what that job wires on the server (round controllers, update guard,
bundle checkpoint writer), on the clients (privacy filters, site policy checks) and around it (POC and
provisioned deployments on loopback, command line).
"""

from nvflare_jobs import ast_guard as _ast_guard

_ast_guard.install()  # CPython gh-106905: see nvflare_jobs/ast_guard.py
