"""tinydist.data.hostmem: glibc is told to keep freed blocks (mallopt), and every C library without mallopt
is a quiet False, never an error (train.py and the bench call it unconditionally)."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import pytest

from tinydist.data import hostmem


def test_thresholds_are_what_glibc_accepts():
    assert hostmem.M_TRIM_THRESHOLD == -1 and hostmem.M_MMAP_THRESHOLD == -3  # malloc.h's numbers
    assert hostmem.MMAP_THRESHOLD == 32 * 2**20  # glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2)
    assert hostmem.TRIM_THRESHOLD >= hostmem.MMAP_THRESHOLD


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_is_tuned():
    assert hostmem.keep_freed_memory() is True
    assert hostmem.keep_freed_memory() is True  # again: idempotent, as a second train() in one process


def test_no_c_library_found_is_false(monkeypatch):
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert hostmem.keep_freed_memory() is False


def test_a_libc_without_mallopt_is_false(monkeypatch):
    class NoMallopt:  # musl, macOS: the library loads, the symbol is not there
        def __init__(self, name):
            pass

        def __getattr__(self, name):
            raise AttributeError(name)

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libc.so.6")
    monkeypatch.setattr(ctypes, "CDLL", NoMallopt)
    assert hostmem.keep_freed_memory() is False


def test_a_libc_that_cannot_be_loaded_is_false(monkeypatch):
    def refuse(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libc.so.6")
    monkeypatch.setattr(ctypes, "CDLL", refuse)
    assert hostmem.keep_freed_memory() is False


def test_mallopt_refusing_a_value_is_false(monkeypatch):
    calls = []

    class Refusing:
        def __init__(self, name):
            self.mallopt = self._mallopt

        @staticmethod
        def _mallopt(param, value):
            calls.append((param, value))
            return 0  # glibc's "rejected"

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libc.so.6")
    monkeypatch.setattr(ctypes, "CDLL", Refusing)
    assert hostmem.keep_freed_memory() is False
    assert calls and calls[0] == (hostmem.M_MMAP_THRESHOLD, hostmem.MMAP_THRESHOLD)
