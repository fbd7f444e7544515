"""Warm starts (``jobs.warm``, ``jobs.warm_client``): runs on the local head are forked from a server that has
torch imported, and behave as cold workers do: metrics, logs in Ray, cancel, a killed job process, stale code.

Everything is real: the session's local Ray head, the warm server process, its forked workers, SIGKILL.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from db import config, store
from jobs import cluster, warm_client
from jobs.runs import cancel_run, entrypoint_module, submit_run
from jobs.worker import SUPERVISOR_POLL_S, Watchdog
from tests.conftest import ROOT, final, gone, last_step, long_spec, tiny_spec, wait_for, worker_pid

DETECT_S = 30.0  # as in test_faults: a dead worker, or a dead job process, is noticed within this


def warm_server() -> int:
    """The pid of this home's warm server running the current code, started if there is none."""
    warm_client.ensure_server(until_pid=warm_client.head_pid())
    return wait_for(lambda: (answer := warm_client.ping()) and answer["ok"], timeout=240)


def server_log() -> str:
    return (warm_client.warm_dir() / "server.log").read_text()


def client_of(run_id: str) -> psutil.Process:
    """The Ray job's own process for the run: the warm client Ray's supervisor started."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "jobs.warm_client" in cmdline and run_id in cmdline:
            return proc
    raise AssertionError(f"no warm client for {run_id}")


# --- without Ray ---------------------------------------------------------------------------------------


def test_fingerprint_follows_the_source_files(tmp_path):
    (tmp_path / "engine" / "__pycache__").mkdir(parents=True)
    (tmp_path / "engine" / "a.py").write_text("")
    before = warm_client.fingerprint(tmp_path)
    (tmp_path / "engine" / "__pycache__" / "a.cpython-311.py").write_text("")  # caches do not count
    (tmp_path / "engine" / "notes.txt").write_text("")
    assert warm_client.fingerprint(tmp_path) == before
    (tmp_path / "engine" / "b.py").write_text("")
    added = warm_client.fingerprint(tmp_path)
    assert added != before and added.endswith(":2")
    stat = (tmp_path / "engine" / "a.py").stat()
    os.utime(tmp_path / "engine" / "a.py", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9 * 3600))
    assert warm_client.fingerprint(tmp_path) != added


def test_a_forked_worker_is_orphaned_when_its_client_process_dies():
    """The watchdog of a forked worker watches its client by pid; a killed client that is not reaped yet (a zombie)
    counts as gone, and so does a pid that is gone already."""
    client = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    watchdog = Watchdog("run-x", 1, print, parent_pid=None, head=None, supervisor_pid=client.pid)
    try:
        assert not watchdog.orphaned()
        client.kill()
        wait_for(lambda: psutil.Process(client.pid).status() == psutil.STATUS_ZOMBIE, timeout=10, every=0.05)
        time.sleep(SUPERVISOR_POLL_S)
        assert watchdog.orphaned()
    finally:
        client.wait()
    assert Watchdog("run-y", 1, print, parent_pid=None, head=None, supervisor_pid=client.pid).orphaned()


@pytest.mark.slow
def test_without_a_server_the_client_runs_the_cold_worker_and_starts_one(lab_env):
    """No server answers: the run does not wait for one (the client becomes ``python -m jobs.worker``), and the
    next runs find a server it started; that one forks the next run's worker, whose output is the client's."""
    from engine.spec import parse_spec

    def run_through_client() -> tuple[str, subprocess.CompletedProcess]:
        run_id = store.create_run(parse_spec(tiny_spec(train={"max_steps": 2})).model_dump(mode="json"),
                                  executor="inline")  # fmt: skip
        out = subprocess.run([sys.executable, "-m", "jobs.warm_client", "--run-id", run_id, "--attempt", "1"],
                             cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
        return run_id, out

    try:
        cold, out = run_through_client()
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert store.get_run(cold)["status"] == "succeeded"
        assert f"run {cold} attempt 1: lora on tiny-bert" in out.stdout  # the cold worker's output
        server = wait_for(lambda: (answer := warm_client.ping()) and answer["ok"], timeout=240)
        assert cold not in server_log()

        warm, out = run_through_client()
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        run = store.get_run(warm)
        assert run["status"] == "succeeded" and run["summary"]["startup_s"] > 0
        assert f"run {warm} attempt 1: lora on tiny-bert" in out.stdout  # the forked worker's output
        assert f"warm server {server}: forked worker {worker_pid(warm)} for client" in server_log()
        assert f"--run-id {warm} --attempt 1" in server_log()
        assert f"worker {worker_pid(warm)} exited with 0" in server_log()
    finally:
        warm_client.stop_server()
    assert wait_for(lambda: warm_client.server_pid() is None, timeout=30)


# --- on the local head -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_is_forked_by_the_warm_server_and_succeeds_with_its_metrics_and_log(ray_lab):
    server = warm_server()
    assert entrypoint_module() == "jobs.warm_client"
    run_id = submit_run(long_spec(steps=300))
    wait_for(lambda: last_step(run_id) >= 5, timeout=300, every=0.1)
    assert psutil.Process(worker_pid(run_id)).ppid() == server
    run = wait_for(lambda: final(run_id), timeout=600)
    assert (run["status"], run["attempt"]) == ("succeeded", 1), run["error"]
    assert store.get_metrics([run_id], keys=["train_loss"])["step"].tolist() == list(range(1, 301))
    client = cluster.job_client()
    wait_for(lambda: str(client.get_job_status(run_id)) == "SUCCEEDED", timeout=60)
    logs = client.get_job_logs(run_id)
    assert f"run {run_id} attempt 1: lora on tiny-bert" in logs and "succeeded: {'eval_loss'" in logs
    assert "first training step" in logs and run["summary"]["startup_s"] > 0


@pytest.mark.slow
def test_cancel_stops_a_forked_worker(ray_lab):
    server = warm_server()
    run_id = submit_run(long_spec(steps=2000))
    wait_for(lambda: last_step(run_id) >= 5, timeout=300, every=0.1)
    pid = worker_pid(run_id)
    assert psutil.Process(pid).ppid() == server
    assert cancel_run(run_id)
    wait_for(lambda: gone(pid), timeout=DETECT_S)
    run = store.get_run(run_id)
    assert run["status"] == "cancelled" and run["error"] == "cancelled by the user"
    wait_for(lambda: str(cluster.job_client().get_job_status(run_id)) == "STOPPED", timeout=60)
    time.sleep(6)  # a keeper sweep: a cancelled run stays cancelled
    assert store.get_run(run_id)["status"] == "cancelled"


@pytest.mark.slow
def test_kill_of_the_job_process_orphans_the_forked_worker_and_the_run_is_retried(ray_lab):
    """SIGKILL of the warm client (the Ray job's process): its worker notices within seconds, marks the attempt
    lost as a worker whose supervisor died does, and the keeper retries the run from its checkpoint."""
    warm_server()
    run_id = submit_run(long_spec(steps=300))
    wait_for(lambda: last_step(run_id) >= 30, timeout=300, every=0.1)
    pid = worker_pid(run_id)
    client_of(run_id).kill()
    killed = time.monotonic()
    wait_for(lambda: gone(pid), timeout=DETECT_S, every=0.1)
    assert time.monotonic() - killed < 10
    log = (config.artifacts_root() / run_id / "worker.log").read_text()
    assert "watchdog: stopping: its Ray job supervisor exited" in log
    run = wait_for(lambda: final(run_id), timeout=600)
    assert (run["status"], run["attempt"]) == ("succeeded", 2), run["error"]
    assert store.get_metrics([run_id], keys=["train_loss"])["step"].tolist() == list(range(1, 301))
    assert "resumed from checkpoint at step" in (config.artifacts_root() / run_id / "worker.log").read_text()


@pytest.mark.slow
def test_a_server_with_stale_code_steps_aside_and_the_run_starts_cold(ray_lab):
    old = warm_server()
    source = ROOT / "jobs" / "warm_client.py"
    stat = source.stat()
    newest = max(f.stat().st_mtime_ns for d in warm_client.SOURCE_DIRS for f in (ROOT / d).rglob("*.py"))
    os.utime(source, ns=(stat.st_atime_ns, newest + 10**9))  # as if the file had just been edited, after any other
    try:
        run_id = submit_run(tiny_spec(train={"max_steps": 3}))
        run = wait_for(lambda: final(run_id), timeout=300)
        assert run["status"] == "succeeded", run["error"]
        wait_for(lambda: gone(old), timeout=30)  # no worker of its own left: it exited
        log = server_log()
        assert "stepping aside: the project's source changed" in log
        assert f"--run-id {run_id}" not in log  # the run started cold
        new = wait_for(lambda: (answer := warm_client.ping()) and answer["ok"], timeout=240)
        assert new != old  # the client started a server with the current code
    finally:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.slow
@pytest.mark.skipif(os.getuid() != 0, reason="connecting as another user needs root")
def test_the_server_refuses_another_user(ray_lab, tmp_path_factory):
    """The socket sits in folders of the owner's only. Reached through a hard link in an open folder, the server's
    own check still refuses a client of another uid before reading its request."""
    warm_server()
    path = warm_client.socket_path()
    opened = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp().parent.parent))  # the system's temp folder
    mode = path.stat().st_mode & 0o777
    try:
        opened.chmod(0o711)
        os.link(path, opened / "sock")
        path.chmod(0o777)
        pid = os.fork()
        if pid == 0:  # the other user: connect, ask, and say whether an answer came
            code = 2
            try:
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(10)
                    sock.connect(str(opened / "sock"))
                    try:  # refused: the server closes the connection, before or after the request is sent
                        warm_client.send_msg(sock, {"fingerprint": warm_client.fingerprint(), "ping": True})
                        warm_client.recv_msg(sock)
                        code = 1
                    except ConnectionError:
                        code = 0
            except BaseException as err:  # noqa: BLE001 - say why, in the test's output
                print(f"the other user's client failed: {err!r}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        path.chmod(mode)
        shutil.rmtree(opened)
    assert "refused a connection from uid 65534" in server_log()


@pytest.mark.slow
def test_stopping_the_head_stops_the_warm_server(tmp_path):
    with store.using_home(tmp_path / "home"):
        try:
            cluster.start_local_head(num_cpus=1)
            server = wait_for(lambda: (answer := warm_client.ping()) and answer["ok"], timeout=240)
            assert warm_client.server_pid() == server
        finally:
            cluster.stop_local_head()
        wait_for(lambda: gone(server), timeout=30)
        assert not Path(warm_client.socket_path()).exists()
        assert "stepping aside: stopped (SIGTERM)" in server_log()
