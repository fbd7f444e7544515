"""The warm-start entrypoint of a run's Ray job on the local head: ``python -m jobs.warm_client --run-id R ...``.

A cold worker spends most of its start-up importing torch and transformers. The warm server (``jobs.warm``) has
them imported already and forks a worker per run; this client, which imports the standard library only (it starts
in tens of milliseconds), is the Ray job's process: it hands the server the job's arguments, environment, working
directory and its stdout/stderr (so the job's log is the worker's output), forwards Ray's SIGTERM/SIGINT to the
forked worker, and exits with its status. Ray's view of the job is the same as with a cold worker.

A run never waits on the server: if none answers, or the one that answers runs older code than the project's
(``fingerprint``), the client starts a new server for the next runs and replaces itself by the cold worker
(``python -m jobs.worker``). ``PEFTLAB_WARM_START=0`` turns warm starts off.

Security: the socket sits in the home's private (0700) directory, and each side checks that the other runs under
its own uid (``SO_PEERCRED``): the request carries the run's environment, database URL included.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import struct
import sys
import tempfile
from pathlib import Path

from db import config

SOURCE_DIRS = ("app", "engine", "jobs", "db")
MAX_SOCKET_PATH = 100  # bytes; AF_UNIX paths are limited to ~107
POLL_S = 0.5  # how often a waiting client looks at its parent and at a child it lost the server of


def enabled() -> bool:
    return os.environ.get("PEFTLAB_WARM_START", "1") != "0"


def warm_dir() -> Path:
    """The server's pid file, lock and log: in the home, readable by its owner only."""
    return config.private_dir(config.home() / "warm")


def socket_path() -> Path:
    """The server's socket: in ``warm_dir`` when that path fits in a unix socket address, else in the private
    temporary folder of this home that the local Ray head uses too (same 0700 rule)."""
    path = warm_dir() / "sock"
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha1(str(config.home()).encode()).hexdigest()[:8]
    return config.private_dir(Path(tempfile.gettempdir()) / f"peftlab-{digest}") / "warm.sock"


def fingerprint(root: Path = config.PROJECT_ROOT) -> str:
    """The project's source as a server must have imported it: newest mtime and count of the ``.py`` files of the
    packages a worker imports. A server whose fingerprint differs runs stale code."""
    newest, count = 0, 0
    stack = [root / d for d in SOURCE_DIRS]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if entry.name != "__pycache__":
                    stack.append(Path(entry.path))
            elif entry.name.endswith(".py"):
                newest, count = max(newest, entry.stat().st_mtime_ns), count + 1
    return f"{newest}:{count}"


# --- the wire: length-prefixed JSON messages, file descriptors attached to the first ----------------------


