"""Files under one folder URL (local path, file://, s3://, gs://), with storage faults made explicit.

Everything the checkpoint code does to storage goes through `Storage`, so that what a fault *is*
is decided in one place: a missing file is `FileNotFoundError` (an answer, not a fault); a full
disk or quota is `StorageFullError`; a file system that refuses us for good (read-only, permission
denied, no credentials at all) is `StorageRefusedError`, a `PermanentError` (exit 2: waiting or a
relaunch on the same storage cannot fix it); anything else the backend raises while talking to the
disk or the network (connection refused, timeouts, 5xx, expired or refused credentials) is
`StorageError`, a `TransientError`: the run rides it out or stops with the transient exit code,
never with "bad config". fsspec backends raise their own exception types (botocore's are not even
OSErrors), so the boundary catches broadly and lets only programming errors through.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import threading
from typing import Any, Iterator, Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tinydist.runtime.exitcodes import PermanentError, TransientError, one_line

TMP_TAG = ".tmp-"  # local writes go to `{name}.tmp-{pid}-{thread}` first; strays are removed by cleanup
_BUGS = (TypeError, AttributeError, NameError, AssertionError, KeyError, IndexError)  # ours, not storage's
_FULL = (errno.ENOSPC, errno.EDQUOT)
# The local file system says no to this process for good: a read-only mount, a folder it may not
# write. (Object stores' "access denied" is a PermissionError without an errno: see `faults`.)
_REFUSED = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted"}
# How the object-store clients say that no credentials were found at all, by (module, class name):
# matched without importing them (botocore and google-auth are optional).
_NO_CREDENTIALS = (("botocore.exceptions", "NoCredentialsError"), ("botocore.exceptions", "PartialCredentialsError"),
                   ("google.auth.exceptions", "DefaultCredentialsError"))


class StorageError(TransientError):
    """Storage unreachable or failing right now; a later attempt (or relaunch) may succeed."""


class StorageFullError(StorageError):
    """No space left (or quota exceeded) where a file was being written."""


class StorageRefusedError(PermanentError):
    """The storage refuses this job for good: a read-only file system, permission denied, no
    credentials at all. Not a StorageError: retrying through an "outage" would only delay exit 2."""


def _no_credentials(error: BaseException) -> bool:
    """Whether `error` (or what it was raised from) is a client finding no credentials anywhere."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for module, name in _NO_CREDENTIALS:
            cls = getattr(sys.modules.get(module), name, None)
            if isinstance(cls, type) and isinstance(error, cls):
                return True
        error = error.__cause__ or error.__context__
    return False


def megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


