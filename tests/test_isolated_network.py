"""The network namespace the multi-node tests run their nodes in: what listens there is seen there
only, and the isolation check rejects any socket reachable from elsewhere."""

import subprocess
import sys

import pytest
from isolated_network import host_listening, isolated_network_or_skip, parse_listening

LISTEN = ("import socket, sys, time\nsock = socket.socket()\nsock.bind(('0.0.0.0', 0))\nsock.listen()\n"
          "print(sock.getsockname()[1], flush=True)\ntime.sleep(60)")


def test_parse_listening_reads_ipv4_and_ipv6_rows():
    tables = ("  sl  local_address rem_address   st\n"
              "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000\n"  # 127.0.0.1:8080 listening
              "   1: 0100007F:1F91 0100007F:D431 01 00000000:00000000\n"  # established: not listening
              "   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 0\n")
    assert parse_listening(tables) == {("127.0.0.1", 8080), ("::", 80)}


def test_a_listener_in_the_namespace_is_seen_there_only():
    net = isolated_network_or_skip()
    proc = subprocess.Popen(net.command([sys.executable, "-c", LISTEN]), stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        seen = net.listening()
        assert ("0.0.0.0", port) in seen
        assert net.pids() == [proc.pid]
        net.check_isolated(seen)
        assert port not in {p for _, p in host_listening()}
        with pytest.raises(AssertionError, match="listening on"):
            net.check_isolated(seen | {("192.0.2.7", port)})
        host_port = next(iter(host_listening()), None)
        if host_port is not None:
            with pytest.raises(AssertionError, match="also listen on this machine"):
                net.check_isolated(seen | {("127.0.0.1", host_port[1])})
    finally:
        proc.kill()
        proc.wait()
        left = net.close()
    assert not left
    assert net.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_without_root_the_multi_node_tests_skip_instead_of_using_this_machines_network(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="network namespace of its own"):
        isolated_network_or_skip()