def send_msg(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    data = struct.pack("!I", len(data)) + data
    if fds:
        sent = socket.send_fds(sock, [data], fds)
        data = data[sent:]
    sock.sendall(data)


def recv_msg(sock: socket.socket, maxfds: int = 0) -> tuple[dict, list[int]]:
    """One message and the descriptors that came with it; ``ConnectionError`` if the peer closed first."""
    buf = b""
    fds: list[int] = []
    while len(buf) < 4 or len(buf) < 4 + struct.unpack("!I", buf[:4])[0]:
        if maxfds and not fds:
            chunk, fds, _, _ = socket.recv_fds(sock, 1 << 16, maxfds)
        else:
            chunk = sock.recv(1 << 16)
        if not chunk:
            for fd in fds:
                os.close(fd)
            raise ConnectionError("the peer closed the connection")
        buf += chunk
    size = struct.unpack("!I", buf[:4])[0]
    return json.loads(buf[4 : 4 + size]), list(fds)


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return uid


def connect(timeout_s: float = 5.0) -> socket.socket:
    """A connection to this home's server, checked to run under our uid; ``OSError`` if there is none."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(str(socket_path()))
        if peer_uid(sock) != os.getuid():
            raise PermissionError("the warm server's socket belongs to another user")
    except BaseException:
        sock.close()
        raise
    return sock


def ping() -> dict | None:
    """``{"ok": pid, "until_pid": ...}`` of this home's server if one answers and runs the project's current code,
    else None (a stale server that is asked steps aside)."""
    try:
        with connect() as sock:
            send_msg(sock, {"fingerprint": fingerprint(), "ping": True})
            reply, _ = recv_msg(sock)
    except OSError:
        return None
    return reply if "ok" in reply else None


# --- starting and stopping the server ------------------------------------------------------------------------


def head_pid() -> int | None:
    """The local head's pid (``jobs.cluster`` state file), which a server started here lives no longer than."""
    try:
        return int(json.loads((config.home() / "ray" / "cluster.json").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def spawn_server(until_pid: int | None = None) -> None:
    """Start a server for this home, detached (its own session, no parent to outlive: a double fork, so Ray's stop
    of the job that started it does not reach it), logging to ``warm/server.log``. Returns at once; if a server
    runs already the new one finds the lock taken and exits."""
    log = warm_dir() / "server.log"
    argv = [sys.executable, "-m", "jobs.warm", "serve"] + (["--until-pid", str(until_pid)] if until_pid else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(config.PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    for key in ("RAY_JOB_ID", "RAY_SUBMISSION_ID"):  # the server belongs to no job
        env.pop(key, None)
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:  # the intermediate child: a new session, then the server as its child, then exit
        os.setsid()
        if os.fork() == 0:
            null = os.open(os.devnull, os.O_RDONLY)
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            for fd, target in ((null, 0), (out, 1), (out, 2)):
                os.dup2(fd, target)
            os.closerange(3, 1 << 16)
            os.chdir(config.PROJECT_ROOT)
            os.execve(sys.executable, argv, env)
    finally:
        os._exit(0)


def server_pid() -> int | None:
    """The running server's pid (its pid file), if that process is a warm server."""
    try:
        pid = int((warm_dir() / "server.pid").read_text().strip() or 0)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if pid and b"jobs.warm" in cmdline else None


def stop_server() -> bool:
    """SIGTERM to this home's server: it stops taking runs and exits once the workers it forked are done (they
    run on; each stops by its own rules). Returns True if one ran."""
    pid = server_pid()
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def ensure_server(until_pid: int | None = None) -> None:
    """Start a server unless a current one answers that lives with the same head (one that serves another head,
    a stopped one about to be noticed, is told to step aside first)."""
    if not enabled():
        return
    answer = ping()
    if answer is not None and answer.get("until_pid") == until_pid:
        return
    if answer is not None:
        stop_server()
    spawn_server(until_pid)


# --- the client ----------------------------------------------------------------------------------------------


def run_cold(args: list[str]) -> None:
    """Become the cold worker (the same process, so Ray's supervisor is its parent as without warm starts)."""
    os.execv(sys.executable, [sys.executable, "-m", "jobs.worker", *args])


def gone(pid: int) -> bool:
    """The process is gone: no such pid, or a zombie nobody has reaped yet."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def _exit_like(code: int) -> None:
    """Exit as the worker did: with its code, or killed by the same signal (so Ray reports the same)."""
    if code < 0:
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code if code >= 0 else 128 - code)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not enabled():
        run_cold(args)
    try:
        sock = connect()
    except OSError:
        spawn_server(head_pid())
        run_cold(args)
    child: list[int] = []  # the forked worker's pid, once the server has said it
    pending: list[int] = []  # SIGTERM/SIGINT received before that

    def forward(signum: int, _frame) -> None:
        if not child:
            pending.append(signum)
            return
        try:
            os.kill(child[0], signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    request = {"fingerprint": fingerprint(), "argv": args, "env": dict(os.environ), "cwd": os.getcwd()}
    try:
        send_msg(sock, request, fds=[1, 2])
        reply, _ = recv_msg(sock)
    except OSError:
        reply = {}
    if "pid" not in reply:  # stale, or gone before it forked: nothing runs this attempt yet
        sock.close()
        if pending:  # stopped before it started: end as a worker stopped this early would
            _exit_like(-pending[0])
        spawn_server(head_pid())
        run_cold(args)
    child.append(int(reply["pid"]))
    for signum in pending:
        forward(signum, None)
    supervisor = os.getppid()
    while True:
        if os.getppid() != supervisor:
            return 1  # Ray's supervisor is gone: the worker sees this process go and abandons the attempt
        if select.select([sock], [], [], POLL_S)[0]:
            try:
                reply, _ = recv_msg(sock)
            except OSError:
                break
            _exit_like(int(reply["exit"]))
    while not gone(child[0]):  # the server went away mid-run: wait for the worker itself
        if os.getppid() != supervisor:
            return 1
        select.select([], [], [], POLL_S)
    return 1


if __name__ == "__main__":
    sys.exit(main())
