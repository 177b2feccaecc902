"""tests/helpers/faultinject.py does what it claims, for real: the proxy forwards, refuses, resets and recovers
(with raw sockets, http.client keep-alive and s3fs on moto), tmpfs runs out of space, process trees
are found and killed. Each test first shows the working case, so a failure to fail cannot pass."""

from __future__ import annotations

import errno
import http.client
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator

import botocore.exceptions
import pytest

from helpers.faultinject import (TcpProxy, children_of, fast_s3fs, free_port, is_mounted, kill_tree, make_bucket,
                         moto_server, s3_env, tmpfs, wait_gone)

pytestmark = pytest.mark.slow  # the fault injectors themselves: real sockets, moto, tmpfs, process trees


class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the connection stays open between requests

    def do_GET(self) -> None:
        body = f"hello {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_target() -> Iterator[tuple[str, int]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[:2]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def proxy(http_target: tuple[str, int]) -> Iterator[TcpProxy]:
    with TcpProxy(http_target) as p:
        yield p


def _get(port: int, path: str = "/", timeout: float = 5.0) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def _recv_until(sock: socket.socket, marker: bytes, max_reads: int = 20) -> bytes:
    """A response may arrive in several segments (headers, then body): read until `marker`, bounded."""
    data = b""
    for _ in range(max_reads):
        chunk = sock.recv(4096)
        data += chunk
        if marker in data or not chunk:
            break
    return data


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# ---- TcpProxy ---------------------------------------------------------------------------------------------


def test_proxy_forwards_http(proxy: TcpProxy, http_target: tuple[str, int]) -> None:
    assert proxy.port != http_target[1] and proxy.url == f"http://127.0.0.1:{proxy.port}"
    assert _get(proxy.port, "/a") == "hello /a"
    assert proxy.accepted == 1  # it went through the proxy, not around it


