"""The network namespace the multi-node tests run their nodes in: what listens there is seen there
only, and the isolation check rejects any socket reachable from elsewhere."""

import socket
import subprocess
import sys

import pytest
from isolated_network import host_listening_ports, isolated_network_or_skip, listening_rows

LISTEN = ("import socket, sys, time\nsock = socket.socket()\nsock.bind(('0.0.0.0', 0))\nsock.listen()\n"
          "print(sock.getsockname()[1], flush=True)\ntime.sleep(60)")


def test_listening_rows_read_ipv4_and_ipv6_tables():
    tables = ("  sl  local_address rem_address   st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode\n"
              "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1111 1\n"
              "   1: 0100007F:1F91 0100007F:D431 01 00000000:00000000 00:00000000 00000000 0 0 2222 1\n"  # connected
              "   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A "
              "00000000:00000000 00:00000000 00000000 0 0 3333 1\n")
    assert listening_rows(tables) == {("127.0.0.1", 8080, "1111"), ("::", 80, "3333")}


def test_a_listener_in_the_namespace_is_seen_there_only():
    net = isolated_network_or_skip()
    proc = subprocess.Popen(net.command([sys.executable, "-c", LISTEN]), stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        seen = net.listening()
        assert ("0.0.0.0", port) in seen
        assert net.pids() == [proc.pid]
        assert port not in host_listening_ports()
        net.check_isolated(seen, net.listening_outside())
        with pytest.raises(AssertionError, match="listening on"):
            net.check_isolated(seen | {("192.0.2.7", port)}, set())
    finally:
        proc.kill()
        proc.wait()
        left = net.close()
    assert not left
    assert net.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_a_socket_of_this_machines_network_held_in_the_namespace_is_found():
    net = isolated_network_or_skip()
    with socket.socket() as host_sock:
        host_sock.bind(("127.0.0.1", 0))
        host_sock.listen()
        port = host_sock.getsockname()[1]
        proc = subprocess.Popen(net.command([sys.executable, "-c", "print(1, flush=True); input()"]),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, pass_fds=[host_sock.fileno()])
    try:
        proc.stdout.readline()
        outside = net.listening_outside()
        assert outside == {("127.0.0.1", port)}
        with pytest.raises(AssertionError, match="listen on this machine's network"):
            net.check_isolated({("127.0.0.1", 1)}, outside)
    finally:
        proc.kill()
        proc.wait()
        net.close()


def test_without_root_the_multi_node_tests_skip_instead_of_using_this_machines_network(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="network namespace of its own"):
        isolated_network_or_skip()
