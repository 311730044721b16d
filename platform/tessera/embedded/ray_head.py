"""Embedded Ray head: ``ray start --head`` on 127.0.0.1 with token authentication on.

The token is generated once into ``<home>/ray/auth_token`` (mode 0600) and handed to Ray through
``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``, the same variables a client needs for
``ray job submit``. The head is started with the object store's credentials in its environment, so
jobs and their workers reach S3 the way they would through an instance role on a real cluster, and
with the project's virtualenv first on ``PATH`` so that ``python -m jobs.<name>`` runs in it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tessera.embedded.state import write_private


class EmbeddedRay:
    def __init__(self, home: Path, dashboard_port: int = 8265, gcs_port: int = 6379,
                 num_cpus: int | None = None, num_gpus: int | None = None):
        self.root = Path(home) / "ray"
        self.dashboard_port = dashboard_port
        self.gcs_port = gcs_port
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus

    @property
    def token_file(self) -> Path:
        return self.root / "auth_token"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """What a client (``ray job submit``, ``ray.init``) needs to reach this head."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file),
                "RAY_ADDRESS": self.dashboard_url}

    def ensure_token(self) -> None:
        if not self.token_file.exists():
            write_private(self.token_file, secrets.token_hex(32))

    def _ray(self) -> str:
        return str(Path(sys.executable).parent / "ray")

    def running(self) -> bool:
        """True when the dashboard answers an authenticated request."""
        if not self.token_file.exists():
            return False
        req = urllib.request.Request(f"{self.dashboard_url}/api/version",
                                     headers={"Authorization": f"Bearer {self.token_file.read_text().strip()}"})
        try:
            with urllib.request.urlopen(req, timeout=3) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def start(self, extra_env: dict[str, str] | None = None, timeout_s: float = 120.0) -> None:
        """Start the head unless one already answers; ``extra_env`` goes to every Ray process."""
        self.ensure_token()
        if self.running():
            return
        env = dict(os.environ)
        env.update(extra_env or {})
        env.update(self.client_env())
        env.pop("RAY_ADDRESS")
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        cmd = [self._ray(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               "--disable-usage-stats"]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        if self.num_gpus is not None:
            cmd.append(f"--num-gpus={self.num_gpus}")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"ray start failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.running():
                return
            time.sleep(1.0)
        raise TimeoutError(f"Ray dashboard did not answer on {self.dashboard_url} within {timeout_s:.0f}s")

    def stop(self) -> None:
        env = dict(os.environ)
        env.update(self.client_env())
        subprocess.run([self._ray(), "stop", "--force"], env=env, capture_output=True, text=True)
