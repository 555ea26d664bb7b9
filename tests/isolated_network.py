"""A network namespace of a test's own, for tests that start several "nodes" on this machine.

A Ray cluster of more than one node listens on its nodes' network address (Ray refuses such a cluster
on 127.0.0.1), and torchrun's c10d rendezvous store listens on every interface (PyTorch's TCPStore has
no bind address). Run inside :class:`IsolatedNetwork`, every one of those sockets is in a namespace
whose only interface is its own loopback, carrying 127.0.0.1, ::1 and one private test address for
the nodes: nothing outside the test can reach them, and the machine's own network sees none of them.

Needs root and iproute2's ``ip netns``; :func:`isolated_network_or_skip` skips the test otherwise,
so that such a test never runs on the machine's network instead.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

WILDCARD = {"0.0.0.0", "::"}


class IsolatedNetwork:
    """A fresh network namespace (``ip netns``) with ``lo`` up and :attr:`address`, a private test
    address, on it; :meth:`command` runs a command in it; :meth:`close` deletes it."""

    def __init__(self) -> None:
        self.name = f"wbtest-{uuid.uuid4().hex[:12]}"
        self.address = f"10.213.{secrets.randbelow(254) + 1}.1"
        self._ip("netns", "add", self.name)
        try:
            self._ip("-n", self.name, "link", "set", "lo", "up")
            self._ip("-n", self.name, "addr", "add", f"{self.address}/32", "dev", "lo")
        except subprocess.CalledProcessError:
            self._ip("netns", "delete", self.name)
            raise

    @staticmethod
    def _ip(*args: str) -> str:
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=True, timeout=30).stdout

    @property
    def loopback(self) -> set[str]:
        """The addresses a socket of the test may listen on: loopback and the test address."""
        return {"127.0.0.1", "::1", self.address}

    def command(self, cmd: list[str]) -> list[str]:
        """``cmd`` run inside the namespace (``ip netns exec`` execs it: the same process id)."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def addresses(self) -> set[str]:
        """Every address on every interface of the namespace."""
        lines = self._ip("-n", self.name, "-o", "addr", "show").splitlines()
        return {line.split()[3].split("/")[0] for line in lines if line.split()[2] in ("inet", "inet6")}

    def pids(self) -> list[int]:
        """The processes running in the namespace."""
        return [int(pid) for pid in self._ip("netns", "pids", self.name).split()]

    def listening(self) -> set[tuple[str, int]]:
        """(address, port) of every TCP socket listening in the namespace."""
        tables = subprocess.run(self.command(["cat", "/proc/net/tcp", "/proc/net/tcp6"]), capture_output=True,
                                text=True, check=True, timeout=30).stdout
        return {(address, port) for address, port, _ in listening_rows(tables)}

    def listening_outside(self) -> set[tuple[str, int]]:
        """(address, port) of the sockets listening in this machine's own network that a process of
        the namespace holds (one it inherited, say): none expected."""
        held = set()
        for pid in self.pids():
            try:
                links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            except OSError:  # ended meanwhile
                continue
            held |= {link[len("socket:["):-1] for link in links if link.startswith("socket:[")}
        return {(address, port) for address, port, inode in host_listening_rows() if inode in held}

    def check_isolated(self, seen: set[tuple[str, int]], outside: set[tuple[str, int]]) -> None:
        """Assert that the sockets ``seen`` listening in the namespace are reachable from nowhere
        but the namespace: on loopback or the test address (or on all interfaces, which here are
        only those), with the namespace holding no other address; and that its processes held no
        socket listening in this machine's own network (``outside``, from :meth:`listening_outside`)."""
        assert seen, "the test's processes listen somewhere"
        assert self.addresses() <= self.loopback, f"the namespace has other addresses: {self.addresses()}"
        assert {address for address, _ in seen} <= self.loopback | WILDCARD, f"listening on {seen}"
        assert not outside, f"the test's processes listen on this machine's network: {sorted(outside)}"

    def close(self) -> list[int]:
        """Delete the namespace; returns the processes that were still running in it (none expected)."""
        left = self.pids()
        self._ip("netns", "delete", self.name)
        return left


def listening_rows(tables: str) -> set[tuple[str, int, str]]:
    """(address, port, socket inode) of the LISTEN rows of /proc/net/tcp and /proc/net/tcp6 text."""
    found = set()
    for line in tables.splitlines():
        fields = line.split()
        if len(fields) < 10 or fields[3] != "0A" or ":" not in fields[1]:  # 0A: LISTEN; skips the headers
            continue
        address, port = fields[1].split(":")
        raw = bytes.fromhex(address)
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian 32-bit words
        ip = ipaddress.ip_address(words)
        found.add((str(getattr(ip, "ipv4_mapped", None) or ip), int(port, 16), fields[9]))
    return found


def host_listening_rows() -> set[tuple[str, int, str]]:
    """:func:`listening_rows` of this process's own network namespace."""
    return listening_rows("\n".join(Path(table).read_text() for table in ("/proc/net/tcp", "/proc/net/tcp6")))


def host_listening_ports() -> set[int]:
    """The ports TCP sockets listen on in this process's own network namespace."""
    return {port for _, port, _ in host_listening_rows()}


def isolated_network_or_skip() -> IsolatedNetwork:
    """A new :class:`IsolatedNetwork`, or the test is skipped (with the reason) where none can be made."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs a network namespace of its own (root and iproute2's `ip netns`) so that its nodes "
                    "listen on no network of this machine")
    try:
        return IsolatedNetwork()
    except (subprocess.CalledProcessError, OSError) as error:
        detail = getattr(error, "stderr", None) or error
        pytest.skip(f"cannot create a network namespace for the test's nodes: {detail}")
