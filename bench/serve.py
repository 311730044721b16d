"""Benchmark: the recommender on Ray Serve under load, against the same pipeline in-process and a no-op Serve chain.

    .venv/bin/python bench/serve.py [--items 100000] [--duration 15] [--levels 1 5 20 50] [--noop-levels 1 20 50]

Runs on the embedded demo stack (``make demo``: SeaweedFS + the Ray head with token auth, the demo's
embedding run and model bundle); the settings come from ``.tessera/env.sh`` (variables already set
win). Unlike the other benches it does not start its own store and Ray: the app is measured behind
the demo's Serve proxy (127.0.0.1:8000), next to the demo app (idle meanwhile). When the stack is down
the bench brings it up (``make stack-up``; the store keeps the demo's artifacts between runs); when the
demo's run or bundle is missing then, it runs ``make demo`` first (~7 minutes on 2 cores, its log in
``.tessera/bench/serve-make-demo.log``; ``--no-demo`` exits instead, saying what is missing).

1. Version: a ``--items`` catalog made from the demo's real artifacts (``bench/_scaled.py``: the
   demo embedding run plus synthetic noisy copies, then the real index job with ``configs/index.yaml``
   and the demo bundle), cached in ``s3://tessera-bench/serve`` between runs. The house settings
   apply: shards tuned for recall@50 (the candidates the app retrieves) on their own vectors and on
   user vectors (at 100k items the two fused shards tuned to reordering depths 16000 and 4000; the
   job's user-query self-check then reads recall@10 0.98). ``--reorder`` pins the depth instead,
   ``num_neighbors`` is overridden only when the bundle retrieves another count than the config's.
2. In-process baseline: ``Flow(LocalStages(storage))`` in this process (1 torch thread, as each
   replica), one request at a time; request parsing and the response model included, no HTTP. Then
   the same requests paced, one every ``--in-process-gap-ms`` plus its own time (``paced``,
   ``in_process_paced_p50_ms``): a lone client through Serve leaves each stage idle between its calls,
   and its compute then runs 2-3x slower than back to back (cold CPU caches).
3. Two Serve apps on the same proxy, measured one after the other at each level (the no-op chain
   first at the 1st, 3rd... level, ours first at the others, so a load change on the shared machine
   does not always hit the same one): ours, ``build_app(RecommenderArgs(...))`` (the
   deployments' own settings: one replica each, 0.25 CPU) on ``/bench/recommender``; and the no-op
   chain on ``/bench/noop``: the same four deployments (FastAPI ingress awaiting three stage
   deployments one after the other) with bodies that return at once, one request per hop, and
   ``max_ongoing_requests`` raised (``--noop-max-ongoing``) so it does not queue: the floor of
   per-request Serve composition here.
4. Load: closed-loop clients (asyncio + aiohttp, keep-alive) in this process, on the same cores as
   Ray, each level a ``--warmup`` then a fixed ``--duration``; a fixed request mix (``MIX``). The
   machine is shared: before each measurement the bench waits (up to ``--quiet-wait``) for a moment
   with at most ``--quiet-cores`` busy, records what other work used meanwhile, and measures a level
   again (up to ``--retries`` times) when that was over ``--max-other-cores``, keeping the calmest.

``--logging-config`` deploys both apps with the same Serve ``LoggingConfig`` (JSON); with
``{"enable_access_log": false}`` (2026-12-07, one run, levels 1 and 20) neither app's Ingress used less
CPU a request: the access log is not what the Ingress spends its CPU on.

Per level: ``qps`` (200 answers per second), latency percentiles of the 200 answers, ``error_rate``
(non-200 or transport error), per-stage p50s from the response ``timings`` (one Flow per batch: the
time a request's batch spent in each stage; ``queue``: the request's wait in the Ingress for its batch
to run; ``ingress_total``: arrival in the Ingress to answer; ``outside_ingress`` = client latency minus
that: HTTP, proxy, routing to the Ingress), ``mean_batch_size`` (answers sharing one Flow run's
timings), and cores used over the level: the machine, the load
generator, each Ray actor of the cluster, and the rest (other work on the shared machine shows there).
Last line: one JSON object (``run`` returns it).
"""

