"""Ask the deployed recommender a few questions and print the answers (the last step of ``make demo``).

    python -m serve_apps.demo_client [--url http://127.0.0.1:8000] [--wait 300]

Waits (printing progress) until ``/healthz`` answers, then prints ``/v1/version``, a recommendation
for a user of the interaction log, the cold-start answer, and a text search. Exit 1 when the app
does not come up in time or a request fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request


def call(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw or b"{}")
        except ValueError:  # the proxy's own plain-text answers while replicas start ("No replicas ...")
            return err.code, {"detail": raw.decode(errors="replace")}


def wait_healthy(url: str, seconds: float) -> bool:
    deadline, last = time.monotonic() + seconds, 0.0
    while time.monotonic() < deadline:
        try:
            if call(f"{url}/healthz", timeout=5)[0] == 200:
                return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() - last > 15:
            print(f"  waiting for {url}/healthz (replicas loading the model and index) ...", flush=True)
            last = time.monotonic()
        time.sleep(1)
    return False


def show(title: str, status: int, body: dict) -> bool:
    print(f"-- {title}: HTTP {status}")
    if status != 200:
        print(f"   {body}")
        return False
    items = body.get("items", [])
    flags = {k: body[k] for k in ("cold_start", "cold_start_reason", "ranked", "modality", "index") if k in body}
    print(f"   {flags}  timings_ms {body.get('timings')}")
    for x in items:
        print(f"   {x['item_id']}  score {x['score']:.4f}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--wait", type=float, default=300)
    parser.add_argument("--user", default="user-00000004")
    args = parser.parse_args(argv)
    if not wait_healthy(args.url, args.wait):
        print(f"error: {args.url} did not become healthy in {args.wait:.0f} s (see `serve status`)", file=sys.stderr)
        return 1
    status, version = call(f"{args.url}/v1/version")
    print(f"-- serving index {version.get('index_version')} of model {version.get('model_version')} "
          f"({version.get('num_items')} items, {version.get('num_shards')} shards)")
    ok = show(f"POST /v1/recommend user {args.user}", *call(f"{args.url}/v1/recommend", {"user_id": args.user, "k": 5}))
    ok &= show("POST /v1/recommend (no history: cold start)", *call(f"{args.url}/v1/recommend", {"k": 3}))
    ok &= show("POST /v1/search text 'handmade ceramic mug'",
               *call(f"{args.url}/v1/search", {"text": "handmade ceramic mug", "k": 5}))
    print(f"OpenAPI docs: {args.url}/docs")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
