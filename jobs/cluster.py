"""The Ray cluster runs execute on: a local head started by PEFT Lab, or any cluster through ``RAY_ADDRESS``.

The local head is started explicitly (``ray start --head --block`` in its own process group, dashboard on
127.0.0.1, token authentication on) rather than by a bare ``ray.init()``, which can attach to a stale
cluster. Its address and token live under ``$PEFTLAB_HOME/ray``; stopping it kills exactly that process group.

Every listener of the local head is on 127.0.0.1 (see ``start_local_head``) and its files are the owner's only.
The head outlives the dashboard: only ``python -m jobs.cluster stop`` stops it, and that first cancels the runs
still active on it, with the reason. A *keeper* job on the cluster (``jobs.keeper``) retries lost runs.

Usage: ``python -m jobs.cluster start|stop|status``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from db import config
from engine.errors import UserError
from jobs import warm_client

STARTUP_TIMEOUT_S = 90
QUEUE_TIMEOUT_S = 7 * 24 * 3600  # how long a submitted run may wait in Ray's queue for free CPUs/GPUs


def ray_dir() -> Path:
    path = config.home() / "ray"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def state_file() -> Path:
    return ray_dir() / "cluster.json"


def token_file() -> Path:
    """The local head's auth token (created once, readable by the owner only)."""
    path = ray_dir() / "auth_token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


def auth_token() -> str | None:
    """Token for the cluster in use: ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, else the local head's."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    if not is_local():
        default = Path.home() / ".ray" / "auth_token"
        return default.read_text().strip() if default.exists() else None
    return token_file().read_text().strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_state() -> dict | None:
    try:
        return json.loads(state_file().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class ClusterDown(UserError):
    """No Ray cluster answers where PEFT Lab looks for one."""


def dashboard_address() -> str:
    """The Jobs API address: the one a PEFT Lab job was given, else ``RAY_ADDRESS``, else the local head's."""
    if os.environ.get("PEFTLAB_RAY_DASHBOARD"):
        return os.environ["PEFTLAB_RAY_DASHBOARD"]
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    state = _read_state()
    if not state or not _alive(state["pid"]):
        raise ClusterDown(
            "no Ray cluster: start the local head with python -m jobs.cluster start (or ./run_app.sh), "
            "or set RAY_ADDRESS to your cluster's dashboard"
        )
    return state["dashboard"]


def is_local() -> bool:
    """True when PEFT Lab manages the head (no ``RAY_ADDRESS``); jobs we start are told which (Ray sets
    ``RAY_ADDRESS`` inside every job)."""
    if os.environ.get("PEFTLAB_RAY_MODE"):
        return os.environ["PEFTLAB_RAY_MODE"] == "local"
    return not os.environ.get("RAY_ADDRESS")


def job_client():
    """A ``JobSubmissionClient`` that sends the auth token."""
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(dashboard_address(), headers=headers)


def _responds(timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            job_client().list_jobs()
            return True
        except Exception:  # noqa: BLE001 - not up yet: any connection error means "try again"
            time.sleep(0.5)
    return False


def start_local_head(num_cpus: int | None = None, num_gpus: int | None = None) -> str:
    """Start (or reuse) the local head; returns the dashboard address. Idempotent."""
    if not is_local():
        return dashboard_address()
    state = _read_state()
    if state and _alive(state["pid"]) and _responds(5):
        warm_client.ensure_server(until_pid=state["pid"])
        ensure_keeper()
        return state["dashboard"]
    if state:
        _kill_head()  # stale: a dead or unresponsive head of ours (its runs are lost; the new keeper retries them)
    gcs_port, dash_port = _free_port(), _free_port()
    # Unix socket paths are limited to ~107 bytes: keep Ray's temp dir short, one per PEFT Lab home.
    # Ray makes its temp folder world-writable (0777); inside a folder of the owner's only (0700) nobody else can
    # reach it.
    private = Path(tempfile.gettempdir()) / f"peftlab-{hashlib.sha1(str(config.home()).encode()).hexdigest()[:8]}"
    private.mkdir(mode=0o700, exist_ok=True)
    private.chmod(0o700)
    temp_dir = private / "ray"
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    # Ray's fixed default ports (agent HTTP 52365, client server 10001, ...) collide when a second head runs
    # on the same machine (another user, a test suite): take free ports for every listener we start.
    for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                 "runtime-env-agent-port", "ray-client-server-port"):  # fmt: skip
        cmd.append(f"--{flag}={_free_port()}")
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    # Ray on Linux replaces --node-ip-address=127.0.0.1 by the machine's address (so GCS, raylet and agents would
    # listen on it, and its metrics exporters on 0.0.0.0) unless clusters are "disabled" for it by this setting,
    # which keeps every listener on loopback. A head like this takes no second node; use RAY_ADDRESS for that.
    env = os.environ | {
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file()), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }  # fmt: skip
    for key in ("RAY_ADDRESS", "PEFTLAB_RAY_DASHBOARD", "PEFTLAB_RAY_MODE"):
        env.pop(key, None)
    # Ray fails a job still waiting for resources after 15 min; runs queued behind others must wait their turn.
    env.setdefault("RAY_JOB_START_TIMEOUT_SECONDS", str(QUEUE_TIMEOUT_S))
    env.pop("RAY_AUTH_TOKEN", None)
    log = open(ray_dir() / "head.log", "ab")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # The warm server imports torch while the head comes up, so the first run starts warm (jobs.warm).
    warm_client.ensure_server(until_pid=proc.pid)
    address = f"http://127.0.0.1:{dash_port}"
    state_file().write_text(json.dumps({"pid": proc.pid, "dashboard": address, "gcs_port": gcs_port}))
    if not _responds(STARTUP_TIMEOUT_S):
        _kill_head()
        raise RuntimeError(f"the local Ray head did not come up in {STARTUP_TIMEOUT_S}s; see {ray_dir() / 'head.log'}")
    ensure_keeper()
    return address