# No `from __future__ import annotations`: the no-op ingress is defined in a function and pickled by
# value to its replica, and FastAPI must find its real request model on the route.

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tessera.embedded.state import read_env_file  # noqa: E402

BENCH_ROOT = "s3://tessera-bench/serve"
APP, NOOP_APP = "bench-recommender", "bench-noop-chain"
APP_PREFIX, NOOP_PREFIX = "/bench/recommender", "/bench/noop"
MIX = {"known_user": 0.70, "known_user_with_recent": 0.15, "anonymous_recent_items": 0.10, "unknown_user": 0.05}


# --- the request mix ---------------------------------------------------------------------------
class RequestMix:
    """Bodies of ``POST /v1/recommend``: known users of the snapshot (some with recent items), anonymous
    sessions of 1-5 recent items, unknown users (cold: popular items). Recent items come from the whole catalog."""

    def __init__(self, users: list[str], items: list[str], k: int = 10):
        self.users, self.items, self.k = users, items, k
        self.kinds = list(MIX)
        self.p = np.array([MIX[kind] for kind in self.kinds])

    def body(self, rng: np.random.Generator) -> dict:
        kind = self.kinds[rng.choice(len(self.kinds), p=self.p)]
        recent = [self.items[i] for i in rng.integers(0, len(self.items), rng.integers(1, 6))]
        if kind == "known_user":
            return {"user_id": self.users[rng.integers(len(self.users))], "k": self.k}
        if kind == "known_user_with_recent":
            return {"user_id": self.users[rng.integers(len(self.users))], "recent_item_ids": recent[:3], "k": self.k}
        if kind == "anonymous_recent_items":
            return {"recent_item_ids": recent, "k": self.k}
        return {"user_id": f"bench-unknown-{rng.integers(10**9)}", "k": self.k}


# --- statistics --------------------------------------------------------------------------------
@dataclass
class Sample:
    latency_s: float
    status: int | str
    timings: dict | None
    cold: bool = False


