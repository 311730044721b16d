"""The embedded Prometheus' process handling, with a stand-in server on PATH named ``prometheus``.

Prometheus itself is optional and not installed on every machine (its scraping is tested in
test_prometheus.py where it is); what is tested here is :class:`EmbeddedPrometheus` starting, finding
and stopping its server process, which needs only a process that takes Prometheus' arguments and
answers ``/-/ready`` once it has started.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
import threading
import time

import psutil

from tessera.embedded.prometheus import EmbeddedPrometheus

STANDIN = """#!{python}
import http.server, os, sys, time
port = int([a for a in sys.argv if a.startswith("--web.listen-address=")][0].rsplit(":", 1)[1])
time.sleep(float(os.environ.get("STANDIN_DELAY_S", "0")))  # replaying its write-ahead log
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/-/ready" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Ready).serve_forever()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_second_up_while_the_server_starts_waits_for_it(tmp_path, monkeypatch):
    """A server still starting (not ready yet) when `tessera prometheus up` runs again: the second call
    waits for it. It used to start a second server beside it, which failed on the port, and left the pid
    file naming that dead one, so `prometheus down` could no longer stop the first."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "prometheus"
    script.write_text(STANDIN.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_DELAY_S", "4")
    home, discovery, port = tmp_path / "home", tmp_path / "discovery.json", _free_port()
    first = EmbeddedPrometheus(home, discovery, port=port)
    answers: list = []
    starting = threading.Thread(target=lambda: answers.append(first.start(timeout_s=60)))
    starting.start()
    try:
        deadline = time.monotonic() + 20
        while first.pid() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = first.pid()
        assert pid is not None and not first.ready()
        second = EmbeddedPrometheus(home, discovery, port=port)
        assert second.start(timeout_s=60) == second.url
        starting.join(60)
        assert answers == [first.url]
        assert second.pid() == pid and second.ready()  # the same server, and the pid file names it
    finally:
        starting.join(60)
        stopped = EmbeddedPrometheus(home, discovery, port=port).stop()
        for proc in psutil.process_iter(["cmdline"]):  # any stand-in the pid file lost track of
            if str(script) in (proc.info["cmdline"] or []):
                proc.kill()
    assert stopped and not EmbeddedPrometheus(home, discovery, port=port).ready()
