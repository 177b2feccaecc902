"""Cloud metadata services, asked whether this VM is being preempted: each provider's dialect, the
detection of which one answers, and the bounded HTTP both speak. The watcher that polls them is
notice.py.

AWS gives two minutes' notice in its instance metadata (spot instance-action, IMDSv2 only), GCP
about 30 s (instance/preempted), Azure at least 30 s in its scheduled events (Preempt, Terminate).

Why it is built this way:
- the standard library only (http.client under a bounded resolver), so importing this module
  costs nothing and launchers may import it;
- every request is bounded (name lookup, connect and read share one deadline of ≤ 2 s): a
  metadata service that hangs, or a laptop whose DNS hangs on `metadata.google.internal`, must
  never hold up training or start-up. A name lookup has no timeout of its own in the standard
  library, so it runs in a daemon thread (at most one per host at a time) and is given up on;
- environment proxies are ignored on purpose: the metadata service is link-local, and sending
  `HTTP_PROXY` traffic to it would ask a proxy about *its* metadata. `metadata_url` overrides the
  base of every provider (tests, or a deliberate proxy);
- a provider is detected by its own dialect, not by an answer: AWS and Azure share 169.254.169.254,
  and a proxy or captive portal answers anything;
- no acknowledgement is ever sent (Azure's StartRequests would only hasten the preemption).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import queue
import socket
import threading
import time
import urllib.parse
from typing import Callable, Optional

from tinydist.runtime.quote import clipped

PROVIDERS = ("aws", "gcp", "azure")
MODES = ("off", "auto") + PROVIDERS  # accepted by start_watcher; for config validation

DEFAULT_BASES = {
    "aws": "http://169.254.169.254",
    "gcp": "http://metadata.google.internal",
    "azure": "http://169.254.169.254",
}
REQUEST_TIMEOUT_S = 2.0  # per request: name lookup + connect + read
_MAX_BODY = 1 << 20  # metadata answers are tiny; a larger one is not a metadata service

AWS_TOKEN_PATH = "/latest/api/token"
AWS_TOKEN_TTL_S = 21600
AWS_ACTION_PATH = "/latest/meta-data/spot/instance-action"
GCP_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
AZURE_EVENTS_PATH = "/metadata/scheduledevents?api-version=2020-07-01"
# Detection asks Azure's instance endpoint, not scheduled events: the first scheduledevents request
# of a VM enables the service and may take up to two minutes to answer (Azure's documentation).
AZURE_INSTANCE_PATH = "/metadata/instance?api-version=2021-02-01"
AZURE_NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
AZURE_STOP_EVENTS = ("Preempt", "Terminate")


class MetadataError(OSError):
    """The metadata service answered, but not as one that is up and speaks the expected dialect
    (an unexpected HTTP status, a broken HTTP exchange). An OSError: to the watcher it is one more
    network failure, logged once per streak."""


# -- bounded HTTP --------------------------------------------------------------------------------

class _Lookup:
    """One getaddrinfo in a daemon thread: the standard library's name lookup has no timeout, and a
    machine with a broken resolver may block in it for tens of seconds."""

    def __init__(self, host: str, port: int) -> None:
        self.key = (host, port)
        self.done = threading.Event()
        self.address: Optional[str] = None
        self.error: Optional[str] = None

    def run(self) -> None:
        try:
            infos = socket.getaddrinfo(self.key[0], self.key[1], type=socket.SOCK_STREAM)
            self.address = str(infos[0][4][0])
        except Exception as e:  # gaierror, UnicodeError on odd names, ...: all mean "no address"
            self.error = f"{type(e).__name__}: {e}"
        finally:
            with _lookups_lock:
                if _lookups.get(self.key) is self:
                    del _lookups[self.key]
            self.done.set()


_lookups: dict[tuple[str, int], _Lookup] = {}
_lookups_lock = threading.Lock()


def _resolve(host: str, port: int, timeout_s: float) -> str:
    """An address for host within timeout_s, or OSError. Concurrent callers share one lookup, so a
    hanging resolver costs at most one thread per host, however often the watcher polls."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    with _lookups_lock:
        lookup = _lookups.get((host, port))
        if lookup is None:
            lookup = _lookups[(host, port)] = _Lookup(host, port)
            threading.Thread(target=lookup.run, name=f"tinydist-resolve-{host}", daemon=True).start()
    if not lookup.done.wait(max(timeout_s, 0.0)):
        raise TimeoutError(f"resolving {host} took over {timeout_s:g} s")
    if lookup.address is None:
        raise OSError(f"cannot resolve {host} ({lookup.error})")
    return lookup.address