def test_down_refuses_new_and_breaks_open_keepalive(proxy: TcpProxy) -> None:
    keepalive = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    keepalive.request("GET", "/1")
    assert keepalive.getresponse().read() == b"hello /1"
    keepalive.request("GET", "/2")  # same connection, still open
    assert keepalive.getresponse().read() == b"hello /2"
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    raw.sendall(b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"hello /3" in _recv_until(raw, b"hello /3")
    assert proxy.accepted == 2 and proxy.open_connections == 2

    t0 = time.monotonic()
    proxy.down()
    assert time.monotonic() - t0 < 2, "down() must not wait for clients"
    assert not proxy.is_up and proxy.open_connections == 0
    assert _refused(proxy.port)  # refused at once, not a hang (create_connection has a 2 s timeout)
    # the raw socket sees the reset (or EOF), not a timeout: it is broken, not stalled
    raw.settimeout(2)
    try:
        assert raw.recv(4096) == b""
    except ConnectionResetError:
        pass
    raw.close()
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        keepalive.request("GET", "/4")
        keepalive.getresponse().read()
    keepalive.close()


def test_up_listens_again_on_the_same_port(proxy: TcpProxy) -> None:
    port = proxy.port
    assert _get(port) == "hello /"
    proxy.down()
    assert _refused(port)
    proxy.up()
    assert proxy.port == port and proxy.is_up
    assert _get(port, "/again") == "hello /again"
    proxy.down()  # and again: down/up cycles are repeatable
    proxy.up()
    assert _get(port, "/third") == "hello /third"


def test_outage_recovers_by_itself(proxy: TcpProxy) -> None:
    assert _get(proxy.port) == "hello /"
    t0 = time.monotonic()
    proxy.outage(1.0)
    assert _refused(proxy.port)
    for _ in range(100):  # bounded poll: 100 x 50 ms
        try:
            if _get(proxy.port, "/back", timeout=1) == "hello /back":
                break
        except ConnectionError:
            time.sleep(0.05)
    else:
        pytest.fail("proxy did not come back within ~5 s of outage(1.0)")
    assert 0.9 <= time.monotonic() - t0 < 5


def test_target_down_resets_clients_and_stop_closes_all(http_target: tuple[str, int]) -> None:
    dead = ("127.0.0.1", free_port())  # nothing listens there
    proxy = TcpProxy(dead).start()
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        _get(proxy.port)
    proxy.stop()
    assert _refused(proxy.port)
    with pytest.raises(RuntimeError):
        proxy.up()  # a stopped proxy stays stopped


# ---- S3 through the proxy ---------------------------------------------------------------------------------


# `aws_env` and `moto` (moto's own server, one per module) come from conftest.py.


@pytest.fixture(scope="module")
def moto_keepalive(aws_env: None) -> Iterator[str]:
    with moto_server(keepalive=True) as url:
        yield url


def test_moto_itself_closes_every_connection(moto: str) -> None:
    """Why moto_server(keepalive=True) exists: through plain moto, s3fs opens a connection per request."""
    bucket = make_bucket(moto)
    with TcpProxy(("127.0.0.1", int(moto.rsplit(":", 1)[1]))) as proxy:
        fs = fast_s3fs(proxy.url)
        for i in range(3):
            fs.pipe(f"{bucket}/k{i}", b"v")
        assert proxy.accepted >= 3  # keep-alive would have made it 1


def test_s3fs_keepalive_cut_by_down_fails_fast_then_recovers(moto_keepalive: str) -> None:
    bucket = make_bucket(moto_keepalive)
    with TcpProxy(("127.0.0.1", int(moto_keepalive.rsplit(":", 1)[1]))) as proxy:
        fs = fast_s3fs(proxy.url)
        fs.pipe(f"{bucket}/a", b"one")
        assert fs.cat(f"{bucket}/a") == b"one" and fs.info(f"{bucket}/a")["size"] == 3  # GET and HEAD
        assert proxy.accepted == 1 and proxy.open_connections == 1  # one pooled keep-alive connection

        proxy.down()  # the pooled connection is reset: a write must not slip through it
        t0 = time.monotonic()
        with pytest.raises(Exception) as failed:
            fs.pipe(f"{bucket}/b", b"two")
        assert time.monotonic() - t0 < 10, "fast_s3fs must fail in seconds"
        assert isinstance(failed.value, (botocore.exceptions.ConnectionError, OSError)), repr(failed.value)

        proxy.up()
        fs.pipe(f"{bucket}/b", b"two")
        assert fs.cat(f"{bucket}/b") == b"two"
        assert proxy.accepted == 2  # a new connection, on the same port
    direct = fast_s3fs(moto_keepalive)  # the data really is in moto, not somewhere else
    assert sorted(direct.ls(bucket)) == [f"{bucket}/a", f"{bucket}/b"]


def test_s3_env_is_what_botocore_reads(moto: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a subprocess, as training runs see it: endpoint, attempts and retry mode come from the env."""
    env = s3_env(moto, max_attempts=2, retry_mode="standard", defaults_mode="in-region")
    bucket = make_bucket(moto)
    code = ("import boto3; c = boto3.client('s3'); "
            f"c.put_object(Bucket='{bucket}', Key='k', Body=b'v'); "
            "print(c.meta.endpoint_url, c.meta.config.retries, c.meta.config.connect_timeout)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(" ", 1)[0] == moto
    assert "'total_max_attempts': 2" in out.stdout and "'mode': 'standard'" in out.stdout, out.stdout
    assert out.stdout.strip().endswith(" 1.1"), out.stdout  # AWS_DEFAULTS_MODE=in-region: 1.1 s connect
    assert fast_s3fs(moto).cat(f"{bucket}/k") == b"v"


# ---- tmpfs ------------------------------------------------------------------------------------------------


def test_tmpfs_fills_up_with_enospc(tmp_path) -> None:
    where = tmp_path / "small"
    with tmpfs(where, 1024 * 1024) as mnt:
        assert is_mounted(mnt)
        (mnt / "fits").write_bytes(b"x" * 512 * 1024)
        with pytest.raises(OSError) as full:
            with open(mnt / "too-big", "wb") as f:
                f.write(b"y" * 2 * 1024 * 1024)
        assert full.value.errno == errno.ENOSPC
    assert not is_mounted(where)
    assert not (where / "fits").exists()  # the files were on the tmpfs, not underneath it


# ---- process trees ----------------------------------------------------------------------------------------


def test_children_of_finds_grandchildren_and_kill_tree_ends_them() -> None:
    # python -> sh -> two sleeps: a launcher, a shell and its workers
    code = ("import subprocess, sys; p = subprocess.Popen(['sh', '-c', 'sleep 30 & sleep 30 & wait']); "
            "sys.stdout.write(str(p.pid) + '\\n'); sys.stdout.flush(); p.wait()")
    top = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        shell = int(top.stdout.readline())
        tree: list[int] = []
        for _ in range(100):  # bounded: the shell forks its sleeps asynchronously
            tree = children_of(top.pid)
            if len(tree) >= 3:
                break
            time.sleep(0.05)
        assert tree[0] == shell and len(tree) == 3, tree
        assert children_of(shell) == tree[1:]
        assert wait_gone(tree, timeout=0.2) == tree  # still running: wait_gone reports them
        assert kill_tree(top.pid, timeout=5) == []
        assert wait_gone([top.pid, *tree], timeout=1) == []
    finally:
        top.kill()
        top.wait(5)
    assert children_of(top.pid) == []


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