def active_runs() -> list[dict]:
    """Runs of this PEFT Lab home that a cluster is (or should be) working on."""
    from db import store

    return [r for r in store.list_runs(status=("queued", "running", "lost"), limit=None) if r["executor"] == "ray"]


def stop_local_head(reason: str = "the local Ray head was stopped (python -m jobs.cluster stop)") -> bool:
    """Stop the local head: first cancel the runs still active on it (with ``reason``) and stop their jobs, then
    stop its whole process group. Returns True if a head ran."""
    from db import store
    from jobs.runs import job_id

    warm_client.stop_server()
    state = _read_state()
    if not state or not _alive(state["pid"]):
        state_file().unlink(missing_ok=True)
        return False
    client = None
    try:
        client = job_client()
    except Exception:  # noqa: BLE001 - a head that does not answer is stopped all the same
        pass
    for run in active_runs():
        store.finish_run(run["id"], "cancelled", error=reason)
        if client is not None:
            try:
                client.stop_job(job_id(run["id"], run["attempt"]))
            except Exception:  # noqa: BLE001 - already gone
                pass
    _kill_head()
    return True


def _kill_head() -> None:
    state = _read_state()
    state_file().unlink(missing_ok=True)
    if not state or not _alive(state["pid"]):
        return
    pgid = os.getpgid(state["pid"])
    os.killpg(pgid, signal.SIGTERM)
    for _ in range(100):
        if not _alive(state["pid"]):
            break
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)  # whatever ignored SIGTERM (workers, raylet children)
    except ProcessLookupError:
        pass


# --- the keeper: one job per cluster and database that retries lost runs ---------------------------


def keeper_id() -> str:
    return "peftlab-keeper-" + hashlib.sha1(config.db_url().encode()).hexdigest()[:10]


def ensure_keeper() -> str:
    """Start the keeper job for this database on the cluster unless one runs; returns its submission id."""
    client = job_client()
    prefix = keeper_id()
    for job in client.list_jobs():
        if (job.submission_id or "").startswith(prefix) and not job.status.is_terminal():
            return job.submission_id
    from jobs.runs import runtime_env, submit_job, worker_python

    env = runtime_env()
    env["env_vars"] |= {"PEFTLAB_RAY_DASHBOARD": dashboard_address(), "PEFTLAB_RAY_MODE": "local" if is_local() else
                        "remote"}  # fmt: skip
    return submit_job(
        entrypoint=f"exec {worker_python()} -m jobs.keeper",
        submission_id=f"{prefix}-{int(time.time())}",
        entrypoint_num_cpus=0,
        runtime_env=env,
        metadata={"peftlab_keeper": prefix},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--num-cpus", type=int)
    parser.add_argument("--num-gpus", type=int)
    args = parser.parse_args(argv)
    if args.action == "start":
        print(start_local_head(args.num_cpus, args.num_gpus))
    elif args.action == "stop":
        active = len(active_runs()) if _read_state() else 0
        if stop_local_head():
            print(f"stopped the local Ray head; {active} active run(s) cancelled" if active else "stopped")
        else:
            print("no local head running")
    else:
        try:
            address = dashboard_address()
        except ClusterDown as err:
            print(err)
            return 1
        print(f"{address} {'up' if _responds(3) else 'not responding'}; {len(active_runs())} active run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
