"""The warm server: ``python -m jobs.warm serve [--until-pid PID]``, one per PEFT Lab home.

It imports once what every worker imports (torch, transformers, the engine, ``jobs.worker``), then forks one
worker per request of a warm client (``jobs.warm_client``, a run's Ray job on the local head): the worker starts
with its imports done, and its first training step comes seconds sooner. The server itself runs no torch
operation, so it has no OpenMP or other compute threads that a fork could leave half-copied.

Each forked worker becomes what the cold ``python -m jobs.worker`` would have been: the client's stdout and stderr
(Ray's job log), its environment (``os.environ`` replaced; the torch thread count set from ``OMP_NUM_THREADS``,
as the import has already read the variable), its working directory, fresh database engines, the signal handlers
of a new process, a session of its own, and the client as the process whose death means the attempt is orphaned
(``supervisor_pid``). The server sends the client the worker's pid when it forks it and its exit status when it
reaps it.

The server lives as long as the local head it was started with (``--until-pid``) or until ``SIGTERM``
(``jobs.cluster stop``), and steps aside as soon as a client's source fingerprint differs from the one it
started with (code changed since its imports). Stepping aside means: no new requests, its socket and lock freed
for a new server at once; it exits when the workers it forked have ended.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import os
import selectors
import signal
import socket
import struct
import sys
import time
import traceback

from jobs.warm_client import fingerprint, gone, recv_msg, send_msg, socket_path, warm_dir

# Imported before the first request: what a worker imports up to its first training step (tiny-bert or MiniLM,
# a BERT). Importing runs no torch operation.
PRELOAD = (
    "torch", "torch.optim", "torch._dynamo", "transformers", "transformers.modeling_utils",
    "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
    "transformers.models.bert.modeling_bert", "tokenizers", "safetensors.torch",
    "engine.backends", "engine.methods", "engine.train", "engine.analysis.importance", "jobs.worker",
)  # fmt: skip
LOCK_WAIT_S = 10.0  # a server taking over waits this long for the one stepping aside to free the lock
WATCH_S = 1.0  # how often the server looks at the head it lives with


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} warm server {os.getpid()}: {message}", flush=True)


def preload() -> float:
    started = time.monotonic()
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError as err:  # an optional package missing: the worker imports what it needs itself
            log(f"not preloaded: {name} ({err})")
    return time.monotonic() - started


class Server:
    def __init__(self, until_pid: int | None):
        self.until_pid = until_pid
        self.fingerprint = fingerprint()  # before the imports: code changed while importing counts as stale
        self.selector = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.lock_fd: int | None = None
        self.children: dict[int, socket.socket] = {}  # worker pid -> its client's connection
        self.stop_reason: str | None = None
        self._wakeup = os.pipe()

    # --- life cycle -------------------------------------------------------------------------------------

    def take_lock(self) -> bool:
        """One server per home: an exclusive lock, held while it takes requests."""
        fd = os.open(warm_dir() / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    return False
                time.sleep(0.2)
        self.lock_fd = fd
        (warm_dir() / "server.pid").write_text(str(os.getpid()))
        return True

    def listen(self) -> None:
        path = socket_path()
        path.unlink(missing_ok=True)  # a dead server's (we hold the lock)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        umask = os.umask(0o177)
        try:
            listener.bind(str(path))
        finally:
            os.umask(umask)
        listener.listen(64)
        self.listener = listener
        self.selector.register(listener, selectors.EVENT_READ)

    def step_aside(self, reason: str) -> None:
        """Take no more requests and free the socket and the lock for a new server; exit once the workers end."""
        if self.listener is None:
            return
        log(f"stepping aside: {reason}; {len(self.children)} worker(s) still running")
        self.selector.unregister(self.listener)
        self.listener.close()
        self.listener = None
        socket_path().unlink(missing_ok=True)
        pid_file = warm_dir() / "server.pid"
        if pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def serve(self) -> None:
        read_end, write_end = self._wakeup
        os.set_blocking(read_end, False)
        os.set_blocking(write_end, False)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the select through the pipe
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop_reason", "stopped (SIGTERM)"))
        self.selector.register(read_end, selectors.EVENT_READ)
        while self.listener is not None or self.children:
            for key, _ in self.selector.select(WATCH_S):
                if key.fileobj is self.listener:
                    self.accept()
                else:
                    while True:
                        try:
                            if not os.read(read_end, 512):
                                break
                        except BlockingIOError:
                            break
            self.reap()
            if self.until_pid and gone(self.until_pid):
                self.stop_reason = self.stop_reason or f"the Ray head it served (pid {self.until_pid}) is gone"
            if self.stop_reason:
                self.step_aside(self.stop_reason)
        log("exiting")

    # --- requests ---------------------------------------------------------------------------------------

    def accept(self) -> None:
        assert self.listener is not None
        conn, _ = self.listener.accept()
        fds: list[int] = []
        try:
            conn.settimeout(5.0)
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != os.getuid():
                log(f"refused a connection from uid {uid} (pid {pid}): not this server's user")
                conn.close()
                return
            request, fds = recv_msg(conn, maxfds=2)
            if request.get("fingerprint") != self.fingerprint:
                self.step_aside("the project's source changed since this server imported it")
                send_msg(conn, {"stale": True})
            elif request.get("ping"):
                send_msg(conn, {"ok": os.getpid(), "until_pid": self.until_pid})
            elif len(fds) == 2:
                child = self.fork(request, fds, client_pid=pid, conn=conn)
                log(f"forked worker {child} for client {pid}: {' '.join(request['argv'])}")
                self.children[child] = conn
                send_msg(conn, {"pid": child})
                return
            else:
                log(f"refused a request of pid {pid} without its stdout and stderr")
        except (OSError, ValueError, KeyError) as err:
            log(f"dropped a request: {type(err).__name__}: {err}")
        finally:
            for fd in fds:
                os.close(fd)
        if conn not in self.children.values():
            conn.close()

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            log(f"worker {pid} exited with {code}")
            conn = self.children.pop(pid, None)
            if conn is not None:
                try:
                    send_msg(conn, {"exit": code})
                except OSError:
                    pass  # the client is gone; the worker has seen that itself
                conn.close()

    # --- the forked worker ------------------------------------------------------------------------------

    def fork(self, request: dict, fds: list[int], *, client_pid: int, conn: socket.socket) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            code = self.become_worker(request, fds, client_pid, conn)
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except KeyboardInterrupt:  # end as an interrupted Python does: killed by SIGINT
            traceback.print_exc()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:  # noqa: BLE001 - the worker records its own failures; this is what escaped it
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def become_worker(self, request: dict, fds: list[int], client_pid: int, conn: socket.socket) -> int:
        """In the forked child: turn into the worker the client stands for and run it."""
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.selector.close()
        for sock in (*self.children.values(), conn, self.listener):
            if sock is not None:
                sock.close()
        for fd in (*self._wakeup, self.lock_fd):  # the lock too, or it would outlive the server in its workers
            if fd is not None:
                os.close(fd)
        os.setsid()
        for fd, target in zip(fds, (1, 2)):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

        import psutil
        import torch

        from db import store
        from jobs import worker

        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))
        store.get_engine.cache_clear()
        started = psutil.Process(client_pid).create_time()  # start-up counts from the Ray job's process
        return worker.main(request["argv"], supervisor_pid=client_pid, started=started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.warm", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["serve"])
    parser.add_argument("--until-pid", type=int, help="exit when this process (the local Ray head) is gone")
    args = parser.parse_args(argv)
    server = Server(args.until_pid)
    if not server.take_lock():
        log("another server runs for this home; exiting")
        return 0
    log(f"imported {len(PRELOAD)} modules in {preload():.1f} s")
    server.listen()
    log(f"serving on {socket_path()} (source {server.fingerprint})")
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
