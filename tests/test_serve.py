"""serve.py on a shared machine: the names it answers to, pages that may drive it, idle and resetting clients,
the addresses it listens on, and one line for each mistake.

The tests run serve.py's server in this process on 127.0.0.1 with a tiny untrained model (tiny_models in
conftest.py), with few connections and short timeouts, so they need no subprocess (except the --out_dir checks).
"""
import json
import socket
import threading
import time

import pytest

from configurator import UserError
from conftest import assert_user_error, run_script

import serve


def start(models, host="127.0.0.1", **kwargs):
    server = serve.make_server(host, 0, models, "<html>the page</html>", **kwargs)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server(tiny_models):
    s = start(tiny_models, max_connections=4, timeout=2.0)
    yield s
    s.shutdown()
    s.server_close()


def request(server, path, headers=(), host="127.0.0.1"):
    """(status, body) of a raw HTTP/1.1 GET with exactly the given headers (a list of "Name: value")."""
    with socket.create_connection((host, server.server_address[1]), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\n{''.join(h + chr(13) + chr(10) for h in headers)}"
                  f"Connection: close\r\n\r\n".encode())
        reply = s.makefile("rb").read().decode()
    head, _, body = reply.partition("\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("host_header", ["127.0.0.1", "127.0.0.1:8000", "localhost", "LOCALHOST:1", "localhost.:80",
                                         "[::1]", "[::1]:8000", "10.1.2.3:8000"])
def test_own_names_are_served(server, host_header):
    status, body = request(server, "/", [f"Host: {host_header}"])
    assert status == 200 and body == "<html>the page</html>"


@pytest.mark.parametrize("path", ["/", "/generate?max_new_tokens=1", "/nothing"])
@pytest.mark.parametrize("host_header", ["attacker.example:8000", "attacker.example", "localhost.attacker.example",
                                         "127.0.0.1.nip.io:8000", ""])
def test_a_foreign_host_gets_403_with_the_reason(server, path, host_header):
    status, body = request(server, path, [f"Host: {host_header}"])
    assert status == 403 and "does not answer to the name" in json.loads(body)["error"]


def test_the_host_that_serve_listens_on_is_its_name_too():
    names = serve.own_names("storybox.local")
    assert serve.is_own_name("storybox.local", names) and not serve.is_own_name("evil.local", names)
    assert socket.gethostname().lower() in serve.own_names("0.0.0.0")


@pytest.mark.parametrize("headers", [["Origin: http://attacker.example"], ["Origin: http://127.0.0.1:1"],
                                     ["Origin: https://127.0.0.1:{port}"], ["Origin: null"],
                                     ["Sec-Fetch-Site: cross-site"], ["Sec-Fetch-Site: same-site"]])
def test_generate_refuses_other_pages(server, headers):
    port = server.server_address[1]
    status, body = request(server, "/generate?max_new_tokens=1",
                           [f"Host: 127.0.0.1:{port}", *(h.format(port=port) for h in headers)])
    assert status == 403 and "answers only this server's own page" in json.loads(body)["error"]


def test_generate_answers_its_own_page(server):
    port = server.server_address[1]
    for headers in ([f"Origin: http://127.0.0.1:{port}", "Sec-Fetch-Site: same-origin"],
                    [f"Origin: http://localhost:{port}"], ["Sec-Fetch-Site: none"], []):
        host = "localhost" if "localhost" in "".join(headers) else "127.0.0.1"
        status, body = request(server, "/generate?max_new_tokens=2", [f"Host: {host}:{port}", *headers])
        assert status == 200 and '"done": true' in body, (headers, body)


def test_idle_connections_cannot_hold_threads(tiny_models):
    """4 slots, 2 s timeout: 12 silent clients get at most 4 threads; the others are answered 503 at once, and
    the silent ones are disconnected after the timeout, so a real request is served again."""
    before = threading.active_count()
    server = start(tiny_models, max_connections=4, timeout=2.0)
    try:
        idle = [socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) for _ in range(12)]
        busy = [s.recv(4096) for s in idle[4:]]  # the accepting thread handles connections in order
        assert all(b.startswith(b"HTTP/1.0 503") and b"max_connections" in b for b in busy)
        assert threading.active_count() <= before + 1 + 4  # the serving thread and one per slot
        assert all(s.recv(4096) == b"" for s in idle[:4])  # disconnected after 2 s of silence (408 is not sent)
        for s in idle:
            s.close()
        deadline = time.monotonic() + 30  # the slots are released as the handler threads end
        while (status := request(server, "/", ["Host: localhost"])[0]) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200
    finally:
        server.shutdown()
        server.server_close()


def test_a_client_that_resets_the_connection_leaves_no_traceback(server, capsys):
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", server.server_address[1]))
        s.sendall(b"GET /generate?max_new_tokens=200 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close with a reset (RST)
        s.close()
    assert request(server, "/", ["Host: localhost"])[0] == 200
    try:
        raise ConnectionResetError(104, "Connection reset by peer")
    except ConnectionResetError:
        server.handle_error(None, ("127.0.0.1", 1))  # what socketserver calls with the error being handled
    assert "Traceback" not in capsys.readouterr().err


def test_ipv6_loopback(tiny_models):
    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6")
    try:
        server = start(tiny_models, host="::1")
    except Exception as e:  # a machine (container) whose loopback has no ::1
        pytest.skip(f"no IPv6 loopback here: {e}")
    try:
        assert server.loopback and request(server, "/", ["Host: [::1]"], host="::1")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_listen_errors_are_one_line(tiny_models):
    with pytest.raises(UserError, match="not an address or a name this machine can resolve"):
        serve.make_server("no-such-host.invalid", 0, tiny_models, "")
    with pytest.raises(UserError, match="not an address of this machine"):
        serve.make_server("192.0.2.1", 0, tiny_models, "")  # TEST-NET-1: never this machine's
    s = serve.make_server("127.0.0.1", 0, tiny_models, "")
    try:
        with pytest.raises(UserError, match="is another server running there"):
            serve.make_server("127.0.0.1", s.server_address[1], tiny_models, "")
    finally:
        s.server_close()


@pytest.mark.parametrize("address,loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                              ("0.0.0.0", False), ("::", False), ("192.168.1.5", False),
                                              ("fe80::1%lo", False)])
def test_which_addresses_get_the_open_to_the_network_warning(address, loopback):
    assert serve.is_loopback(address) is loopback  # main warns when False; no test listens beyond 127.0.0.1


@pytest.mark.slow
@pytest.mark.parametrize("out_dir,message", [("{d},", "has an empty entry"), ("{f}", "is a file, not a folder")])
def test_serve_out_dir_entries_are_checked(tmp_path, out_dir, message):
    (tmp_path / "file").write_text("x")
    proc = run_script("serve.py", "--out_dir=" + out_dir.format(d=tmp_path, f=tmp_path / "file"), "--port=0",
                      "--device=cpu", check=False)
    assert_user_error(proc, message)