def _pct(values, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None


def summarize(samples: list[Sample], elapsed_s: float) -> dict:
    ok = [s for s in samples if s.status == 200]
    lat = np.array([s.latency_s for s in ok]) * 1000.0
    stages = {}
    timed = [s for s in ok if s.timings]
    from tessera.serving.schemas import TIMED_STAGES

    for stage in TIMED_STAGES:  # (the no-op chain's answers have no queue)
        stages[stage if stage != "total" else "ingress_total"] = _pct(
            [s.timings[f"{stage}_ms"] for s in timed if f"{stage}_ms" in s.timings], 50)
    stages["outside_ingress"] = _pct([s.latency_s * 1000.0 - s.timings["total_ms"] for s in timed], 50)
    # the requests of one Ingress batch share one Flow run, so identical stage timings mark a batch
    batches = len({tuple(s.timings.get(f"{k}_ms") for k in ("encode", "retrieve", "rank")) for s in timed})
    statuses: dict[str, int] = {}
    for s in samples:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    every = np.array([s.latency_s for s in samples]) * 1000.0  # failures too (a timeout is a slow answer)
    return {"qps": round(len(ok) / elapsed_s, 1), "p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95),
            "p99_ms": _pct(lat, 99), "p99_all_ms": _pct(every, 99),
            "mean_ms": round(float(lat.mean()), 3) if len(lat) else None,
            "error_rate": round(1.0 - len(ok) / len(samples), 5) if samples else None, "requests": len(samples),
            "statuses": statuses, "cold_start_share": round(sum(s.cold for s in ok) / len(ok), 3) if ok else None,
            "stage_p50_ms": stages, "mean_batch_size": round(len(timed) / batches, 2) if batches else None,
            "seconds": round(elapsed_s, 2)}


# --- load generator ----------------------------------------------------------------------------
async def _closed_loop(session, url: str, mix: RequestMix, clients: int, duration_s: float, seed: int,
                       out: list[Sample] | None) -> float:
    """``clients`` loops of request -> answer -> next request, none started after ``duration_s``."""
    deadline = time.perf_counter() + duration_s

    async def client(c: int) -> None:
        rng = np.random.default_rng([seed, c])
        while time.perf_counter() < deadline:
            body = mix.body(rng)
            t0 = time.perf_counter()
            timings, cold = None, False
            try:
                async with session.post(url, json=body) as resp:
                    status = resp.status
                    data = await resp.json() if status == 200 else await resp.read()
                    if status == 200:
                        timings, cold = data.get("timings"), bool(data.get("cold_start"))
            except Exception as err:  # a transport error, a timeout or a 200 with a bad body: this request's error
                status = type(err).__name__
            if out is not None:
                out.append(Sample(time.perf_counter() - t0, status, timings, cold))

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return time.perf_counter() - start


class CpuMeter:
    """Cores used over a window: the whole machine, this process (the load generator), and each Ray actor
    of the cluster (``actors``: pid -> name); ``other`` is the rest (Ray's raylet / GCS, other work on
    the shared machine)."""

    def __init__(self, actors: dict[int, str]):
        self.procs = {name: psutil.Process(pid) for pid, name in actors.items() if psutil.pid_exists(pid)}
        self.me = psutil.Process()
        self.known = {*actors, self.me.pid}

    def _others(self) -> dict[int, tuple[str, float]]:
        out = {}
        for proc in psutil.process_iter(["name", "cpu_times"]):
            t = proc.info["cpu_times"]
            if proc.pid not in self.known and t is not None:
                out[proc.pid] = (proc.info["name"] or "?", t.user + t.system)
        return out

    @staticmethod
    def _used(proc: psutil.Process) -> float:
        try:
            t = proc.cpu_times()
        except psutil.Error:  # the process ended: counts as idle from here
            return 0.0
        return t.user + t.system

    def start(self) -> None:
        psutil.cpu_percent(None)
        self.t0 = time.perf_counter()
        self.before = {name: self._used(p) for name, p in self.procs.items()}
        self.me0 = self._used(self.me)
        self.others0 = self._others()

    def stop(self) -> dict:
        elapsed = time.perf_counter() - self.t0
        machine = psutil.cpu_percent(None) / 100.0 * (psutil.cpu_count() or 1)
        actors = {name: (self._used(p) - self.before[name]) / elapsed for name, p in self.procs.items()}
        me = (self._used(self.me) - self.me0) / elapsed
        busy = {name: round(c, 2) for name, c in sorted(actors.items(), key=lambda x: -x[1]) if c >= 0.01}
        others: dict[str, float] = {}
        for pid, (name, used) in self._others().items():  # processes started meanwhile count from 0
            others[name] = others.get(name, 0.0) + (used - self.others0.get(pid, (name, 0.0))[1]) / elapsed
        top = {name: round(c, 2) for name, c in sorted(others.items(), key=lambda x: -x[1])[:6] if c >= 0.01}
        return {"machine_cores": round(machine, 2), "load_generator_cores": round(me, 2),
                "ray_actor_cores": round(sum(actors.values()), 2),
                "other_cores": round(max(machine - me - sum(actors.values()), 0.0), 2), "by_actor": busy,
                "other_top": top}


async def load_level(url: str, mix: RequestMix, clients: int, duration_s: float, warmup_s: float, seed: int,
                     cpu: CpuMeter) -> dict:
    """One concurrency level: warm-up (not recorded), then ``duration_s`` recorded."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        await _closed_loop(session, url, mix, clients, warmup_s, seed + 1, None)
        samples: list[Sample] = []
        cpu.start()
        elapsed = await _closed_loop(session, url, mix, clients, duration_s, seed, samples)
        used = cpu.stop()
    return {"clients": clients, **summarize(samples, elapsed), "cpu_cores": used}


def wait_for_quiet(max_busy_cores: float, timeout_s: float, window_s: float = 2.0) -> dict:
    """Before a level on a shared machine: wait until a ``window_s`` window has at most ``max_busy_cores`` busy
    (the apps idle), or ``timeout_s`` passed; returns how long it waited and the last window's busy cores."""
    start = time.monotonic()
    ncpu = psutil.cpu_count() or 1
    while True:
        busy = psutil.cpu_percent(interval=window_s) / 100.0 * ncpu
        waited = time.monotonic() - start
        if busy <= max_busy_cores or waited >= timeout_s:
            return {"waited_s": round(waited, 1), "busy_cores_before": round(busy, 2),
                    "quiet": busy <= max_busy_cores}


def cluster_actors(apps: tuple[str, ...]) -> dict[int, str]:
    """pid -> name of the live actors of the connected Ray cluster (replicas of ``apps`` as ``<app>/<deployment>``,
    other apps' replicas as ``other-app replicas``)."""
    from ray.util.state import list_actors

    out = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False):
        name = actor.class_name
        if name.startswith("ServeReplica:"):
            _, app, deployment = name.split(":", 2)
            name = f"{app}/{deployment}" if app in apps else "other-app replicas"
        if actor.pid:
            out[int(actor.pid)] = name if name not in out.values() else f"{name}#{actor.pid}"
    return out


