"""The Ray cluster runs execute on: a local head started by PEFT Lab, or any cluster through ``RAY_ADDRESS``.

The local head is started explicitly (``ray start --head --block`` in its own process group, dashboard on
127.0.0.1, token authentication on) rather than by a bare ``ray.init()``, which can attach to a stale
cluster. Its address and token live under ``$PEFTLAB_HOME/ray``; stopping it kills exactly that process group.

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

STARTUP_TIMEOUT_S = 90
QUEUE_TIMEOUT_S = 7 * 24 * 3600  # how long a submitted run may wait in Ray's queue for free CPUs/GPUs


def ray_dir() -> Path:
    path = config.home() / "ray"
    path.mkdir(parents=True, exist_ok=True)
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
    if os.environ.get("RAY_ADDRESS"):
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


def dashboard_address() -> str:
    """The Jobs API address: ``RAY_ADDRESS`` if set, else the running local head's."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    state = _read_state()
    if not state or not _alive(state["pid"]):
        raise RuntimeError("no Ray cluster: start the local head (python -m jobs.cluster start) or set RAY_ADDRESS")
    return state["dashboard"]


def is_local() -> bool:
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
        return state["dashboard"]
    if state:
        stop_local_head()  # stale: a dead or unresponsive head of ours
    gcs_port, dash_port = _free_port(), _free_port()
    # Unix socket paths are limited to ~107 bytes: keep Ray's temp dir short, one per PEFT Lab home.
    temp_dir = Path(tempfile.gettempdir()) / f"peftlab-ray-{hashlib.sha1(str(config.home()).encode()).hexdigest()[:8]}"
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
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file())}
    # Ray fails a job still waiting for resources after 15 min; runs queued behind others must wait their turn.
    env.setdefault("RAY_JOB_START_TIMEOUT_SECONDS", str(QUEUE_TIMEOUT_S))
    env.pop("RAY_AUTH_TOKEN", None)
    log = open(ray_dir() / "head.log", "ab")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash_port}"
    state_file().write_text(json.dumps({"pid": proc.pid, "dashboard": address, "gcs_port": gcs_port}))
    if not _responds(STARTUP_TIMEOUT_S):
        stop_local_head()
        raise RuntimeError(f"the local Ray head did not come up in {STARTUP_TIMEOUT_S}s; see {ray_dir() / 'head.log'}")
    return address


def stop_local_head() -> bool:
    """Stop the local head started by ``start_local_head`` (its whole process group). Returns True if one ran."""
    state = _read_state()
    state_file().unlink(missing_ok=True)
    if not state or not _alive(state["pid"]):
        return False
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
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--num-cpus", type=int)
    parser.add_argument("--num-gpus", type=int)
    args = parser.parse_args(argv)
    if args.action == "start":
        print(start_local_head(args.num_cpus, args.num_gpus))
    elif args.action == "stop":
        print("stopped" if stop_local_head() else "no local head running")
    else:
        try:
            address = dashboard_address()
            print(f"{address} {'up' if _responds(3) else 'not responding'}")
        except RuntimeError as err:
            print(err)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
