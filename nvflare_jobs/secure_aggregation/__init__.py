"""Secure aggregation for the fetal brain NVFlare job (issue 20): the server sees only the sum of the sites' updates.

Turned on by one line of the job config, ``"server": {"secure_aggregation": {"enabled": true, "threshold": 2}}``.
The maths is :mod:`privacy.secure_aggregation`; this package carries it over NVFlare:

* :mod:`.client`: a site's executor for the key-agreement and unmasking tasks, a task-data filter that checks the
  key confirmation and the round's participants before the site trains, and the task-result filter that runs
  last (after DP-SGD, percentile, site policy filters) and replaces the update by its masked fixed-point form,
  after the per-site NaN/norm guard that the server can no longer apply.
* :mod:`.server`: the controller mixin that runs key agreement once per job and the unmasking step every round,
  and :class:`~.server.SecureAggregator`, which sums masked inputs and hands FedAvg/FedProx/FedOpt the unmasked
  mean only.
* :mod:`.he`: the second option, ``"method": "he"``: NVFlare's homomorphic encryption (TenSEAL CKKS) with the
  encryptor placed last on every site and checked there, and NVFlare's HE aggregator on the server.
"""

SETUP_TASK = "secagg_setup"  # key agreement: advertise (step "advertise") then shares and tags (step "share")
UNMASK_TASK = "secagg_unmask"  # every round: the survivors' shares
META_KEY = "secagg"  # where protocol messages travel in a DXO's / FLModel's meta
TASKS = [SETUP_TASK, UNMASK_TASK]