# --- the no-op chain ---------------------------------------------------------------------------
def noop_chain_app(max_ongoing: int, num_cpus: float):
    """Ingress (FastAPI, same request model) awaiting three stage deployments in turn, one call per
    request per hop; every body returns at once. ``timings`` as ours: the time each hop took."""
    from fastapi import FastAPI
    from ray import serve

    from tessera.serving.schemas import RecommendRequest

    api = FastAPI(title="no-op chain")
    options = {"max_ongoing_requests": max_ongoing, "ray_actor_options": {"num_cpus": num_cpus}}

    @serve.deployment(**options)
    class NoopStage:
        async def __call__(self, payload):
            return payload

    @serve.deployment(name="NoopIngress", **options)
    @serve.ingress(api)
    class NoopIngress:
        def __init__(self, encoder, retriever, ranker):
            self.hops = (encoder, retriever, ranker)

        @api.post("/v1/recommend")
        async def recommend(self, body: RecommendRequest):
            t = [time.perf_counter()]
            payload = body.user_id
            for hop in self.hops:
                payload = await hop.remote(payload)
                t.append(time.perf_counter())
            ms = [round((b - a) * 1000.0, 3) for a, b in zip(t, t[1:], strict=False)]
            return {"items": [], "timings": {"encode_ms": ms[0], "retrieve_ms": ms[1], "rank_ms": ms[2],
                                             "total_ms": round((t[-1] - t[0]) * 1000.0, 3)}}

    stages = [NoopStage.options(name=name).bind() for name in ("NoopEncoder", "NoopRetriever", "NoopRanker")]
    return NoopIngress.bind(*stages)


# --- the in-process baseline -------------------------------------------------------------------
def in_process(index_uri: str, mix: RequestMix, requests: int, seed: int, gap_s: float = 0.0) -> dict:
    """``Flow(LocalStages)`` in this process, one request at a time (1 torch thread, as each replica).

    ``gap_s``: wait this long before each request (spinning, not sleeping), as a lone client through Serve
    leaves each stage idle between its calls. Back to back, each stage's compute runs on warm CPU caches
    and branch predictors; paced, it costs 2-3x more here (2026-12-07: the user tower 0.63 -> 1.8 ms,
    the fused search 0.35 -> 0.9 ms, the ranker 1.15 -> 2.5 ms with 20 ms gaps, spinning or sleeping
    alike), which is what the stages pay at 1 client."""
    import torch

    from tessera.serving import Flow, LocalStages, RequestError, VersionRef
    from tessera.serving.schemas import RecommendRequest, RecommendResponse
    from tessera.storage import Storage

    torch.set_num_threads(1)
    storage = Storage()
    ref = VersionRef.resolve(storage, index_uri)
    candidates = int(ref.bundle_manifest.get("ranker_features", {}).get("candidates", 50))
    flow = Flow(LocalStages(storage, preload_modalities=False), ref.index_uri, ref.model_version,
                ref.index_version, candidates)
    rng = np.random.default_rng(seed)

    async def run() -> tuple[float, list[Sample]]:
        t0 = time.perf_counter()
        await flow.recommend([RecommendRequest(user_id=mix.users[0])])  # loads the version
        load_s = time.perf_counter() - t0
        samples = []
        for i in range(20 + requests):
            body = mix.body(rng)
            end = time.perf_counter() + gap_s
            while time.perf_counter() < end:  # spin: a sleep would add the wake-up's delay to nothing
                pass
            t0 = time.perf_counter()
            [answer] = await flow.recommend([RecommendRequest.model_validate(body)])
            ok = not isinstance(answer, RequestError)
            if ok:
                RecommendResponse.model_validate(answer)
            if i >= 20:  # the first 20 warm up
                samples.append(Sample(time.perf_counter() - t0, 200 if ok else answer.status,
                                      answer["timings"] if ok else None, ok and answer["cold_start"]))
        return load_s, samples

    load_s, samples = asyncio.run(run())
    stats = summarize(samples, sum(s.latency_s for s in samples))
    return {**{k: stats[k] for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "error_rate", "requests",
                                     "cold_start_share", "stage_p50_ms")},
            "qps_one_at_a_time": stats["qps"], "load_s": round(load_s, 1)}


