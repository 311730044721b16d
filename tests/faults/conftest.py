"""Fixtures for fault tests: an object store and a multi-node Ray cluster of the test's own, as processes.

The session's SeaweedFS and in-process Ray are left alone: a fault test stops servers and kills nodes,
so it gets its own. ``fault_s3`` is a SeaweedFS on its own ports, data dir and credentials, which a
test may stop and restart in place (same ports, same data); while the module runs, ``os.environ``'s
S3 settings point at it. ``ray_cluster`` is a Ray head started as ``make ray-up`` starts one
(:class:`EmbeddedRay`: token auth, loopback dashboard, its own ports; its GCS and raylet on every
interface, since worker nodes cannot join a loopback-only head), to which a test adds worker nodes: each
is a ``ray start --address ... --block`` process group with its own temp dir, ports and resources,
killed as a whole by :meth:`WorkerNode.kill`. Jobs go in through the real ``ray job submit`` CLI;
their status, the cluster's nodes and actors are read from the head's REST API with the token.

Everything started here is stopped at module teardown, whether the tests passed or not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from tessera.embedded.ray_head import EmbeddedRay
from tessera.embedded.seaweedfs import EmbeddedS3, S3Connection
from tessera.storage import Storage, StorageConfig
from tests.conftest import REPO_ROOT, free_head_offsets, free_s3_ports

RAY = str(Path(sys.executable).with_name("ray"))
FAULT_ROOT = "s3://tessera-faults"
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")
# Head resources when a test module does not set RAY_HEAD (pytest's request.module pattern)
DEFAULT_HEAD = {"num_cpus": 2, "num_gpus": 0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def s3_environment(conn: S3Connection):
    """Point this process's AWS variables at ``conn`` (others unset) and restore them afterwards."""
    saved = {k: os.environ.get(k) for k in AWS_VARS}
    for k in AWS_VARS:
        os.environ.pop(k, None)
    os.environ.update(conn.env())
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class FaultS3:
    """An :class:`EmbeddedS3` a test stops and starts again on the same ports, data and credentials."""

    def __init__(self, server: EmbeddedS3):
        self.server = server
        self.conn = server.start()

    def stop(self, timeout_s: float = 5.0) -> float:
        """SIGTERM to the server's process group, SIGKILL after ``timeout_s`` (with clients connected,
        ``weed`` can take over 30 s to exit); returns the seconds it took. The S3 port closes at once."""
        t0 = time.monotonic()
        self.server.stop(timeout_s=timeout_s)
        return time.monotonic() - t0

    def start(self) -> float:
        """Start the server again and wait until it answers; returns the seconds it took."""
        t0 = time.monotonic()
        self.server.start()
        return time.monotonic() - t0


@pytest.fixture(scope="module")
def fault_s3(tmp_path_factory):
    """This module's own SeaweedFS (:class:`FaultS3`); the process's S3 variables point at it meanwhile."""
    server = EmbeddedS3(tmp_path_factory.mktemp("fault-s3"), ports=free_s3_ports())
    try:
        store = FaultS3(server)
        with s3_environment(store.conn):
            yield store
    finally:
        server.stop(timeout_s=5)


@pytest.fixture(scope="module")
def fault_storage(fault_s3) -> Storage:
    storage = Storage(StorageConfig())
    storage.ensure_bucket(FAULT_ROOT)
    return storage


