"""Real (not mocked) fault injection for tests: network outages, a local S3, a full disk, process trees.

    from helpers.faultinject import TcpProxy, moto_server, s3_env, S3_ENV_UNSET, make_bucket, fast_s3fs, aws_test_env
    from helpers.faultinject import tmpfs, is_mounted, children_of, wait_gone, kill_tree, free_port, reseal

conftest.py builds its S3 fixtures (`aws_env`, `moto`: one moto server per module) on these, and
helpers.train.py its subprocess runs; nothing here is duplicated in a test module.

Why real: the failures tinydist must survive (an S3 endpoint that drops keep-alive connections, a
refused reconnect, ENOSPC in the middle of a checkpoint, a launcher whose workers outlive it) come from
the kernel and from botocore/aiohttp's own connection handling. A mock only reproduces what its author
already expected; a loopback proxy that really closes sockets reproduces what the libraries really do.

Rules every helper here keeps:
- everything binds 127.0.0.1 only, never 0.0.0.0: nothing becomes reachable from outside the machine;
- every loop is bounded in count and in time (poll intervals + deadlines), every join has a timeout,
  every thread is a daemon: a broken test fails or hangs for seconds, never for the CI job's lifetime;
- subprocesses get timeouts.

botocore and environment variables (checked against botocore 1.43, see BOTOCORE_DEFAUT_SESSION_VARIABLES
in botocore/configprovider.py), for subprocesses that reach S3 through `s3_env()`:
- honoured: AWS_ENDPOINT_URL (also AWS_ENDPOINT_URL_S3), AWS_MAX_ATTEMPTS (total attempts, first one
  included), AWS_RETRY_MODE (legacy/standard/adaptive), AWS_DEFAULTS_MODE (e.g. "in-region" makes
  botocore's connect_timeout 1.1 s instead of 60 s), AWS_EC2_METADATA_DISABLED, AWS_DEFAULT_REGION;
- NOT settable by environment: read_timeout / connect_timeout themselves (only via Config). And s3fs
  always passes its own connect_timeout=5 / read_timeout=15 to the client, so AWS_DEFAULTS_MODE does
  not shorten s3fs timeouts at all; s3fs also retries "retryable" errors (connection refused included)
  itself, `S3FileSystem.retries` = 5 times, on top of botocore's attempts. For fast failures in-process
  use `fast_s3fs()`; in a subprocess only the attempt count can be cut (AWS_MAX_ATTEMPTS).
  (Checked: s3fs 2026.9 / aiobotocore 3.10 in a process with these variables gets the endpoint,
  total_max_attempts=2, mode=standard, and still connect_timeout=5, read_timeout=15, retries=5.)

moto's own server (werkzeug) sends `Connection: close` on every response, so through it clients never
pool connections the way they do with real S3; `moto_server(keepalive=True)` serves the same moto app
with HTTP/1.1 keep-alive, for tests about what an outage does to a pooled connection.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import pytest

LOOPBACK = "127.0.0.1"


# ---- ports ------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the kernel's pick for port 0). Racy by nature
    (someone may take it before the caller binds it), which is why TcpProxy binds port 0 itself."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# ---- TCP proxy --------------------------------------------------------------------------------------------


class _Pipe:
    """One proxied connection: the client's socket, the upstream socket and the two pump threads.
    The pumps own the sockets and close them; others only set `aborted` and shutdown(SHUT_RD) (which
    wakes a blocked recv and frees nothing), so no thread ever uses a file descriptor another closed."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.aborted = threading.Event()
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._running = 2

    def abort(self) -> None:
        """Ask for a hard close (RST to both peers) and wake both pumps now."""
        self.aborted.set()
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)

    def pump_done(self) -> bool:
        """Count a finished pump; True for the last one, which then closes both sockets."""
        with self._lock:
            self._running -= 1
            return self._running == 0

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            if self.aborted.is_set():
                # SO_LINGER 0: close() sends RST instead of FIN, so a peer's next read/write fails with
                # ECONNRESET right away (what a crashed load balancer or a dropped NAT entry looks like).
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            with contextlib.suppress(OSError):
                sock.close()


