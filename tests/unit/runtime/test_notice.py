"""Cloud preemption notices against a fake metadata server on 127.0.0.1 that speaks each dialect,
checks each dialect's required header as the real one does, and can flip to "notice" mid-test."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

import pytest

from tinydist.runtime import cloud_metadata
from tinydist.runtime.cloud_metadata import MODES, PROVIDERS, check_once, detect_provider
from tinydist.runtime.notice import NoticeWatcher, start_watcher

AWS_TOKEN = "AQAEAFakeToken=="
VM_NAME = "spot-vm_3"
ACTION_WORD = {"aws": "terminate", "gcp": "preempted", "azure": "preempt"}
NOTICE_PATH = {"aws": "/latest/meta-data/spot/instance-action", "gcp": "/computeMetadata/v1/instance/preempted",
               "azure": "/metadata/scheduledevents"}


class FakeMetadata:
    """One provider's metadata service. `notice` flips the answer; `requests` records (method, path,
    headers) of every request; `override` (status, body) replaces the notice endpoint's answer."""

    def __init__(self, provider: str, port: int = 0) -> None:
        self.provider = provider
        self.notice = False
        self.azure_events: Optional[list[dict[str, Any]]] = None  # replaces the default Preempt event
        self.override: Optional[tuple[int, str]] = None
        self.flavor_header = True  # GCP: send Metadata-Flavor: Google back (a proxy would not)
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._server: Optional[ThreadingHTTPServer] = None
        self.port = port
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def notice_polls(self) -> int:
        return sum(1 for m, p, _ in list(self.requests) if p.startswith(NOTICE_PATH[self.provider]))

    def start(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _answer(self, status: int, body: str, headers: Optional[dict[str, str]] = None) -> None:
                data = body.encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_GET(self) -> None:
                self._handle("GET")

            def _handle(self, method: str) -> None:
                fake.requests.append((method, self.path, dict(self.headers)))
                getattr(fake, f"_{fake.provider}")(self, method)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _notice_answer(self, h: Any, default: tuple[int, str]) -> None:
        status, body = self.override or default
        google = self.provider == "gcp" and self.flavor_header
        h._answer(status, body, {"Metadata-Flavor": "Google"} if google else None)

    def _aws(self, h: Any, method: str) -> None:
        if method == "PUT" and h.path == "/latest/api/token":
            if not h.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                return h._answer(400, "Missing TTL header")
            return h._answer(200, AWS_TOKEN)
        if method == "GET" and h.path.startswith("/latest/meta-data/"):
            if h.headers.get("X-aws-ec2-metadata-token") != AWS_TOKEN:
                return h._answer(401, "Unauthorized")  # what IMDSv2-only instances answer to v1
            if h.path == NOTICE_PATH["aws"]:
                if self.notice:
                    return self._notice_answer(h, (200, json.dumps({"action": "terminate",
                                                                    "time": "2026-11-26T16:40:00Z"})))
                return self._notice_answer(h, (404, "Not Found"))
        h._answer(404 if method == "GET" else 405, "Not Found")

    def _gcp(self, h: Any, method: str) -> None:
        google = {"Metadata-Flavor": "Google"}
        if h.headers.get("Metadata-Flavor") != "Google":
            return h._answer(403, "Missing Metadata-Flavor:Google header.", google)
        if method == "GET" and h.path == NOTICE_PATH["gcp"]:
            return self._notice_answer(h, (200, "TRUE" if self.notice else "FALSE"))
        h._answer(404, "Not Found", google)

    def _azure(self, h: Any, method: str) -> None:
        if h.headers.get("Metadata") != "true":
            return h._answer(400, json.dumps({"error": "Bad request. Required metadata header not specified"}))
        if method == "GET" and h.path == "/metadata/scheduledevents?api-version=2020-07-01":
            events = self.azure_events if self.azure_events is not None else [{
                "EventId": "602d9444-d2cd-49c7-8624-8643e7171297", "EventType": "Preempt",
                "ResourceType": "VirtualMachine", "Resources": [VM_NAME], "EventStatus": "Scheduled",
                "NotBefore": "Mon, 19 Sep 2026 18:29:47 GMT", "Description": "", "EventSource": "Platform",
                "DurationInSeconds": -1}]
            doc = {"DocumentIncarnation": 2 if self.notice else 1, "Events": events if self.notice else []}
            return self._notice_answer(h, (200, json.dumps(doc)))
        if method == "GET" and h.path.startswith("/metadata/instance/compute/name?"):
            return h._answer(200, VM_NAME)
        if method == "GET" and h.path.startswith("/metadata/instance?"):
            return h._answer(200, json.dumps({"compute": {"name": VM_NAME, "azEnvironment": "AzurePublicCloud"}}))
        h._answer(404, json.dumps({"error": "Not found"}))


@pytest.fixture(params=PROVIDERS)
def fake(request: pytest.FixtureRequest) -> Any:
    server = FakeMetadata(request.param)
    yield server
    server.stop()


def closed_port() -> int:
    """A port with nothing listening: connections to it are refused at once."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class Recorder:
    """on_notice and log in one: thread-safe lists."""

    def __init__(self) -> None:
        self.notices: list[str] = []
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def on_notice(self, description: str) -> None:
        with self._lock:
            self.notices.append(description)

    def log(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)


def raw_status(method: str, url: str, headers: Optional[dict[str, str]] = None) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, method=method, headers=headers or {}), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# -- check_once ----------------------------------------------------------------------------------

def test_check_once_no_notice_then_notice(fake: FakeMetadata) -> None:
    assert check_once(fake.provider, fake.url) is None
    fake.notice = True
    description = check_once(fake.provider, fake.url)
    assert description is not None and "\n" not in description
    assert fake.provider in description.lower() and ACTION_WORD[fake.provider] in description.lower()
    if fake.provider == "aws":
        assert description == "AWS spot instance-action terminate at 2026-11-26T16:40:00Z"


def test_fake_refuses_requests_without_the_dialects_header(fake: FakeMetadata) -> None:
    """The fake is as strict as the real services, so the green tests above prove the headers are sent."""
    expected = {"aws": 401, "gcp": 403, "azure": 400}[fake.provider]
    path = {"aws": NOTICE_PATH["aws"], "gcp": NOTICE_PATH["gcp"],
            "azure": "/metadata/scheduledevents?api-version=2020-07-01"}[fake.provider]
    assert raw_status("GET", fake.url + path) == expected
    assert check_once(fake.provider, fake.url) is None  # the module's requests pass
    sent = [h for m, p, h in fake.requests if p == path and h is not None]
    header = {"aws": "X-aws-ec2-metadata-token", "gcp": "Metadata-Flavor", "azure": "Metadata"}[fake.provider]
    assert sent[-1].get(header) == {"aws": AWS_TOKEN, "gcp": "Google", "azure": "true"}[fake.provider]


def test_aws_uses_imdsv2_token() -> None:
    fake = FakeMetadata("aws")
    try:
        assert check_once("aws", fake.url) is None
        methods = [(m, p) for m, p, _ in fake.requests]
        assert methods == [("PUT", "/latest/api/token"), ("GET", NOTICE_PATH["aws"])]
        assert fake.requests[0][2].get("X-aws-ec2-metadata-token-ttl-seconds") == "21600"
    finally:
        fake.stop()


@pytest.mark.parametrize("provider,status,body,error", [
    ("aws", 500, "oops", OSError),
    ("aws", 200, "not json", ValueError),
    ("aws", 200, json.dumps({"time": "x"}), ValueError),
    ("gcp", 200, "MAYBE", ValueError),
    ("gcp", 503, "busy", OSError),
    ("azure", 200, "[]", ValueError),
    ("azure", 500, "", OSError),
])
def test_check_once_bad_answers_raise(provider: str, status: int, body: str, error: type) -> None:
    fake = FakeMetadata(provider)
    fake.override = (status, body)
    try:
        with pytest.raises(error):
            check_once(provider, fake.url)
    finally:
        fake.stop()


def test_gcp_answer_without_flavor_header_is_not_gcp() -> None:
    """A proxy or captive portal that answers 200 to anything is not a metadata service."""
    fake = FakeMetadata("gcp")
    fake.flavor_header = False
    try:
        with pytest.raises(ValueError, match="Metadata-Flavor"):
            check_once("gcp", fake.url)
        assert detect_provider(fake.url) is None
    finally:
        fake.stop()


def test_azure_events_for_other_vms_or_other_types_are_not_ours() -> None:
    fake = FakeMetadata("azure")
    try:
        fake.notice = True
        fake.azure_events = [{"EventId": "a", "EventType": "Preempt", "Resources": ["another_vm_7"],
                              "EventStatus": "Scheduled"},
                             {"EventId": "b", "EventType": "Reboot", "Resources": [VM_NAME],
                              "EventStatus": "Scheduled"}]
        assert check_once("azure", fake.url) is None
        fake.azure_events.append({"EventId": "c", "EventType": "Terminate", "Resources": [VM_NAME],
                                  "EventStatus": "Started", "NotBefore": ""})
        description = check_once("azure", fake.url)
        assert description is not None and "Terminate" in description and "EventId c" in description
    finally:
        fake.stop()


def test_check_once_unknown_provider() -> None:
    with pytest.raises(ValueError):
        check_once("oci", "http://127.0.0.1:1")


def test_a_server_that_never_answers_times_out() -> None:
    """Accepts the connection (listen backlog), never answers: the request ends at its timeout."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError):
            check_once("gcp", f"http://127.0.0.1:{s.getsockname()[1]}", timeout_s=0.3)
        assert time.monotonic() - t0 < 3.0
    finally:
        s.close()


def test_a_hanging_name_lookup_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DNS (or a resolver that hangs) must not hang a poll: the lookup is abandoned at the deadline,
    and polls during a hanging lookup share it rather than piling up threads."""
    release = threading.Event()
    calls: list[str] = []
    real = socket.getaddrinfo

    def hanging(host: str, *args: Any, **kwargs: Any) -> Any:
        if host != "metadata.hang.test":
            return real(host, *args, **kwargs)
        calls.append(host)
        release.wait(10)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(cloud_metadata.socket, "getaddrinfo", hanging)
    try:
        for _ in range(3):
            t0 = time.monotonic()
            with pytest.raises(OSError):
                check_once("gcp", "http://metadata.hang.test", timeout_s=0.2)
            assert time.monotonic() - t0 < 3.0
        assert len(calls) == 1
    finally:
        release.set()
    assert wait_until(lambda: not cloud_metadata._lookups)
    with pytest.raises(OSError, match="cannot resolve"):  # answered lookup: an error at once
        check_once("gcp", "http://metadata.hang.test", timeout_s=2)


# -- the watcher ---------------------------------------------------------------------------------

def test_watcher_calls_on_notice_once_after_the_flip(fake: FakeMetadata) -> None:
    rec = Recorder()
    watcher = NoticeWatcher(fake.provider, rec.on_notice, metadata_url=fake.url, poll_s=0.05, log=rec.log).start()
    try:
        assert wait_until(lambda: fake.notice_polls() >= 3)
        assert rec.notices == [] and watcher.notice is None and watcher.running
        fake.notice = True
        assert wait_until(lambda: len(rec.notices) >= 1)
        assert wait_until(lambda: not watcher.running)
        polls = fake.notice_polls()
        time.sleep(0.3)  # six poll periods: no more polls, no second call
        assert fake.notice_polls() == polls
        assert len(rec.notices) == 1 and watcher.notice == rec.notices[0]
        assert fake.provider in rec.notices[0].lower() and ACTION_WORD[fake.provider] in rec.notices[0].lower()
        assert rec.lines == []  # no failures, nothing to say
    finally:
        watcher.stop()


def test_watcher_survives_an_outage_with_one_line_and_recovers(fake: FakeMetadata) -> None:
    fake.stop()  # the port is now closed; the same port comes back later
    rec = Recorder()
    watcher = NoticeWatcher(fake.provider, rec.on_notice, metadata_url=fake.url, poll_s=0.05, log=rec.log).start()
    try:
        assert wait_until(lambda: len(rec.lines) >= 1)
        time.sleep(0.5)  # about ten more failed polls
        assert watcher.running
        assert len(rec.lines) == 1, rec.lines
        assert "cannot poll" in rec.lines[0] and fake.provider in rec.lines[0] and "\n" not in rec.lines[0]
        fake.start()
        assert wait_until(lambda: len(rec.lines) >= 2)
        assert "answers again" in rec.lines[1]
        time.sleep(0.2)
        assert len(rec.lines) == 2 and rec.notices == [] and watcher.running
        fake.notice = True
        assert wait_until(lambda: len(rec.notices) == 1)
        assert wait_until(lambda: not watcher.running)
        assert len(rec.lines) == 2 and len(rec.notices) == 1
    finally:
        watcher.stop()


def test_watcher_errors_of_format_are_one_line_too() -> None:
    fake = FakeMetadata("gcp")
    fake.override = (200, "garbage")
    rec = Recorder()
    watcher = NoticeWatcher("gcp", rec.on_notice, metadata_url=fake.url, poll_s=0.05, log=rec.log).start()
    try:
        assert wait_until(lambda: fake.notice_polls() >= 5)
        assert len(rec.lines) == 1 and "ValueError" in rec.lines[0] and watcher.running
    finally:
        watcher.stop()
        fake.stop()


def test_watcher_stop_is_prompt_and_final() -> None:
    fake = FakeMetadata("aws")
    rec = Recorder()
    watcher = NoticeWatcher("aws", rec.on_notice, metadata_url=fake.url, poll_s=30, log=rec.log).start()
    try:
        assert wait_until(lambda: fake.notice_polls() >= 1)
        t0 = time.monotonic()
        watcher.stop()
        assert time.monotonic() - t0 < 3.0 and not watcher.running
        fake.notice = True
        time.sleep(0.1)
        assert rec.notices == [] and fake.notice_polls() == 1
        watcher.stop()  # twice: harmless
    finally:
        fake.stop()
    NoticeWatcher("aws", rec.on_notice, metadata_url=fake.url).stop()  # before start: harmless


def test_on_notice_that_raises_or_stops_does_not_break_the_watcher() -> None:
    fake = FakeMetadata("azure")
    fake.notice = True
    rec = Recorder()
    calls: list[str] = []
    holder: dict[str, NoticeWatcher] = {}

    def on_notice(description: str) -> None:
        calls.append(description)
        holder["w"].stop()  # from the watcher thread itself: must not deadlock
        raise RuntimeError("boom")

    try:
        holder["w"] = NoticeWatcher("azure", on_notice, metadata_url=fake.url, poll_s=0.05, log=rec.log)
        holder["w"].start()
        assert wait_until(lambda: not holder["w"].running)
        assert len(calls) == 1 and len(rec.lines) == 1 and "on_notice failed" in rec.lines[0]
    finally:
        holder["w"].stop()
        fake.stop()


def test_watcher_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        NoticeWatcher("oci", print)
    with pytest.raises(ValueError):
        NoticeWatcher("aws", print, poll_s=0)


# -- detection and start_watcher -----------------------------------------------------------------

def test_detect_provider_names_each_fake(fake: FakeMetadata) -> None:
    assert detect_provider(fake.url, timeout_s=2.0) == fake.provider


def test_detect_provider_on_a_closed_port_is_none_quickly() -> None:
    t0 = time.monotonic()
    assert detect_provider(f"http://127.0.0.1:{closed_port()}") is None
    assert time.monotonic() - t0 < 3.0


def test_detect_provider_on_a_silent_server_is_none_within_the_timeout() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    try:
        t0 = time.monotonic()
        assert detect_provider(f"http://127.0.0.1:{s.getsockname()[1]}", timeout_s=0.5) is None
        assert time.monotonic() - t0 < 3.0
    finally:
        s.close()


def test_detect_provider_never_raises() -> None:
    assert detect_provider("not a url") is None
    assert detect_provider("ftp://127.0.0.1:1") is None


def test_start_watcher_modes() -> None:
    rec = Recorder()
    assert set(MODES) == {"off", "auto", "aws", "gcp", "azure"}
    assert start_watcher("off", rec.on_notice, log=rec.log) is None
    t0 = time.monotonic()
    assert start_watcher("auto", rec.on_notice, metadata_url=f"http://127.0.0.1:{closed_port()}", log=rec.log) is None
    assert time.monotonic() - t0 < 3.0
    assert rec.lines == []
    with pytest.raises(ValueError, match="unknown preemption notice mode"):
        start_watcher("spot", rec.on_notice, log=rec.log)


@pytest.mark.parametrize("mode", ["auto", "explicit"])
def test_start_watcher_watches_and_delivers(fake: FakeMetadata, mode: str) -> None:
    rec = Recorder()
    watcher = start_watcher(fake.provider if mode == "explicit" else "auto", rec.on_notice,
                            metadata_url=fake.url, poll_s=0.05, log=rec.log)
    assert watcher is not None
    try:
        assert watcher.provider == fake.provider and watcher.running
        assert rec.lines == [f"preemption notices: watching {fake.provider} metadata every 0.05 s"]
        fake.notice = True
        assert wait_until(lambda: len(rec.notices) == 1)
        assert watcher.notice == rec.notices[0]
    finally:
        watcher.stop()


def test_default_log_line_says_every_5_s() -> None:
    fake = FakeMetadata("gcp")
    rec = Recorder()
    watcher = start_watcher("gcp", rec.on_notice, metadata_url=fake.url, log=rec.log)
    try:
        assert rec.lines == ["preemption notices: watching gcp metadata every 5 s"]
    finally:
        assert watcher is not None
        watcher.stop()
        fake.stop()


def test_import_is_cheap() -> None:
    """Launchers may import it: no torch, no third-party packages."""
    import subprocess
    import sys
    code = ("import sys, tinydist.runtime.notice; "
            "bad = [m for m in ('torch', 'accelerate', 'requests', 'numpy') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- a whole run, stopped by a notice -----------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.slow
def test_notice_stops_a_run_with_a_commit(provider: str, tmp_path: Any, cache_dir: str) -> None:
    """The notice sets the same flag as SIGTERM: the run saves at the next step boundary and exits 75."""
    from helpers.faultinject import kill_tree
    from helpers.train import describe, finish, start, tiny_args, train_command

    server = FakeMetadata(provider)
    out = tmp_path / "out"
    args = tiny_args(cache_dir, str(out), train__max_steps=40, checkpoint__every_steps=2,
                     preemption__notice=provider, preemption__metadata_url=server.url, preemption__poll_s=0.1)
    proc = start(train_command(args))
    try:
        first = out / "checkpoints" / "step-00000002" / "COMMITTED"
        assert wait_until(lambda: first.exists() or proc.poll() is not None, 240)
        server.notice = True
        result = finish(proc, 120)
    finally:
        if proc.poll() is None:  # the wait above failed: nothing of this run may outlive the test
            kill_tree(proc.pid)
        server.stop()
    stdout = result.stdout
    assert proc.returncode == 75, describe(result)
    assert f"preemption notices: watching {provider} metadata" in stdout, describe(result)
    assert f"{ACTION_WORD[provider]}" in stdout.lower() and "received: stopping at the next step boundary" in stdout
    stopped = [line for line in stdout.splitlines() if line.startswith("stopped at step")]
    assert stopped, describe(result)
    step = int(stopped[0].split()[3])
    assert step < 40 and (out / "checkpoints" / f"step-{step:08d}" / "COMMITTED").exists()
