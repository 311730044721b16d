"""``tessera`` command line: bring the embedded stack up and down.

    tessera storage up|down|status     SeaweedFS S3 on 127.0.0.1:8333
    tessera ray up|down|status         Ray head on 127.0.0.1 (dashboard :8265), token auth on;
                                       ``down`` also stops the head's Prometheus; ``up --serve-throughput``
                                       starts it with Ray Serve's throughput-optimized mode (below)
    tessera prometheus up|down|status  Prometheus on 127.0.0.1:9090 scraping the head's metrics,
                                       when ``prometheus`` is installed (skipped otherwise)
    tessera env                        print the shell exports (same as .tessera/env.sh)

State lives in ``.tessera/`` (or ``$TESSERA_HOME``); ``source .tessera/env.sh`` sets up a shell for
``ray job submit`` and the AWS tools.
"""

from __future__ import annotations

import argparse
import sys

from tessera.embedded.prometheus import DEFAULT_PORT, EmbeddedPrometheus
from tessera.embedded.ray_head import EmbeddedRay, port_free
from tessera.embedded.seaweedfs import EmbeddedS3
from tessera.embedded.state import env_file, read_env_file, state_dir, update_env_file

AWS_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")

# Ray Serve's throughput-optimized mode (Ray >= 2.56): direct ingress (each Ingress replica serves HTTP
# on a port of its own from 30000, on http_options.host; the proxy on :8000 still answers), gRPC between
# deployments, user code and router on the replica's main loop. Read by the Serve controller and the
# replicas at start, so it goes into the head's environment.
SERVE_THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def _storage(action: str) -> int:
    s3 = EmbeddedS3(state_dir())
    if action == "up":
        try:
            conn = s3.start()
        except (RuntimeError, TimeoutError) as err:  # no weed binary, it exited, or it never answered
            print(f"error: {err}", file=sys.stderr)
            return 1
        path = update_env_file(conn.env())
        print(f"SeaweedFS S3 up at {conn.endpoint_url} (data in {s3.data_dir}); credentials in {path}")
    elif action == "down":
        print("SeaweedFS stopped" if s3.stop() else "SeaweedFS was not running")
    else:
        pid = s3.pid()
        print(f"SeaweedFS running, pid {pid}, {s3.endpoint_url}" if pid else "SeaweedFS not running")
        return 0 if pid else 1
    return 0


def _ray(action: str, num_cpus: int | None, num_gpus: int | None, port_offset: int = 0,
         serve_throughput: bool = False) -> int:
    head = EmbeddedRay(state_dir(), port_offset=port_offset, num_cpus=num_cpus, num_gpus=num_gpus)
    if action == "up":
        saved = read_env_file()
        if serve_throughput and head.running():
            print("the Ray head is already running: `tessera ray down` first, its Serve mode is set at start",
                  file=sys.stderr)
            return 1
        if not head.running() and not all(k in saved for k in AWS_KEYS):
            # the head hands the store's credentials to every job: without them jobs' S3 clients would go
            # to AWS (with whatever credentials the machine has)
            print(f"no object-store credentials in {env_file()}: start the store first "
                  "(`tessera storage up`, or `make ray-up`, which does)", file=sys.stderr)
            return 1
        try:
            head.start(extra_env={**{k: saved[k] for k in AWS_KEYS if k in saved},
                                  **(SERVE_THROUGHPUT_ENV if serve_throughput else {})})
        except (RuntimeError, TimeoutError) as err:  # a port held, `ray start` failed, or it never answered
            print(f"error: {err}", file=sys.stderr)
            return 1
        path = update_env_file(head.client_env())
        print(f"Ray head up; dashboard {head.dashboard_url} (token auth on). "
              f"For `ray job submit`: source {path}")
    elif action == "down":
        if EmbeddedPrometheus.for_head(state_dir(), head).stop():  # it scrapes this head: it goes with it
            print("Prometheus stopped")
        print("Ray head stopped" if head.stop() else "Ray head was not running")
    else:
        up = head.running()
        print(f"Ray head answering at {head.dashboard_url}" if up else "Ray head not running")
        return 0 if up else 1
    return 0


def _prometheus(action: str, port: int) -> int:
    prom = EmbeddedPrometheus.for_head(state_dir(), EmbeddedRay(state_dir()), port=port)
    if action == "up":
        if prom.binary() is None:
            print("Prometheus: skipped, `prometheus` is not installed (Debian: apt-get install prometheus)")
            return 0
        if prom.pid() is None and not port_free(port):  # optional: another server there must not stop the demo
            print(f"Prometheus: skipped, port {port} is in use by another process (`tessera prometheus up "
                  "--port N` for another)")
            return 0
        url = prom.start()
        print(f"Prometheus up at {url}, scraping the Ray head's nodes listed in {prom.discovery_file} "
              f"(data in {prom.data_dir})")
    elif action == "down":
        print("Prometheus stopped" if prom.stop() else "Prometheus was not running")
    else:
        pid = prom.pid()
        up = pid is not None and prom.ready()
        if up:
            print(f"Prometheus: {prom.url} (pid {pid}; Grafana set-up: README, Monitoring)")
        else:
            print("Prometheus not running" if prom.binary() else "Prometheus not installed")
        return 0 if up else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_storage = sub.add_parser("storage", help="embedded SeaweedFS S3 store")
    p_storage.add_argument("action", choices=["up", "down", "status"])
    p_ray = sub.add_parser("ray", help="embedded Ray head with token auth")
    p_ray.add_argument("action", choices=["up", "down", "status"])
    p_ray.add_argument("--num-cpus", type=int, default=None)
    p_ray.add_argument("--num-gpus", type=int, default=None, help="logical GPUs to advertise")
    p_ray.add_argument("--port-offset", type=int, default=0,
                       help="shift Ray's ports (a second head beside the demo's, as the tests start)")
    p_ray.add_argument("--serve-throughput", action="store_true",
                       help="Ray Serve's throughput-optimized mode: direct ingress on replica ports, gRPC between "
                            "deployments (README, Serving)")
    p_prom = sub.add_parser("prometheus", help="Prometheus scraping the Ray head (when installed)")
    p_prom.add_argument("action", choices=["up", "down", "status"])
    p_prom.add_argument("--port", type=int, default=DEFAULT_PORT)
    sub.add_parser("env", help="print shell exports for the embedded stack")
    args = parser.parse_args(argv)
    if args.command == "storage":
        return _storage(args.action)
    if args.command == "ray":
        return _ray(args.action, args.num_cpus, args.num_gpus, args.port_offset, args.serve_throughput)
    if args.command == "prometheus":
        return _prometheus(args.action, args.port)
    path = env_file()
    if not path.exists():
        print(f"{path} does not exist yet: run `tessera storage up` first", file=sys.stderr)
        return 1
    sys.stdout.write(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