class TcpProxy:
    """A loopback TCP proxy in front of `target` that can cut the network on demand.

        with TcpProxy(("127.0.0.1", moto_port)) as proxy:
            fs = fast_s3fs(proxy.url)
            proxy.down()        # new connections refused, open (keep-alive) ones reset
            proxy.up()          # same port again
            proxy.outage(2.0)   # down now, up by itself 2 s later

    Why a proxy rather than stopping the server: stopping moto loses its state and takes seconds;
    the proxy gives an outage that is instant, repeatable, and exact: a listening socket that is gone
    (ECONNREFUSED, as when a host is up but the service is not) plus RSTs on every open connection
    (as when a load balancer or the peer dies), which is what breaks HTTP keep-alive pools.

    Threads: one accept thread while up, two pump threads per connection. All poll with `poll_s`
    timeouts and stop by `max_lifetime_s` at the latest, so a leaked proxy cannot outlive a test run.
    """

    def __init__(self, target: tuple[str, int], port: int = 0, *, poll_s: float = 0.05,
                 connect_timeout_s: float = 5.0, max_lifetime_s: float = 600.0) -> None:
        self.target = (target[0], int(target[1]))
        self.port = int(port)
        self.poll_s = poll_s
        self.connect_timeout_s = connect_timeout_s
        self.max_lifetime_s = max_lifetime_s
        self.accepted = 0  # connections accepted so far: lets a test prove traffic went through us
        self._deadline = float("inf")
        self._lock = threading.RLock()
        self._listener: Optional[socket.socket] = None
        self._accept_thread: Optional[threading.Thread] = None
        self._accept_stop = threading.Event()
        self._pipes: set[_Pipe] = set()
        self._timers: list[threading.Timer] = []
        self._stopped = False

    # -- public API --

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT`, e.g. for an S3 endpoint_url."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def is_up(self) -> bool:
        with self._lock:
            return self._listener is not None

    @property
    def open_connections(self) -> int:
        """Connections currently being forwarded (a keep-alive pool shows up here between requests)."""
        with self._lock:
            return len(self._pipes)

    def start(self) -> "TcpProxy":
        """Bind 127.0.0.1 (port 0 picks a free one, kept for later up()s) and start forwarding."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("TcpProxy was stopped; make a new one")
            self._deadline = time.monotonic() + self.max_lifetime_s
        self.up()
        return self

    def up(self) -> None:
        """Listen again, on the same port as before (SO_REUSEADDR: the sockets down() closed do not
        block the port). No-op when already up."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("TcpProxy was stopped")
            if self._listener is not None:
                return
            listener = self._bind()
            self.port = listener.getsockname()[1]
            self._listener = listener
            self._accept_stop = threading.Event()
            self._accept_thread = threading.Thread(target=self._accept_loop, args=(listener, self._accept_stop),
                                                   name=f"TcpProxy-accept-{self.port}", daemon=True)
            self._accept_thread.start()

    def down(self, join_timeout_s: float = 5.0) -> None:
        """Cut the network: close the listening socket (new connects are REFUSED at once, they do not
        hang) and reset every open connection on both sides. Returns once that is done, so the caller
        can rely on it from the next line on."""
        with self._lock:
            listener, thread, stop = self._listener, self._accept_thread, self._accept_stop
            self._listener = None
            self._accept_thread = None
        if listener is not None:
            stop.set()
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread, which closes it
            if thread is not None:
                thread.join(join_timeout_s)
            with contextlib.suppress(OSError):
                listener.close()  # the accept thread normally did already; closing twice is harmless
        with self._lock:
            pipes = list(self._pipes)  # after the join: no pipe can appear any more
        for pipe in pipes:
            pipe.abort()
        deadline = time.monotonic() + join_timeout_s
        for pipe in pipes:
            for t in pipe.threads:
                t.join(max(0.0, deadline - time.monotonic()))

    def outage(self, seconds: float) -> threading.Timer:
        """down() now, up() again after `seconds` from a background timer (returned; stop() cancels it)."""
        self.down()
        timer = threading.Timer(seconds, self._timed_up)
        timer.daemon = True
        with self._lock:
            self._timers = [t for t in self._timers if t.is_alive()] + [timer]
        timer.start()
        return timer

    def stop(self, join_timeout_s: float = 5.0) -> None:
        """Close everything (pending outage timers included) and join the threads, with a timeout."""
        with self._lock:
            self._stopped = True
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        for timer in timers:
            timer.join(join_timeout_s)
        self.down(join_timeout_s)

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- internals --

    def _timed_up(self) -> None:
        with contextlib.suppress(RuntimeError):  # stopped meanwhile: stay down
            self.up()

    def _bind(self) -> socket.socket:
        """Bind the listener; a few bounded retries, since a client's ephemeral port may briefly sit on
        ours (EADDRINUSE) right after down()."""
        last: Optional[OSError] = None
        for _ in range(50):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((LOOPBACK, self.port))
                sock.listen(128)
                sock.settimeout(self.poll_s)
                return sock
            except OSError as e:
                sock.close()
                last = e
                if e.errno != errno.EADDRINUSE or self.port == 0:
                    raise
                time.sleep(0.05)
        raise OSError(f"TcpProxy could not listen on {LOOPBACK}:{self.port} again") from last

    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        try:
            while not stop.is_set() and time.monotonic() < self._deadline:
                try:
                    client, _ = listener.accept()
                except socket.timeout:
                    continue
                except OSError:
                    break  # shut down by down()
                if stop.is_set():
                    _reset(client)
                    break
                self._start_pipe(client)
        finally:
            with contextlib.suppress(OSError):
                listener.close()

    def _start_pipe(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=self.connect_timeout_s)
        except OSError:
            _reset(client)  # target down: the client sees a reset, as with a dead backend behind an LB
            return
        for sock in (client, upstream):
            sock.settimeout(self.poll_s)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe = _Pipe(client, upstream)
        pipe.threads = [
            threading.Thread(target=self._pump, args=(pipe, client, upstream), daemon=True,
                             name=f"TcpProxy-{self.port}-up"),
            threading.Thread(target=self._pump, args=(pipe, upstream, client), daemon=True,
                             name=f"TcpProxy-{self.port}-down"),
        ]
        with self._lock:
            self._pipes.add(pipe)
            self.accepted += 1
        for t in pipe.threads:
            t.start()

    def _pump(self, pipe: _Pipe, src: socket.socket, dst: socket.socket) -> None:
        """Copy src -> dst until EOF (then half-close dst, as TCP would), an error (then abort the
        whole connection), abort() or the proxy's deadline."""
        try:
            while not pipe.aborted.is_set() and time.monotonic() < self._deadline:
                try:
                    data = src.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    pipe.abort()
                    return
                if not data:
                    if not pipe.aborted.is_set():
                        with contextlib.suppress(OSError):
                            dst.shutdown(socket.SHUT_WR)
                    return
                if not self._send_all(pipe, dst, data):
                    pipe.abort()
                    return
            pipe.abort()  # aborted, or past the deadline
        finally:
            if pipe.pump_done():
                pipe.close()
                with self._lock:
                    self._pipes.discard(pipe)

    def _send_all(self, pipe: _Pipe, dst: socket.socket, data: bytes) -> bool:
        """sendall() that still notices abort() while the peer is not reading (bounded by the deadline)."""
        view = memoryview(data)
        while view and not pipe.aborted.is_set() and time.monotonic() < self._deadline:
            try:
                view = view[dst.send(view):]
            except socket.timeout:
                continue
            except OSError:
                return False
        return not view


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.close()


# ---- S3 (moto) --------------------------------------------------------------------------------------------

# What a subprocess must not inherit when it talks to the local S3: a profile, session token or proxy
# from the developer's shell would send it elsewhere (aws_test_env() clears them in-process).
# Pass as `train_env(s3_env(url), unset=S3_ENV_UNSET)`.
S3_ENV_UNSET: tuple[str, ...] = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY",
                                 "http_proxy", "https_proxy")


@contextlib.contextmanager
def moto_server(port: Optional[int] = None, *, keepalive: bool = False) -> Iterator[str]:
    """moto's S3 (and the rest of AWS) as a real HTTP server on 127.0.0.1; yields its endpoint URL.
    A server, not `mock_aws`: subprocesses (training runs) and s3fs's aiohttp need a real socket.

    keepalive=False: moto's own ThreadedMotoServer (conftest.py's `moto` fixture). Its werkzeug dev
    server answers every request with `Connection: close`, so clients never reuse a connection, which
    real S3 does. keepalive=True serves the same moto app over HTTP/1.1 keep-alive (see
    _KeepAliveMotoHandler), so a test can see what a pooled connection cut by an outage does."""
    port = port or free_port()
    if not keepalive:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address=LOOPBACK, port=port, verbose=False)
        server.start()
        try:
            yield f"http://{LOOPBACK}:{port}"
        finally:
            server.stop()
        return

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    wsgi = make_server(LOOPBACK, port, DomainDispatcherApplication(create_backend_app), threaded=True,
                       request_handler=_keepalive_handler())
    thread = threading.Thread(target=wsgi.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                              name=f"moto-keepalive-{port}")
    thread.start()
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        wsgi.shutdown()
        wsgi.server_close()
        thread.join(5)


def _keepalive_handler() -> type:
    """moto's werkzeug request handler, made to keep connections alive (built lazily: importing moto
    is slow and only S3 tests need it).

    werkzeug closes every connection because, after the app, it drains whatever the client sent,
    which with keep-alive could be the next request. Here the request body is read fully (by its
    Content-Length) before the app runs and the response gets an exact Content-Length, so there is
    nothing to drain and no ambiguity where the next request starts. Chunked request bodies (rare
    for S3 clients) fall back to werkzeug's close-after-response path."""
    import io

    from moto.moto_server.werkzeug_app import MotoRequestHandler

    class _KeepAliveMotoHandler(MotoRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 60  # an idle keep-alive connection's thread ends after this (bounded, like the rest)

        def log_request(self, *args: Any, **kwargs: Any) -> None:
            pass

        def run_wsgi(self) -> None:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                return super().run_wsgi()
            if (self.headers.get("Expect") or "").lower().strip() == "100-continue":
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            environ = self.environ = self.make_environ()
            length = int(self.headers.get("Content-Length") or 0)
            environ["wsgi.input"] = io.BytesIO(self.rfile.read(length) if length > 0 else b"")
            reply: dict[str, Any] = {}

            def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
                reply["status"], reply["headers"] = status, headers
                return lambda data: reply.setdefault("written", []).append(data)

            try:
                result = self.server.app(environ, start_response)
                try:
                    body = b"".join([*reply.get("written", []), *result])
                finally:
                    if hasattr(result, "close"):
                        result.close()
            except Exception as e:  # what werkzeug would turn into a 500 too
                reply = {"status": "500 INTERNAL SERVER ERROR", "headers": []}
                body = repr(e).encode()
                self.close_connection = True
            code_text, _, reason = reply["status"].partition(" ")
            code = int(code_text)
            no_body = self.command == "HEAD" or code in (204, 304) or code < 200
            self.send_response_only(code, reason)
            for key, value in reply["headers"]:
                lowered = key.lower()
                if lowered in ("connection", "transfer-encoding") or (lowered == "content-length" and not no_body):
                    continue
                self.send_header(key, value)
            if not no_body:
                self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if not no_body:
                self.wfile.write(body)
            self.wfile.flush()

    return _KeepAliveMotoHandler


@contextlib.contextmanager
def aws_test_env(endpoint: Optional[str] = None) -> Iterator[None]:
    """This process's environment, for the block, as s3_env() gives a subprocess: moto's test credentials
    and region, no instance metadata, no proxy for loopback, and nothing from the developer's shell
    (S3_ENV_UNSET, AWS_ENDPOINT_URL) that could send boto3/s3fs elsewhere. With `endpoint`,
    AWS_ENDPOINT_URL points at it; without, clients must be given their endpoint_url. Attempt counts
    and retry modes stay botocore's defaults in-process."""
    patch = pytest.MonkeyPatch()
    try:
        patch.delenv("AWS_ENDPOINT_URL", raising=False)
        for key in S3_ENV_UNSET:
            patch.delenv(key, raising=False)
        for key, value in s3_env(endpoint or "", max_attempts=None, retry_mode=None).items():
            if key != "AWS_ENDPOINT_URL" or endpoint:
                patch.setenv(key, value)
        yield
    finally:
        patch.undo()


def s3_env(endpoint: str, *, max_attempts: Optional[int] = 2, retry_mode: Optional[str] = "standard",
           defaults_mode: Optional[str] = None) -> dict[str, str]:
    """Environment for a subprocess to reach S3 at `endpoint` (aws_test_env() sets the same in-process).

    AWS_MAX_ATTEMPTS / AWS_RETRY_MODE are honoured by botocore (so by boto3, aiobotocore and s3fs):
    2 attempts keeps a failing run's S3 calls to seconds. AWS_DEFAULTS_MODE="in-region" sets botocore's
    connect timeout to 1.1 s, but not for s3fs, which always sets its own (5 s); None leaves it unset.
    There is no environment variable for read/connect timeouts themselves."""
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": endpoint,
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    if max_attempts is not None:
        env["AWS_MAX_ATTEMPTS"] = str(max_attempts)
    if retry_mode is not None:
        env["AWS_RETRY_MODE"] = retry_mode
    if defaults_mode is not None:
        env["AWS_DEFAULTS_MODE"] = defaults_mode
    return env


def make_bucket(endpoint: str, name: Optional[str] = None) -> str:
    """Create a bucket (a fresh random name by default, so tests never see each other's keys)."""
    import boto3

    name = name or f"tinydist-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return name


def fast_s3fs(endpoint: str, *, attempts: int = 1, s3fs_retries: int = 2, connect_timeout: float = 2,
              read_timeout: float = 5, **kwargs: Any) -> Any:
    """An s3fs.S3FileSystem on `endpoint` that fails in seconds, not minutes, when S3 is unreachable.

    Three retry layers multiply: botocore's attempts (config retries.max_attempts), s3fs's own
    `retries` loop around every call (default 5, with 0.1-1.7**i s sleeps, connection errors included)
    and the timeouts. skip_instance_cache: s3fs caches instances by arguments, and a cached one would
    carry another test's connection pool (and loop) into this one."""
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": endpoint,
                                                                          "region_name": "us-east-1"},
                           config_kwargs={"retries": {"max_attempts": attempts}, "connect_timeout": connect_timeout,
                                          "read_timeout": read_timeout},
                           skip_instance_cache=True, **kwargs)
    fs.retries = s3fs_retries
    return fs


# ---- a checkpoint edited by hand --------------------------------------------------------------------------


def reseal(folder: str | os.PathLike[str]) -> None:
    """Fix up every checksum of a hand-edited checkpoint folder (state.json's file list and the COMMITTED
    marker), as a careful someone would: what fails afterwards fails because of the edit itself."""
    folder = Path(folder)
    state = json.loads((folder / "state.json").read_text())
    for name in state["files"]:
        data = (folder / name).read_bytes()
        state["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    data = json.dumps(state).encode()
    (folder / "state.json").write_bytes(data)
    (folder / "COMMITTED").write_text(hashlib.sha256(data).hexdigest() + "\n")


# ---- a small, full disk -----------------------------------------------------------------------------------


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a mount point right now (per /proc/self/mountinfo)."""
    target = str(Path(path).resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f if len(line.split()) > 4)


@contextlib.contextmanager
def tmpfs(path: str | os.PathLike[str], size_bytes: int, timeout_s: float = 10.0) -> Iterator[Path]:
    """Mount a tmpfs of `size_bytes` on `path` (created if missing) for the block: a real filesystem
    that runs out of space (ENOSPC from write/fsync), which no mock of open() reproduces faithfully.

    pytest.skip()s, with mount's own words, where mounting is not permitted (not root, no CAP_SYS_ADMIN
    in a container, `mount` missing). Unmounts on exit; `umount -l` (lazy) if a file is still open."""
    if size_bytes <= 0:
        raise ValueError(f"size_bytes must be positive, got {size_bytes}")
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("tmpfs: no `mount` command on this machine")
    where = Path(path)
    where.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={int(size_bytes)},mode=0755", "tmpfs", str(where)],
                           capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.skip(f"tmpfs: `mount` did not return within {timeout_s} s")
    if r.returncode != 0:
        reason = (r.stderr or r.stdout).strip() or f"exit status {r.returncode}"
        pytest.skip(f"tmpfs: cannot mount here (uid {os.geteuid()}): {reason}")
    try:
        yield where
    finally:
        umount = shutil.which("umount") or "umount"
        try:
            done = subprocess.run([umount, str(where)], capture_output=True, timeout=timeout_s).returncode == 0
        except subprocess.TimeoutExpired:
            done = False
        if not done:
            subprocess.run([umount, "-l", str(where)], capture_output=True, timeout=timeout_s)


# ---- process trees ----------------------------------------------------------------------------------------


def _direct_children(pid: int) -> list[int]:
    """Children of every thread of `pid` (/proc/PID/task/*/children; a child belongs to the thread
    that forked it). Falls back to scanning /proc/*/stat where the kernel lacks CONFIG_PROC_CHILDREN."""
    files = glob.glob(f"/proc/{pid}/task/*/children")
    if files:
        kids: list[int] = []
        for name in files:
            try:
                with open(name) as f:
                    kids.extend(int(x) for x in f.read().split())
            except (OSError, ValueError):
                continue  # the thread or process exited meanwhile
        return kids
    if not os.path.exists(f"/proc/{pid}"):
        return []
    kids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                kids.append(int(stat.split("/")[2]))
        except (OSError, IndexError, ValueError):
            continue
    return kids


def children_of(pid: int, max_count: int = 10000) -> list[int]:
    """All descendants of `pid` (children, grandchildren, ...), breadth first, not `pid` itself.
    Why: a launcher's workers (torchrun, accelerate) must be checked or killed too, not just the
    process the test started. Bounded by `max_count` and by a visited set (pids can be reused)."""
    seen: set[int] = {pid}
    order: list[int] = []
    queue = [pid]
    while queue and len(order) < max_count:
        for child in _direct_children(queue.pop(0)):
            if child not in seen and len(order) < max_count:
                seen.add(child)
                order.append(child)
                queue.append(child)
    return order


def _alive(pid: int) -> bool:
    """Exists and is not a zombie: a zombie has exited, it only waits for its parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pids: Iterable[int], timeout: float, poll_s: float = 0.05) -> list[int]:
    """Wait until none of `pids` is alive (zombies count as gone); returns those still alive at
    `timeout` (empty list: all gone), so a test can assert on it and print them."""
    left = [p for p in pids if _alive(p)]
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        left = [p for p in left if _alive(p)]
    return left


def kill_tree(pid: int, sig: int = signal.SIGKILL, timeout: float = 5.0) -> list[int]:
    """Send `sig` to `pid` and all its descendants (found before signalling, since killed parents'
    children get reparented and would be lost); returns those still alive after `timeout`."""
    tree = [pid] + children_of(pid)
    for p in reversed(tree):  # leaves first: a dying parent cannot respawn a killed worker
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)
    return wait_gone(tree, timeout)