# --- setup -------------------------------------------------------------------------------------
def _apply_env_file() -> tuple[dict[str, str], list[str]]:
    """``.tessera/env.sh``'s settings put in the environment (variables already set win), and the stack's
    settings still unset after that."""
    saved = read_env_file()
    for key, value in saved.items():
        os.environ.setdefault(key, value)
    return saved, [k for k in ("RAY_ADDRESS", "AWS_ENDPOINT_URL") if not os.environ.get(k)]


def load_demo_env() -> dict[str, str]:
    """The demo stack's settings from ``.tessera/env.sh`` (variables already set win); Ray reads them at import."""
    saved, missing = _apply_env_file()
    if missing:
        sys.exit(f"bench/serve.py needs the demo stack (make demo): {', '.join(missing)} unset and not in "
                 f".tessera/env.sh")
    return saved


def demo_missing(source_run: str, model_uri: str) -> list[str]:
    """What the bench needs of the demo and does not find: the store and the Ray head up (``tessera storage
    status``, ``tessera ray status``), then the embedding run's and the bundle's manifests in the store."""
    import subprocess

    cli = Path(sys.executable).with_name("tessera")
    down = [f"{what} down" for what in ("storage", "ray")
            if subprocess.run([str(cli), what, "status"], capture_output=True).returncode != 0]
    if down:
        return down
    if _apply_env_file()[1]:
        return ["no stack settings in .tessera/env.sh"]
    from tessera.storage import Storage, join_uri

    storage = Storage()
    return [f"{uri} (no _MANIFEST.json)" for uri in (source_run, model_uri)
            if not storage.exists(join_uri(uri, "_MANIFEST.json"))]


