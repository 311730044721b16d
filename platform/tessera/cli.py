"""``tessera`` command line: bring the embedded stack up and down.

    tessera storage up|down|status     SeaweedFS S3 on 127.0.0.1:8333
    tessera ray up|down|status         Ray head on 127.0.0.1 (dashboard :8265), token auth on
    tessera env                        print the shell exports (same as .tessera/env.sh)

State lives in ``.tessera/`` (or ``$TESSERA_HOME``); ``source .tessera/env.sh`` sets up a shell for
``ray job submit`` and the AWS tools.
"""

from __future__ import annotations

import argparse
import sys

from tessera.embedded.ray_head import EmbeddedRay
from tessera.embedded.seaweedfs import EmbeddedS3
from tessera.embedded.state import env_file, read_env_file, state_dir, update_env_file

AWS_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")


def _storage(action: str) -> int:
    s3 = EmbeddedS3(state_dir())
    if action == "up":
        conn = s3.start()
        path = update_env_file(conn.env())
        print(f"SeaweedFS S3 up at {conn.endpoint_url} (data in {s3.data_dir}); credentials in {path}")
    elif action == "down":
        print("SeaweedFS stopped" if s3.stop() else "SeaweedFS was not running")
    else:
        pid = s3.pid()
        print(f"SeaweedFS running, pid {pid}, {s3.endpoint_url}" if pid else "SeaweedFS not running")
        return 0 if pid else 1
    return 0


def _ray(action: str, num_cpus: int | None, num_gpus: int | None) -> int:
    head = EmbeddedRay(state_dir(), num_cpus=num_cpus, num_gpus=num_gpus)
    if action == "up":
        saved = read_env_file()
        head.start(extra_env={k: saved[k] for k in AWS_KEYS if k in saved})
        path = update_env_file(head.client_env())
        print(f"Ray head up; dashboard {head.dashboard_url} (token auth on). "
              f"For `ray job submit`: source {path}")
    elif action == "down":
        print("Ray head stopped" if head.stop() else "Ray head was not running")
    else:
        up = head.running()
        print(f"Ray head answering at {head.dashboard_url}" if up else "Ray head not running")
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
    sub.add_parser("env", help="print shell exports for the embedded stack")
    args = parser.parse_args(argv)
    if args.command == "storage":
        return _storage(args.action)
    if args.command == "ray":
        return _ray(args.action, args.num_cpus, args.num_gpus)
    path = env_file()
    if not path.exists():
        print(f"{path} does not exist yet: run `tessera storage up` first", file=sys.stderr)
        return 1
    sys.stdout.write(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