# --- Ray: a head and worker nodes, as processes ------------------------------------------------------
def _processes(marker: str, pgid: int | None = None) -> list[psutil.Process]:
    """Processes naming ``marker`` on their command line or in process group ``pgid``, with descendants
    (Ray workers rename themselves ``ray::...`` and may leave the group)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            mine = marker in " ".join(proc.info.get("cmdline") or []) or (pgid is not None
                                                                          and os.getpgid(proc.pid) == pgid)
            if mine:
                found[proc.pid] = proc
                found.update({c.pid: c for c in proc.children(recursive=True)})
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _kill(procs: list[psutil.Process], sig: int = signal.SIGKILL) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
    psutil.wait_procs(procs, timeout=15)


@dataclass
class WorkerNode:
    """One worker node: ``ray start --address ... --block`` leading its own process group."""

    name: str
    proc: subprocess.Popen
    temp_dir: str
    resources: dict

    def processes(self) -> list[psutil.Process]:
        return _processes(self.temp_dir, pgid=self.proc.pid)

    def kill(self) -> int:
        """SIGKILL the node's raylet, agents and workers at once (a node lost, not drained); returns
        how many processes died."""
        procs = self.processes()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        _kill(procs)
        self.proc.wait(timeout=15)
        return len(procs)


@dataclass
class Job:
    """A submitted job; ``submitted_at`` is ``time.monotonic()`` at submission."""

    submission_id: str
    submitted_at: float
    cluster: "RayCluster"

    def info(self) -> dict:
        return self.cluster.api(f"/api/jobs/{self.submission_id}")

    def logs(self) -> str:
        return self.cluster.api(f"/api/jobs/{self.submission_id}/logs").get("logs", "")

    def wait(self, timeout_s: float, on_poll=None, since: float | None = None, every_s: float = 1.0) -> dict:
        """Poll until the job ends; returns its last info (``status``: SUCCEEDED / FAILED / STOPPED).

        ``timeout_s`` counts from ``since`` (a ``time.monotonic()``; default: now). While the job runs,
        ``on_poll(seconds since since)`` is called after each poll (a fault test records its milestones).
        """
        start = time.monotonic() if since is None else since
        while True:
            now = time.monotonic() - start
            info = self.info()
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info
            if now >= timeout_s:
                raise TimeoutError(f"job {self.submission_id} still {info['status']} after {now:.0f}s:\n"
                                   f"{self.logs()[-3000:]}")
            if on_poll is not None:
                on_poll(now)
            time.sleep(every_s)


class RayCluster:
    """A head (:class:`EmbeddedRay`) plus worker nodes on this machine, driven through processes only."""

    def __init__(self, home: Path, head: EmbeddedRay, env: dict[str, str]):
        self.home = home
        self.head = head
        self.env = env  # S3 settings every node hands to its workers
        self.nodes: list[WorkerNode] = []

    def client_env(self) -> dict[str, str]:
        """A user's shell for this cluster: its token and dashboard, no other Ray settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update({k: v for k, v in self.head.client_env().items() if k != "RAY_ADDRESS"})
        return env

    def api(self, path: str):
        """GET a path of the head's dashboard (Jobs and state REST APIs) with the token; the JSON answer."""
        token = self.head.token_file.read_text().strip()
        req = urllib.request.Request(self.head.dashboard_url + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def state(self, kind: str, **filters: str) -> list[dict]:
        """Rows of the state API (``nodes``, ``actors``, ``tasks``), e.g. ``state("actors", state="ALIVE")``."""
        query = "&".join(["limit=10000&detail=true"] + [
            f"filter_keys={k}&filter_predicates=%3D&filter_values={v}" for k, v in filters.items()])
        return self.api(f"/api/v0/{kind}?{query}")["data"]["result"]["result"]

    def add_node(self, num_cpus: int, num_gpus: int = 0, resources: dict | None = None,
                 object_store_mb: int = 512, timeout_s: float = 90.0, attempts: int = 2) -> WorkerNode:
        """Start a worker node and wait until the head lists it alive.

        ``ray start`` gives a raylet 30 s to register (hard-coded); on a machine shared with other
        work that can run out, so a node that did not come up is killed and started once more.
        """
        for attempt in range(1, attempts + 1):
            name = f"w{len(self.nodes)}"  # a retry gets a new name: the failed node may linger in the GCS
            node = self._start_node(name, num_cpus, num_gpus, {f"node_{name}": 1, **(resources or {})},
                                    object_store_mb)
            self.nodes.append(node)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and node.proc.poll() is None:
                if self.node_id(node, alive=True):
                    return node
                time.sleep(1.0)
            log = (self.home / f"{name}.log").read_text(errors="replace")[-3000:]
            node.kill()
            if attempt == attempts:
                raise RuntimeError(f"worker node {name} did not join (exit {node.proc.returncode}):\n{log}")
            print(f"[faults] worker node {name} did not join (attempt {attempt}), starting it again:\n{log[-500:]}")
        raise AssertionError("unreachable")

    def _start_node(self, name: str, num_cpus: int, num_gpus: int, resources: dict,
                    object_store_mb: int) -> WorkerNode:
        digest = hashlib.sha1(str(self.home.resolve()).encode()).hexdigest()[:8]
        temp_dir = f"/tmp/tessera-fault-{digest}-{name}"  # short: Ray's socket paths stay under 107 bytes
        env = {**os.environ, **self.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.head.token_file),
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        cmd = [RAY, "start", f"--address=127.0.0.1:{self.head.gcs_port}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", f"--resources={json.dumps(resources)}",
               f"--object-store-memory={object_store_mb * 2**20}",
               f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               "--include-log-monitor=false", "--disable-usage-stats", "--block"]
        with open(self.home / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        return WorkerNode(name, proc, temp_dir, resources)

    def node_id(self, node: WorkerNode, alive: bool | None = None) -> str | None:
        """The Ray node id of ``node`` (found by its own resource), or None; ``alive`` filters by state."""
        for row in self.state("nodes"):
            if f"node_{node.name}" in (row.get("resources_total") or {}):
                if alive is None or (row["state"] == "ALIVE") == alive:
                    return row["node_id"]
        return None

    def submit(self, *entrypoint: str, env_vars: dict[str, str] | None = None) -> Job:
        """``ray job submit --no-wait --working-dir <repo> [--runtime-env-json {"env_vars": ...}] -- <entrypoint>``."""
        sid = f"fault-{uuid.uuid4().hex[:10]}"
        runtime_env = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
        cmd = [RAY, "job", "submit", "--address", self.head.dashboard_url, "--working-dir", str(REPO_ROOT),
               "--submission-id", sid, "--no-wait", *runtime_env, "--", *entrypoint]
        for _ in range(30):  # the job agent comes up a little after the head; the CLI says so
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO_ROOT,
                                  env=self.client_env(), check=False)
            if "No available agent" not in done.stdout + done.stderr:
                break
            time.sleep(2)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return Job(sid, time.monotonic(), self)

    def stop(self) -> None:
        """Kill the worker nodes (nothing on them is worth a graceful stop) and stop the head."""
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.kill()
        self.head.stop(timeout_s=5)
        _kill(_processes(self.head.temp_dir))
        for temp_dir in {n.temp_dir for n in self.nodes} | {self.head.temp_dir}:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster(request, tmp_path_factory, fault_s3):
    """A Ray head of this module's own, wired to ``fault_s3``; tests add worker nodes with ``add_node``.

    The head's resources come from the test module's ``RAY_HEAD`` dict (default 2 CPUs, no GPU). A head
    that fails to start (another test session took its ports meanwhile) is retried on the next offset.
    """
    spec = {**DEFAULT_HEAD, **getattr(request.module, "RAY_HEAD", {})}
    cluster = None
    try:
        for offset in free_head_offsets(from_top=True)[:3]:
            home = tmp_path_factory.mktemp("fault-ray")
            # not single_node: worker nodes join through the machine's address (see EmbeddedRay.loopback_env)
            head = EmbeddedRay(home, port_offset=offset, single_node=False, **spec)
            cluster = RayCluster(home, head, fault_s3.conn.env())
            try:
                cluster.head.start(extra_env=cluster.env)
                break
            except RuntimeError as err:
                print(f"[faults] Ray head on offset {offset} did not start, trying another: {str(err)[-300:]}")
                cluster.stop()
                cluster = None
        assert cluster is not None, "no Ray head could be started"
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()


# --- data: a small corpus and seeded encoder weights in the fault store ------------------------------
@pytest.fixture(scope="module")
def fault_corpus(request, fault_storage, shared_data):
    """Items of the sample corpus generator (every kind of bad item, some real media) in the fault store,
    written part by part in this process (no Ray needed): ``{"config": CorpusConfig, "truth": {item_id: row}}``.
    A test module's ``CORPUS`` dict overrides the sizes (e.g. ``items_per_part``)."""
    import pyarrow.parquet as pq

    from tessera.corpus import CorpusConfig
    from tessera.corpus.catalog import BAD_KINDS
    from tessera.corpus.generate import write_item_part

    sizes = {"num_items": 120, "items_per_part": 40, **getattr(request.module, "CORPUS", {})}
    cfg = CorpusConfig(root=f"{FAULT_ROOT}/{uuid.uuid4().hex[:8]}", num_users=10, **sizes,
                       image_size=48, audio_seconds=0.5, bad={k: 0.02 for k in BAD_KINDS},
                       real_media={"enabled": True, "data_dir": str(shared_data), "share": 0.1})
    for part in range(cfg.num_item_parts):
        write_item_part(cfg, part)
    truth = {}
    for uri in fault_storage.list_files(f"{cfg.root}/truth/items", ".parquet"):
        fs, path = fault_storage.filesystem(uri)
        truth.update({r["item_id"]: r for r in pq.read_table(path, filesystem=fs).to_pylist()})
    return {"config": cfg, "truth": truth}


@pytest.fixture(scope="module")
def fault_weights(fault_storage) -> dict[str, str]:
    from tessera.encoders import write_seeded_weights

    return write_seeded_weights(f"{FAULT_ROOT}/models/encoders", fault_storage, seed=0)


def write_embed_config(path: Path, corpus: dict, weights: dict, run_id: str,
                       modalities: tuple[str, ...] = ("text", "image", "audio"), **pool) -> Path:
    """An embedding job config over ``corpus`` (small batches, so that many parts are written); the
    modalities left out are disabled (their columns stay null)."""
    pool = {"num_cpus": 0.25, "batch_size": 8, "torch_threads": 1, **pool}
    root = corpus["config"].root
    data = {
        "items_uri": f"{root}/corpus/items", "output_uri": f"{root}/embeddings", "run_id": run_id,
        "read_batch_rows": 20, "write_batch_size": 20,
        "text": {"pool": pool},
        "image": {"encoder": {"weights": weights["image"]}, "pool": pool},
        "audio": {"encoder": {"weights": weights["audio"], "clip_seconds": 0.5}, "pool": pool},
    }
    for m in ("text", "image", "audio"):
        data[m]["enabled"] = m in modalities
    path.write_text(yaml.safe_dump(data))
    return path


def encoder_actors(cluster: RayCluster, state: str | None = None) -> list[dict]:
    """The embedding job's encoder pool actors (state API rows: ``actor_id``, ``node_id``, ``state``...)."""
    rows = cluster.state("actors", state=state) if state else cluster.state("actors")
    return [a for a in rows if "EncodeActor" in a.get("class_name", "")]


def check_run(storage: Storage, run_uri: str, truth: dict, modalities: tuple[str, ...]) -> dict:
    """Assert that a finished run holds every input item exactly once, with the vector or the error its
    truth row calls for (a fault must not turn into per-item errors; disabled modalities stay null),
    and that the manifest's counts say the same. Returns the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tessera.embed.output import committed_parts
    from tests.embed.test_pipeline import EXPECTED

    manifest = storage.read_json(f"{run_uri}/_MANIFEST.json")
    n = len(truth)
    assert manifest["complete"] and manifest["input"]["items"] == manifest["output"]["rows"] == n
    for c in manifest["counts"].values():
        assert c["ok"] + c["failed"] + c["missing"] == n
    parts = committed_parts(storage, run_uri, manifest)
    assert len(parts) == manifest["output"]["parts"]
    table = pa.concat_tables([pq.read_table(storage.filesystem(u)[1], filesystem=storage.s3_filesystem())
                              for u in parts])
    ids = table.column("item_id").to_pylist()
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicate rows"
    assert set(ids) == set(truth)
    for row in table.to_pylist():
        t = truth[row["item_id"]]
        broken = EXPECTED[t["bad_kind"]] if t["bad_kind"] else None
        for m in ("text", "image", "audio"):
            err = row[f"{m}_error"]
            if m not in modalities:
                assert row[m] is None and err is None
            elif broken and broken[0] == m:
                assert err is not None and err.split(":", 1)[0] == broken[1], (row["item_id"], err)
            else:
                assert err is None, (row["item_id"], m, err)
                assert (row[m] is not None) == bool(t[f"has_{m}"]), (row["item_id"], m)
    for m in modalities:
        assert manifest["counts"][m]["ok"] == table.column(m).drop_null().length()
    return manifest