def _make(target: str, log: Path) -> float:
    """``make <target>`` from the repo root, its output in ``log``; exits the bench if it fails. Seconds taken."""
    import subprocess

    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(["make", target], cwd=Path(__file__).resolve().parents[1], stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        sys.exit(f"make {target} failed (exit {done.returncode}); the end of {log}:\n{tail}")
    return time.perf_counter() - start


def ensure_demo(args) -> str:
    """Bring up what the bench runs on (see the module docstring); says what it found or did. A stack that
    is down is brought up first (``make stack-up``: the store keeps its data between runs), and the demo is
    run only if its run or bundle is missing then."""
    from tessera.embedded.state import state_dir

    missing = demo_missing(args.source_run, args.model_uri)
    if not missing:
        return "demo stack and artifacts found"
    if args.no_demo:
        sys.exit(f"bench/serve.py needs the demo (make demo): {'; '.join(missing)}")
    logs = state_dir() / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    done = []
    if any(m.endswith(" down") for m in missing):
        print(f"[bench] {'; '.join(missing)}: running make stack-up (log in {logs / 'serve-stack-up.log'})",
              flush=True)
        done.append(f"make stack-up run first ({_make('stack-up', logs / 'serve-stack-up.log'):.0f} s)")
        missing = demo_missing(args.source_run, args.model_uri)
        if not missing:
            return f"{done[0]}; demo artifacts found"
    print(f"[bench] {'; '.join(missing)}: running make demo (log in {logs / 'serve-make-demo.log'})", flush=True)
    done.append(f"make demo run first ({_make('demo', logs / 'serve-make-demo.log'):.0f} s)")
    still = demo_missing(args.source_run, args.model_uri)
    if still:  # e.g. --source-run / --model-uri naming what the demo does not make
        sys.exit(f"after make demo, bench/serve.py still lacks: {'; '.join(still)}")
    return "; ".join(done)


def known_users(interactions_uri: str) -> list[str]:
    from tessera.interactions import read_interactions
    from tessera.storage import Storage

    table = read_interactions(Storage(), interactions_uri)
    return sorted(set(table.column("user_id").to_pylist()))


def wait_ready(base: str, timeout_s: float = 300.0) -> dict:
    """Poll the app's ``GET /healthz`` until it answers; returns the answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urlopen(base + "/healthz", timeout=10) as resp:
                return json.loads(resp.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def direct_ingress_bases(apps: tuple[str, ...]) -> dict[str, str]:
    """Each app's ingress replica address when Serve runs with direct ingress (the head started with
    ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` or ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``): the replica serves
    HTTP on a port of its own and no proxy sits in the request path. Read from the Serve controller's
    target groups (what a load balancer in front of direct ingress reads; Ray's own API, alpha)."""
    import ray
    from ray.serve.context import _get_global_client

    groups = ray.get(_get_global_client()._controller.get_target_groups.remote())
    out = {}
    for group in groups:
        if group.app_name in apps and str(group.protocol).upper().endswith("HTTP") and group.targets:
            target = group.targets[0]
            out[group.app_name] = f"http://{target.ip}:{target.port}"
    missing = [a for a in apps if a not in out]
    if missing:
        raise RuntimeError(f"no direct-ingress target for {missing} (target groups: {groups}); start the Ray head "
                           "with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 or RAY_SERVE_ENABLE_DIRECT_INGRESS=1")
    return out


def code_version() -> dict:
    """The commit, and whether the serving code (``serve_apps/``, ``tessera/serving/``) differs from it: the
    replicas import whatever is in the working tree when they start."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[1]
    paths = ["serve_apps", "platform/tessera/serving"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=root, capture_output=True, text=True)
    digest = hashlib.sha1()
    for path in sorted(p for d in paths for p in (root / d).rglob("*") if p.suffix in (".py", ".yaml")):
        digest.update(path.read_bytes())
    return {"commit": commit.stdout.strip() or None, "serving_code_modified": bool(dirty.stdout.strip()),
            "serving_code_sha1": digest.hexdigest()[:12]}


def targets(levels: dict, noop: dict) -> dict:
    def get(d: dict, level: int, key: str):
        return d.get(str(level), {}).get(key)

    qps20, noop20 = get(levels, 20, "qps"), get(noop, 20, "qps")
    out = {
        "qps_20_at_least_2x_noop_chain": None if not (qps20 and noop20) else qps20 >= 2.0 * noop20,
        "p99_20_at_most_100_ms": None if get(levels, 20, "p99_ms") is None else get(levels, 20, "p99_ms") <= 100.0,
        "no_errors_20": None if get(levels, 20, "error_rate") is None else get(levels, 20, "error_rate") == 0.0,
        "no_collapse_50": None if not (qps20 and get(levels, 50, "qps") is not None)
        else get(levels, 50, "qps") >= 0.9 * qps20,
        "p50_1_at_most_1_2x_noop_chain": None if not (get(levels, 1, "p50_ms") and get(noop, 1, "p50_ms"))
        else get(levels, 1, "p50_ms") <= 1.2 * get(noop, 1, "p50_ms"),
    }
    out["all"] = all(v is True for v in out.values())
    return out


def run(args) -> dict:
    setup = ensure_demo(args)
    env = load_demo_env()
    import ray
    from ray import serve

    from bench._scaled import scaled_version
    from serve_apps.recommender import RecommenderArgs, build_app
    from tessera.config import load_config
    from tessera.index_job import IndexJobConfig
    from tessera.storage import Storage, join_uri

    loadavg_start = os.getloadavg()
    ray.init(address="auto", log_to_driver=False)
    storage = Storage()
    storage.ensure_bucket(BENCH_ROOT)
    candidates = int(storage.read_json(join_uri(args.model_uri, "_MANIFEST.json"))
                     .get("ranker_features", {}).get("candidates", 50))
    # Shards tuned for the k the app retrieves (configs/index.yaml says 50); --reorder pins the depth.
    overrides = {}
    house = load_config(IndexJobConfig, Path(__file__).resolve().parents[1] / "configs" / "index.yaml")
    if candidates != house.index.num_neighbors:
        overrides["num_neighbors"] = candidates
    if args.reorder:
        overrides["reorder_num_neighbors"] = args.reorder
    version = scaled_version(storage, args.source_run, args.model_uri, BENCH_ROOT, args.items, args.spread, args.seed,
                             overrides)
    print(f"[bench] version {version.index_uri}: {version.corpus['items']} items ({version.corpus['built_now']}, "
          f"{version.corpus['prepare_s']} s)", flush=True)
    mix = RequestMix(known_users(version.corpus["interactions_uri"]), version.item_ids)

    gate = wait_for_quiet(args.quiet_cores, args.quiet_wait)
    local = {**in_process(version.index_uri, mix, args.in_process_requests, args.seed), "before": gate}
    if args.in_process_gap_ms > 0:  # the same requests, spaced as a lone client's through Serve
        paced = in_process(version.index_uri, mix, args.in_process_requests, args.seed, args.in_process_gap_ms / 1e3)
        local["paced"] = {"gap_ms": args.in_process_gap_ms,
                          **{k: paced[k] for k in ("p50_ms", "p95_ms", "p99_ms", "stage_p50_ms")}}
        print(f"[bench] in-process, one request every {args.in_process_gap_ms:g} ms + its own time: "
              f"{json.dumps(local['paced'])}", flush=True)
    print(f"[bench] in-process: p50 {local['p50_ms']} ms over {local['requests']} requests", flush=True)

    code = code_version()
    app_args = RecommenderArgs.model_validate({**json.loads(args.app_args), "index_uri": version.index_uri})
    base = args.http.rstrip("/")
    t0 = time.perf_counter()
    levels: dict[str, dict] = {}
    noop: dict[str, dict] = {}
    try:  # from the first deploy: a failed start or check still removes both apps
        logging_config = json.loads(args.logging_config) if args.logging_config else None  # both apps alike
        serve.run(noop_chain_app(args.noop_max_ongoing, 0.0), name=NOOP_APP, route_prefix=NOOP_PREFIX,
                  logging_config=logging_config)
        serve.run(build_app(app_args), name=APP, route_prefix=APP_PREFIX, logging_config=logging_config)
        health = wait_ready(base + APP_PREFIX)
        with urlopen(base + APP_PREFIX + "/v1/version", timeout=10) as resp:
            served = json.loads(resp.read())
        if served["num_items"] != version.corpus["items"]:
            raise RuntimeError(f"{APP} serves {served['num_items']} items, not {version.corpus['items']}: {health}")
        print(f"[bench] apps up in {time.perf_counter() - t0:.0f} s", flush=True)
        bases = {APP: base, NOOP_APP: base}
        if args.direct_ingress:
            bases = direct_ingress_bases((APP, NOOP_APP))
            print(f"[bench] direct ingress: {bases}", flush=True)

        cpu = CpuMeter(cluster_actors((APP, NOOP_APP)))
        for step, clients in enumerate(args.levels):
            runs = [("no-op chain", noop, NOOP_APP, NOOP_PREFIX)] if clients in args.noop_levels else []
            ours = [("ours", levels, APP, APP_PREFIX)]
            # which app goes first alternates from level to level: a slow change in the machine's load
            # does not always fall on the same one
            for label, into, app, prefix in ([*runs, *ours] if step % 2 == 0 else [*ours, *runs]):
                attempts = []
                for _ in range(1 + args.retries):  # again when other work took cores meanwhile; keep the calmest
                    gate = wait_for_quiet(args.quiet_cores, args.quiet_wait)
                    attempts.append({**asyncio.run(load_level(bases[app] + prefix + "/v1/recommend", mix, clients,
                                                              args.duration, args.warmup, args.seed + clients,
                                                              cpu)), "before": gate})
                    print(f"[bench] {label}, {clients} clients: {json.dumps(attempts[-1])}", flush=True)
                    if attempts[-1]["cpu_cores"]["other_cores"] <= args.max_other_cores:
                        break
                best = min(attempts, key=lambda a: a["cpu_cores"]["other_cores"])
                into[str(clients)] = {**best, "attempts": len(attempts),
                                      "other_cores_per_attempt": [a["cpu_cores"]["other_cores"] for a in attempts]}
    finally:
        if not args.keep_apps:
            serve.delete(APP)
            serve.delete(NOOP_APP)

    noop20 = noop.get("20", {}).get("qps")
    return {
        "levels": levels,
        "in_process_p50_ms": local["p50_ms"],
        "in_process_paced_p50_ms": local.get("paced", {}).get("p50_ms"),
        "noop_chain_qps": noop20,
        "qps_ratio_vs_noop_chain": round(levels["20"]["qps"] / noop20, 3) if noop20 and "20" in levels else None,
        "noop_chain_p50_ms_1_client": noop.get("1", {}).get("p50_ms"),
        "targets": targets(levels, noop),
        "in_process": local,
        "noop_chain": noop,
        "corpus": version.corpus,
        "setup": {
            "stack": f"demo stack from .tessera/env.sh: S3 {os.environ.get('AWS_ENDPOINT_URL')}, Ray head "
                     f"{os.environ.get('RAY_ADDRESS')} (token auth: {os.environ.get('RAY_AUTH_MODE') == 'token'}); "
                     f"{'env.sh read' if env else 'env.sh missing, environment used'}; {setup}",
            "code": code,
            "proxy": base, "direct_ingress": bases if args.direct_ingress else None,
            "logging_config": json.loads(args.logging_config) if args.logging_config else "Serve's default",
            "app": {"name": APP, "route_prefix": APP_PREFIX,
                                   "args": app_args.model_dump(mode="json", exclude={"storage"}),
                                   "deployments": "build_app defaults: 1 replica each, 0.25 CPU, torch_threads 1"},
            "noop_chain": {"name": NOOP_APP, "route_prefix": NOOP_PREFIX, "max_ongoing_requests": args.noop_max_ongoing,
                           "num_cpus": 0.0, "note": "num_cpus 0 only so it fits next to the demo app and ours "
                                                    "(Ray reserves, never pins, CPUs)"},
            "cores": psutil.cpu_count(), "load_generator": "asyncio + aiohttp closed loop in the bench process, on "
                                                           "the same cores as Ray and the apps (it competes for CPU)",
            "mix": MIX, "k": mix.k, "duration_s": args.duration, "warmup_s": args.warmup,
            "loadavg_at_start": [round(x, 2) for x in loadavg_start],
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000, help="catalog size of the scaled version")
    parser.add_argument("--spread", type=float, default=0.5, help="noise of the synthetic copies (bench/_scaled.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reorder", type=int, default=None,
                        help="pin index.reorder_num_neighbors of the scaled index (default: tuned by the job)")
    parser.add_argument("--source-run", default="s3://tessera-demo/embeddings/demo")
    parser.add_argument("--model-uri", default="s3://tessera-demo/models/v1")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 5, 20, 50], help="concurrent clients")
    parser.add_argument("--noop-levels", type=int, nargs="*", default=[1, 20, 50],
                        help="levels at which the no-op chain is measured too")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds recorded per level")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before each recorded level")
    parser.add_argument("--in-process-requests", type=int, default=300)
    parser.add_argument("--in-process-gap-ms", type=float, default=25.0,
                        help="also run the in-process baseline with this gap before each request (0: not)")
    parser.add_argument("--quiet-cores", type=float, default=0.5,
                        help="before each level, wait until at most this many cores are busy (shared machine)")
    parser.add_argument("--quiet-wait", type=float, default=180.0, help="longest wait for that, in seconds")
    parser.add_argument("--max-other-cores", type=float, default=0.6,
                        help="a level during which other processes (not the apps, not the load generator) used "
                             "more cores is measured again (Ray's own daemons and the store use ~0.3 here)")
    parser.add_argument("--retries", type=int, default=2, help="extra attempts per level at most")
    parser.add_argument("--noop-max-ongoing", type=int, default=1000)
    parser.add_argument("--app-args", default="{}",
                        help='JSON merged into RecommenderArgs, e.g. \'{"batch": {"batch_wait_timeout_ms": 5}}\'')
    parser.add_argument("--http", default="http://127.0.0.1:8000", help="the Serve proxy")
    parser.add_argument("--keep-apps", action="store_true", help="leave both bench apps deployed")
    parser.add_argument("--logging-config", default=None,
                        help="Serve LoggingConfig of both apps' deployments, as JSON (e.g. "
                             "'{\"enable_access_log\": false}'); default: Serve's")
    parser.add_argument("--direct-ingress", action="store_true",
                        help="load each app's ingress replica (Serve's direct ingress), not the proxy")
    parser.add_argument("--no-demo", action="store_true",
                        help="exit when the demo stack or its artifacts are missing instead of running make demo")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `timeout` still deletes the bench apps
    print(json.dumps(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
