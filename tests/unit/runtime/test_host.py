"""tinydist.runtime.host and quote: the one machine identity and pid check (the checkpoint lease and
the decode cache's temp folders judge other processes by them), and the one way a message of ours
quotes an exception or a service's answer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tinydist.data import cache_files
from tinydist.runtime.quote import QUOTE_LIMIT, clipped, first_line
from tinydist.runtime.host import machine_id, pid_alive


def test_machine_id_is_host_boot_and_pid_namespace_and_stable() -> None:
    host, boot, namespace = machine_id().split("/")
    assert host == socket.gethostname() and boot and namespace and machine_id() == machine_id()
    if os.path.exists("/proc/sys/kernel/random/boot_id"):  # Linux: a reboot is another machine to a pid
        assert boot != "?" and namespace.isdigit()


def test_the_cache_names_temp_folders_by_the_same_machine() -> None:
    tag = cache_files.machine_tag()
    assert tag.replace("_", "").replace("-", "").replace(".", "").isalnum() and len(tag) <= 130
    assert tag.endswith(machine_id().rsplit("/", 1)[1])
    assert cache_files.temp_folder("/c/x").endswith(f".tmp-{os.getpid()}-{tag}")


def test_pid_alive_of_ourselves_a_reaped_child_and_what_names_no_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    assert pid_alive(os.getpid()) and not pid_alive(child.pid)
    for nothing in (0, -1, None, "123", 1.0):  # a lease file is JSON anyone may have written
        assert not pid_alive(nothing)


def test_first_line_quotes_the_first_line_folded_and_cut() -> None:
    error = OSError("disk  says\tno\nTraceback-like tail\nmore advice")
    assert first_line(error) == "disk says no"
    assert first_line(error, named=True) == "OSError: disk says no"
    assert first_line(ValueError()) == first_line(ValueError("  \n"), named=True) == "ValueError"
    assert len(first_line(RuntimeError("x" * 1000))) == QUOTE_LIMIT


def test_clipped_keeps_all_of_a_short_answer_and_marks_a_cut() -> None:
    assert clipped("<html>\n  <body>busy</body>\n</html>") == "<html> <body>busy</body> </html>"
    assert clipped("a b " * 50, 20) == "a b a b a b a b a..." and len(clipped("y" * 500)) == QUOTE_LIMIT
