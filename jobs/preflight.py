"""Pre-flight of a run that goes to Ray: the engine's checks (``engine.preflight``) plus the cluster's.

``preflight(spec)`` is called before any run row exists. Besides model, dataset and method it refuses resources
that no node of the cluster has (``num_cpus``/``num_gpus`` asked of one node), since Ray would queue such a run
forever without a word. A cluster that adds nodes on demand (``PEFTLAB_CLUSTER_AUTOSCALES=1``) gets a warning
that the run will wait instead. The nodes are read from the dashboard's state API
(``GET <dashboard>/api/v0/nodes``) with the cluster's auth token, the same way the job client talks to it.
"""

from __future__ import annotations

import os

import requests

from engine.errors import UserError
from engine.preflight import PreflightError
from engine.preflight import check as engine_check
from engine.spec import RunSpec, parse_spec
from jobs import cluster

AUTOSCALES_ENV = "PEFTLAB_CLUSTER_AUTOSCALES"
NODES_TIMEOUT_S = 5.0
START_HINT = "start it with python -m jobs.cluster start or ./run_app.sh, or set RAY_ADDRESS"


def preflight(spec: RunSpec | dict) -> list[str]:
    """Warnings for a spec that can be submitted, or a ``UserError`` naming the field (or the cluster) and the fix."""
    spec = parse_spec(spec)
    return check_resources(spec) + engine_check(spec)  # the cluster first: a head that is down is found at once


def autoscales() -> bool:
    return os.environ.get(AUTOSCALES_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def cluster_nodes() -> tuple[str, list[dict[str, float]] | None]:
    """(dashboard address, the resources of every live node), or None for the nodes when the cluster does not
    say (then resources are not checked). Raises a ``UserError`` when no cluster answers."""
    try:
        address = cluster.dashboard_address()
    except RuntimeError as err:  # a cluster module that reports a missing head without a UserError
        raise UserError(f"no Ray cluster: {START_HINT}") from err
    if not address.startswith(("http://", "https://")):
        return address, None  # not a dashboard URL (e.g. ray://): the job client resolves it; no node listing
    token = cluster.auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = requests.get(
            f"{address.rstrip('/')}/api/v0/nodes", params={"detail": "1", "limit": "10000"}, headers=headers,
            timeout=NODES_TIMEOUT_S,
        )  # fmt: skip
    except requests.RequestException:
        raise UserError(f"no Ray cluster at {address}: {START_HINT}") from None
    if response.status_code in (401, 403):
        raise UserError(
            f"the Ray cluster at {address} refused the auth token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to its "
            "token"
        )
    try:
        rows = response.json()["data"]["result"]["result"]
    except (ValueError, KeyError, TypeError):
        return address, None
    return address, [
        {k: float(v) for k, v in (row.get("resources_total") or {}).items()}
        for row in rows
        if row.get("state") == "ALIVE"
    ]


def _amount(value: float, unit: str) -> str:
    return f"{value:g} {unit}" + ("" if value == 1 else "s")


def check_resources(spec: RunSpec | dict) -> list[str]:
    """Refuse CPUs/GPUs that fit no live node of the cluster (warn instead when it autoscales)."""
    spec = parse_spec(spec)
    return check_fit(spec.resources.num_cpus, spec.resources.num_gpus)


def check_fit(cpus: float, gpus: float) -> list[str]:
    """``check_resources`` for one run's CPUs and GPUs."""
    address, nodes = cluster_nodes()
    if nodes is None:
        return [f"resources: the cluster at {address} did not list its nodes; resources were not checked"]
    if any(n.get("CPU", 0.0) >= cpus and n.get("GPU", 0.0) >= gpus for n in nodes):
        return []
    most_cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    most_gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    where = f"the cluster at {address}"
    if not nodes:
        message = f"resources: {where} has no live node; {START_HINT}"
    elif gpus > 0 and most_gpus == 0:
        message = (
            f"resources.num_gpus: {_amount(gpus, 'GPU')} asked, but no node of {where} has a GPU; set "
            "resources.num_gpus: 0"
        )
    elif gpus > most_gpus:
        message = (
            f"resources.num_gpus: {_amount(gpus, 'GPU')} asked, but the largest node of {where} has "
            f"{most_gpus:g}; set resources.num_gpus to at most {most_gpus:g}"
        )
    elif cpus > most_cpus:
        message = (
            f"resources.num_cpus: {_amount(cpus, 'CPU')} asked, but the largest node of {where} has "
            f"{most_cpus:g}; set resources.num_cpus to at most {most_cpus:g}"
        )
    else:
        message = (
            f"resources: {_amount(cpus, 'CPU')} and {_amount(gpus, 'GPU')} on one node asked, but no node "
            f"of {where} has both; lower resources.num_cpus or resources.num_gpus"
        )
    if autoscales():
        return [f"{message} (the cluster autoscales: the run will wait until a node that fits joins)"]
    raise PreflightError(message)