class _Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace").strip()


def _request(method: str, url: str, headers: dict[str, str], timeout_s: float) -> _Response:
    """One HTTP exchange whose lookup, connect and read share one deadline of timeout_s. Any status
    comes back (the caller decides what 404 means); failures raise OSError subclasses."""
    deadline = time.monotonic() + timeout_s

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{method} {url}: no answer within {timeout_s:g} s")
        return left

    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"metadata URL must be http://host[:port], got {url!r}")
    host, port = parts.hostname, parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    address = _resolve(host, port, remaining())
    conn = http.client.HTTPConnection(host, port, timeout=remaining())
    # Connect to the address resolved above (bounded), while the Host header keeps the name.
    conn._create_connection = (  # type: ignore[attr-defined]
        lambda _addr, timeout, source=None: socket.create_connection((address, port), timeout, source))
    try:
        conn.request(method, target, headers=headers)
        sock = conn.sock  # getresponse() drops conn.sock when the server closes after answering
        assert sock is not None
        sock.settimeout(remaining())
        resp = conn.getresponse()
        sock.settimeout(remaining())  # the body is read through the same socket
        body = resp.read(_MAX_BODY + 1)
        if len(body) > _MAX_BODY:
            raise MetadataError(f"{method} {url}: answer larger than {_MAX_BODY} bytes")
        return _Response(resp.status, resp.headers, body)
    except http.client.HTTPException as e:  # not OSError subclasses: BadStatusLine, IncompleteRead, ...
        raise MetadataError(f"{method} {url}: {type(e).__name__}: {e}") from e
    finally:
        conn.close()


def _base(provider: str, metadata_url: Optional[str]) -> str:
    return (metadata_url or DEFAULT_BASES[provider]).rstrip("/")


def _unexpected(resp: _Response, what: str) -> MetadataError:
    return MetadataError(f"{what}: HTTP {resp.status} {clipped(resp.text(), 80)}".rstrip())


# -- the three dialects --------------------------------------------------------------------------

def _aws_token(base: str, timeout_s: float) -> str:
    """IMDSv2 session token. IMDSv1 (no token) is refused by instances that require v2, so only v2
    is spoken. In a container on EC2 the PUT needs a hop limit ≥ 2 on the instance, or it times out."""
    resp = _request("PUT", base + AWS_TOKEN_PATH,
                    {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)}, timeout_s)
    token = resp.text()
    if resp.status != 200:
        raise _unexpected(resp, "AWS IMDSv2 token")
    if not token or any(c.isspace() for c in token) or resp.headers.get("Metadata-Flavor"):
        raise ValueError("AWS IMDSv2 token: the answer is not a token")
    return token


def _check_aws(base: str, timeout_s: float) -> Optional[str]:
    token = _aws_token(base, timeout_s)
    resp = _request("GET", base + AWS_ACTION_PATH, {"X-aws-ec2-metadata-token": token}, timeout_s)
    if resp.status == 404:
        return None
    if resp.status != 200:
        raise _unexpected(resp, "AWS spot instance-action")
    doc = json.loads(resp.text())  # json.JSONDecodeError is a ValueError
    if not isinstance(doc, dict) or not isinstance(doc.get("action"), str):
        raise ValueError(f"AWS spot instance-action: no action in {clipped(resp.text(), 80)!r}")
    when = doc.get("time")
    return f"AWS spot instance-action {doc['action']}" + (f" at {when}" if when else "")


def _check_gcp(base: str, timeout_s: float) -> Optional[str]:
    resp = _request("GET", base + GCP_PREEMPTED_PATH, {"Metadata-Flavor": "Google"}, timeout_s)
    if resp.status != 200:
        raise _unexpected(resp, "GCP instance/preempted")
    if resp.headers.get("Metadata-Flavor") != "Google":
        raise ValueError("GCP instance/preempted: the answer lacks Metadata-Flavor: Google")
    value = resp.text().upper()
    if value == "FALSE":
        return None
    if value == "TRUE":
        return "GCP instance preempted (instance/preempted is TRUE)"
    raise ValueError(f"GCP instance/preempted: expected TRUE or FALSE, got {clipped(resp.text(), 40)!r}")


def _azure_vm_name(base: str, timeout_s: float) -> Optional[str]:
    """This VM's name, to tell our events from our neighbours': Azure delivers an availability set's
    or scale set's events to every VM in it, naming the affected ones in Resources."""
    try:
        resp = _request("GET", base + AZURE_NAME_PATH, {"Metadata": "true"}, timeout_s)
    except OSError:
        return None
    name = resp.text()
    return name if resp.status == 200 and name and "\n" not in name else None


