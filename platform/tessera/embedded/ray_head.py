"""Embedded Ray head: ``ray start --head`` on 127.0.0.1 with token authentication on.

The token is generated once into ``<home>/ray/auth_token`` (mode 0600) and handed to Ray through
``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``, the same variables a client needs for
``ray job submit``. The head is started with the object store's credentials in its environment, so
jobs and their workers reach S3 the way they would through an instance role on a real cluster, and
with the project's virtualenv first on ``PATH`` so that ``python -m jobs.<name>`` runs in it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tessera.embedded.state import write_private

MAX_WORKER_PORT = 17999


def port_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:``port`` (a bind there succeeds; connections of a server
    stopped just now, in TIME_WAIT, do not count: Ray's servers reuse such addresses too)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class EmbeddedRay:
    """A Ray head whose state (auth token) lives under ``home/ray``.

    Args:
        home: the state folder.
        port_offset: added to the fixed Ray ports (GCS 6379, dashboard 8265, dashboard agent 52365;
            the Ray client's 10001 moves to 20000 + offset), so that a second head (tests) can run
            beside the demo's.
        num_cpus / num_gpus: resources to advertise (logical GPUs work without a GPU).
        single_node: keep every Ray server of the head on 127.0.0.1 (see :meth:`loopback_env`); a
            head that worker nodes will join (the fault tests' clusters) needs False.
    """

    def __init__(self, home: Path, port_offset: int = 0, num_cpus: int | None = None,
                 num_gpus: int | None = None, single_node: bool = True):
        self.root = Path(home) / "ray"
        self.single_node = single_node
        self.port_offset = port_offset
        self.gcs_port = 6379 + port_offset
        self.dashboard_port = 8265 + port_offset
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus

    @property
    def client_port(self) -> int:
        # Ray's worker ports take 10002-19999, so a shifted client server port goes above them
        return 10001 if self.port_offset == 0 else 20000 + self.port_offset

    @property
    def agent_port(self) -> int:
        """The dashboard agent's HTTP port (job submission goes through it)."""
        return 52365 + self.port_offset

    @property
    def token_file(self) -> Path:
        return self.root / "auth_token"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def temp_dir(self) -> str:
        """This head's own Ray temp dir (short: Ray's socket paths must stay under 107 bytes).

        Every Ray process of this head carries it on its command line, which is how :meth:`stop`
        stops this head and no other Ray on the machine (a head at another port offset on the same state
        folder has its own)."""
        key = str(self.root.resolve()) + (f":{self.port_offset}" if self.port_offset else "")  # offset 0: as before
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        return f"/tmp/tessera-ray-{digest}"

    def client_env(self) -> dict[str, str]:
        """What a client needs: ``ray job submit`` reads RAY_API_SERVER_ADDRESS (the dashboard),
        a driver's ``ray.init()`` reads RAY_ADDRESS (the GCS). A driver outside the cluster also
        rewrites a 127.0.0.1 address to the machine's, where a single-node head's GCS does not
        listen (it hung "waiting for GCS"), unless it runs in single-node mode too."""
        env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file),
               "RAY_API_SERVER_ADDRESS": self.dashboard_url, "RAY_ADDRESS": f"127.0.0.1:{self.gcs_port}"}
        if self.single_node:
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        return env

    def loopback_env(self) -> dict[str, str]:
        """Settings that keep every server of the head on 127.0.0.1, and its metrics on its own ports.

        Ray 2.60 has no bind-address option for the GCS, the raylet, the agents or the Ray client
        server: each binds to all interfaces unless the node's IP is loopback, and ``ray start``
        replaces ``--node-ip-address=127.0.0.1`` with the machine's address
        (``ray._private.services.resolve_ip_for_localhost``). Ray's single-node mode, the default on
        macOS and Windows (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), keeps the node IP at 127.0.0.1,
        so every server listens on loopback only. The price: no worker node can join such a head
        (``ray start --address=127.0.0.1:...`` also rewrites the address to the machine's, where the
        GCS does not listen, and refuses to start a worker node in that mode), hence ``single_node``.

        The autoscaler's and the dashboard's metrics ports (44217, 44227, fixed) move with the port
        offset, so that a second head's service discovery file lists its own endpoints, not the demo's.
        """
        env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"} if self.single_node else {}
        if self.port_offset:
            env.update({"AUTOSCALER_METRIC_PORT": str(44217 + self.port_offset),
                        "DASHBOARD_METRIC_PORT": str(44227 + self.port_offset)})
        return env

    def ensure_token(self) -> None:
        if not self.token_file.exists():
            write_private(self.token_file, secrets.token_hex(32))

    def _ray(self) -> str:
        return str(Path(sys.executable).parent / "ray")

    def running(self) -> bool:
        """True when this head's processes run (found by its temp dir) and its dashboard answers an
        authenticated request. Another Ray's dashboard on the port is not this head: a local Ray that a
        job started without env.sh answers any token (it has no auth), and `tessera ray up` took it for
        the head, started nothing and wrote env.sh naming a GCS nobody ran."""
        if not self.token_file.exists() or not self._gcs_running():
            return False
        req = urllib.request.Request(f"{self.dashboard_url}/api/version",
                                     headers={"Authorization": f"Bearer {self.token_file.read_text().strip()}"})
        try:
            with urllib.request.urlopen(req, timeout=3) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self, extra_env: dict[str, str] | None = None, timeout_s: float = 120.0,
              ports_wait_s: float = 30.0) -> None:
        """Start the head unless one already answers; ``extra_env`` goes to every Ray process. Its ports
        must be free (waiting up to ``ports_wait_s`` for them)."""
        self.ensure_token()
        if self.running():
            return
        # ray start succeeds with a port held, and the part that needs it fails: an agent without its HTTP
        # port (a local Ray of a test session still exiting holds 52365) makes every `ray job submit`
        # fail with "No available agent to submit job". Wait a little for such a port, then say which.
        wait_until = time.monotonic() + ports_wait_s
        while (held := [f"{port} ({what})" for port, what in self.ports().items() if not port_free(port)]) \
                and time.monotonic() < wait_until:
            time.sleep(1.0)
        if held:
            raise RuntimeError(f"Ray head ports in use by another process: {', '.join(held)}; stop that "
                               "process (an earlier Ray: `ray stop`, or a test session still exiting) or "
                               "choose another port offset")
        env = dict(os.environ)
        env.update(extra_env or {})
        env.update(self.client_env())
        env.pop("RAY_ADDRESS")
        env.pop("RAY_API_SERVER_ADDRESS")
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(self.loopback_env())
        env.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # Train runs, attempts, workers in the dashboard
        # Ray processes that look the cluster up by itself (Ray Train's state actor and placement-group
        # cleaner call the state API with address "auto") read RAY_ADDRESS, else the default temp dir's
        # ray_current_cluster file, which this head (its own temp dir) never writes: a stale file there
        # named another cluster, and their threads died waiting for a GCS that was not there.
        env["RAY_ADDRESS"] = f"127.0.0.1:{self.gcs_port}"
        cmd = [self._ray(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--ray-client-server-port={self.client_port}",
               f"--dashboard-agent-listen-port={self.agent_port}",
               # workers' ports stay below the demo store's gRPC ports (SeaweedFS's 18333-19340, inside
               # Ray's default 10002-19999): a worker given one of them could not start its server
               f"--max-worker-port={MAX_WORKER_PORT}",
               "--disable-usage-stats", f"--temp-dir={self.temp_dir}"]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        if self.num_gpus is not None:
            cmd.append(f"--num-gpus={self.num_gpus}")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"ray start failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # the dashboard answers before the head's agent is up; `ray job submit` meanwhile fails with
            # "No available agent to submit job" (it waits 10 s for one), so wait for both
            if self.running() and not port_free(self.agent_port):
                return
            time.sleep(1.0)
        self.stop()  # not left half-started, holding its ports
        raise TimeoutError(f"Ray dashboard ({self.dashboard_url}) and its agent (port {self.agent_port}) did not both "
                           f"answer within {timeout_s:.0f}s; see {self.temp_dir}/session_latest/logs")

    def ports(self) -> dict[int, str]:
        """The fixed ports this head listens on: ``{port: what}``."""
        return {self.gcs_port: "GCS", self.dashboard_port: "dashboard", self.client_port: "Ray client server",
                self.agent_port: "dashboard agent"}

    def _gcs_running(self) -> bool:
        """Whether a GCS server of this head (its temp dir on the command line) is running."""
        import psutil

        for proc in psutil.process_iter(["name", "cmdline"]):
            cmdline = proc.info.get("cmdline") or []
            if cmdline and "gcs_server" in cmdline[0] and any(self.temp_dir in arg for arg in cmdline):
                return True
        return False

    def _processes(self) -> list:
        """This head's processes: those naming its temp dir, their descendants (workers and agents
        rename themselves), and the Ray client server, which names the GCS port instead."""
        import psutil

        found: dict[int, psutil.Process] = {}
        client_marker = f":{self.gcs_port} "
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info.get("cmdline") or []) + " "
            if self.temp_dir in cmdline or ("ray.util.client.server" in cmdline and client_marker in cmdline):
                found[proc.pid] = proc
                try:
                    found.update({c.pid: c for c in proc.children(recursive=True)})
                except psutil.NoSuchProcess:
                    pass
        return list(found.values())

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop this head's processes (and with its raylet, its workers); other Rays are left alone."""
        import psutil

        procs = self._processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout_s)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        return bool(procs)