class Storage:
    """One folder: atomic whole-file writes, reads, listings and removals, faults classified."""

    def __init__(self, url: str, storage_options: Optional[dict[str, Any]] = None) -> None:
        self.url = url.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def show(self, name: str = "") -> str:
        """The URL a user would recognise, for messages."""
        return f"{self.url}/{name}" if name else self.url

    @contextlib.contextmanager
    def faults(self, what: str) -> Iterator[None]:
        """Turn whatever the backend raises into FileNotFoundError, StorageFullError, StorageRefusedError
        or StorageError."""
        try:
            yield
        except (FileNotFoundError, StorageError, StorageRefusedError):
            raise
        except _BUGS:
            raise
        except OSError as e:
            if e.errno in _FULL:
                raise StorageFullError(f"{what}: no space left on device ({e.strerror or e})") from e
            # Only an errno from the kernel counts: s3fs turns AccessDenied, ExpiredToken and clock skew
            # alike into a bare PermissionError (no errno), and an expired token is refreshed by a
            # relaunch; the start-up probe still names those (ConfigError).
            if e.errno in _REFUSED:
                raise StorageRefusedError(f"{what}: {_REFUSED[e.errno]}; expected a location this job may "
                                          "read and write (a read-write mount, a folder it owns)") from e
            raise StorageError(f"{what}: {type(e).__name__}: {one_line(e)[:300]}") from e
        except Exception as e:  # noqa: BLE001 - any backend's network/service error (botocore, gcsfs, ...)
            # No credentials at all is exit 2, not 69: the client raises it only after every source in
            # its chain came back empty (environment, config files, container and instance metadata,
            # the last retried per AWS_METADATA_SERVICE_NUM_ATTEMPTS). What is missing is the
            # environment's configuration, which relaunching into the same environment does not
            # change, and a relaunch loop backing off for hours would hide it from the user.
            if _no_credentials(e):
                raise StorageRefusedError(f"{what}: no credentials found ({type(e).__name__}: {one_line(e)[:200]}); "
                                          "expected credentials for this store in the environment (for s3://: "
                                          "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance "
                                          "role; for gs://: GOOGLE_APPLICATION_CREDENTIALS)") from e
            raise StorageError(f"{what}: {type(e).__name__}: {one_line(e)[:300]}") from e

    # ---- reading ---------------------------------------------------------------------------------------
    def read(self, name: str) -> bytes:
        with self.faults(f"reading {self.show(name)}"):
            return self.fs.cat_file(self.path(name))

    def exists(self, name: str) -> bool:
        with self.faults(f"looking for {self.show(name)}"):
            self.fs.invalidate_cache(self.path(name))
            return self.fs.exists(self.path(name))

    def sizes(self, name: str = "") -> dict[str, int]:
        """{entry name: size} of a folder (sub-folders too, size 0); {} if it does not exist.
        Listings are never cached: other ranks and processes write here."""
        with self.faults(f"listing {self.show(name)}"):
            self.fs.invalidate_cache(self.path(name))
            try:
                entries = self.fs.ls(self.path(name), detail=True)
            except FileNotFoundError:
                return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries}

    def free_bytes(self) -> Optional[int]:
        """Free space where local files go; None on object stores (no such thing)."""
        if not self.local:
            return None
        path = self.root
        while path and not os.path.exists(path):
            path = os.path.dirname(path)
        try:
            return shutil.disk_usage(path or "/").free
        except OSError:
            return None

    def probe(self, key: str) -> None:
        """Prove, before any training, that this folder can be written: a small file written and removed.
        A missing bucket, a read-only file system, a permission error or no credentials is the user's to
        fix (ConfigError, exit 2); storage that does not answer is a StorageError (transient). `key`
        names the config key, for the message."""
        from tinydist.config import ConfigError  # here: config imports this module

        name = f".tinydist-probe-{os.getpid()}-{threading.get_ident()}"
        try:
            try:
                self.makedirs("")
                self.write(name, b"probe\n")
            finally:
                with contextlib.suppress(FileNotFoundError, StorageError, StorageRefusedError):
                    self.remove(name)
        except StorageRefusedError as e:
            # A ConfigError, not the StorageRefusedError itself: it names the key, and every caller
            # of probe (lease.claim_storage) already tells the other ranks about a ConfigError.
            raise ConfigError(f"{key}={self.url} cannot be written: {e}") from None
        except (FileNotFoundError, PermissionError, NotADirectoryError) as e:
            raise ConfigError(f"{key}={self.url} cannot be written ({type(e).__name__}: {one_line(e)[:200]}); "
                              "expected an existing bucket or folder this job may write (check the name and "
                              "the credentials)") from None
        except StorageError as e:
            cause = e.__cause__
            if isinstance(cause, (PermissionError, NotADirectoryError, FileExistsError)):
                raise ConfigError(f"{key}={self.url} cannot be written ({type(cause).__name__}: "
                                  f"{one_line(cause)[:200]}); expected a folder this job may write") from None
            raise

    # ---- writing ---------------------------------------------------------------------------------------
    def makedirs(self, name: str) -> None:
        if self.local:
            with self.faults(f"creating {self.show(name)}"):
                self.fs.makedirs(self.path(name), exist_ok=True)

    def write(self, name: str, data: Any) -> None:
        """Write one file whole: temp + fsync + atomic rename locally (a failed write leaves nothing),
        a single put on object stores (atomic there by nature). `data` is bytes, or a list of
        bytes-like parts written one after the other (no joined copy on a local disk)."""
        parts = data if isinstance(data, list) else [data]
        with self.faults(f"writing {self.show(name)}"):
            if not self.local:
                self.fs.pipe_file(self.path(name), parts[0] if len(parts) == 1 else b"".join(parts))
                return
            path = self.path(name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}{TMP_TAG}{os.getpid()}-{threading.get_ident()}"
            try:
                with open(tmp, "wb") as f:
                    for part in parts:
                        f.write(part)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
            dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
            try:  # the rename itself must survive a power cut before a marker can claim it
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def remove(self, name: str, recursive: bool = False) -> None:
        """Remove a file (or a folder with recursive=True); already gone is fine."""
        with self.faults(f"removing {self.show(name)}"):
            try:
                self.fs.rm(self.path(name), recursive=recursive)
            except FileNotFoundError:
                pass