def _check_azure(base: str, timeout_s: float) -> Optional[str]:
    resp = _request("GET", base + AZURE_EVENTS_PATH, {"Metadata": "true"}, timeout_s)
    if resp.status != 200:
        raise _unexpected(resp, "Azure scheduledevents")
    doc = json.loads(resp.text())
    if not isinstance(doc, dict) or not isinstance(doc.get("Events", []), list):
        raise ValueError(f"Azure scheduledevents: no Events list in {clipped(resp.text(), 80)!r}")
    stops = [e for e in doc.get("Events", []) if isinstance(e, dict) and e.get("EventType") in AZURE_STOP_EVENTS]
    if not stops:
        return None
    name: Optional[str] = None
    looked_up = False
    for event in stops:
        resources = event.get("Resources") or []
        if resources:
            if not looked_up:
                name, looked_up = _azure_vm_name(base, timeout_s), True
            # Unknown name: count the event as ours. A needless stop costs one checkpoint and a
            # relaunch; a missed preemption costs everything since the last checkpoint.
            if name is not None and name not in resources:
                continue
        parts = [f"EventId {event.get('EventId', '?')}", f"status {event.get('EventStatus', '?')}"]
        if event.get("NotBefore"):
            parts.append(f"not before {event['NotBefore']}")
        return f"Azure scheduled event {event['EventType']} ({', '.join(parts)})"
    return None


_CHECKS: dict[str, Callable[[str, float], Optional[str]]] = {
    "aws": _check_aws, "gcp": _check_gcp, "azure": _check_azure,
}


def check_once(provider: str, metadata_url: str | None = None, timeout_s: float = 2.0) -> str | None:
    """One poll: a one-line description of the notice (e.g. "AWS spot instance-action terminate at
    2026-11-26T16:40:00Z"), or None. Raises OSError/ValueError subclasses on network/format errors
    (the watcher logs and continues). timeout_s bounds each request (AWS makes two: token, then
    the notice)."""
    if provider not in _CHECKS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
    return _CHECKS[provider](_base(provider, metadata_url), timeout_s)


# -- detection -----------------------------------------------------------------------------------

def _probe(provider: str, metadata_url: Optional[str], timeout_s: float) -> bool:
    """Whether provider's metadata service answers in its own dialect, not merely answers: AWS and
    Azure share 169.254.169.254, and a proxy or captive portal answers anything."""
    base = _base(provider, metadata_url)
    if provider == "aws":
        _aws_token(base, timeout_s)
        return True
    if provider == "gcp":
        resp = _request("GET", base + GCP_PREEMPTED_PATH, {"Metadata-Flavor": "Google"}, timeout_s)
        return resp.status == 200 and resp.headers.get("Metadata-Flavor") == "Google"
    resp = _request("GET", base + AZURE_INSTANCE_PATH, {"Metadata": "true"}, timeout_s)
    if resp.status != 200 or resp.headers.get("Metadata-Flavor"):
        return False
    return isinstance(json.loads(resp.text()), dict)


def _probe_into(provider: str, metadata_url: Optional[str], timeout_s: float, out: "queue.SimpleQueue") -> None:
    try:
        found = _probe(provider, metadata_url, timeout_s)
    except Exception:  # any failure means "not this one"; detection never raises
        found = False
    out.put(provider if found else None)


def detect_provider(metadata_url: str | None = None, timeout_s: float = 1.0) -> str | None:
    """Which cloud's metadata service answers (None: none — e.g. a laptop or on-prem cluster), decided
    within ~timeout_s in all: probe the three in parallel threads; the first to answer in its own
    dialect wins (AWS: token PUT succeeds; GCP: response header `Metadata-Flavor: Google`; Azure: the
    instance metadata endpoint answers JSON to `Metadata: true`). Never raises. Probes still running
    at the deadline are daemon threads, abandoned."""
    try:
        out: queue.SimpleQueue = queue.SimpleQueue()
        deadline = time.monotonic() + timeout_s
        for provider in PROVIDERS:
            threading.Thread(target=_probe_into, args=(provider, metadata_url, timeout_s, out),
                             name=f"tinydist-probe-{provider}", daemon=True).start()
        for _ in PROVIDERS:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                found = out.get(timeout=left)
            except queue.Empty:
                return None
            if found is not None:
                return found
        return None
    except Exception:  # e.g. no thread could be started: no notices, rather than no training
        return None
