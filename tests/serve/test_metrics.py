"""The endpoint's metrics (latency per stage, requests by status, cold starts) reach Ray's Prometheus endpoint."""

import http.client
import re
import time
import urllib.parse
import urllib.request
import uuid

import requests


def test_stage_latency_status_and_cold_start_metrics_are_exported(app_url, ray_session):
    for body in ({"user_id": "user-00000001", "k": 3}, {"k": 3}, {"k": 0}):
        requests.post(f"{app_url}/v1/recommend", json=body, timeout=60)
    # an oversized body to a made-up path is counted under "other": a path is no label (a client could
    # otherwise create series without end)
    made_up = f"zz-{uuid.uuid4().hex[:8]}"
    host, port = urllib.parse.urlsplit(app_url).hostname, urllib.parse.urlsplit(app_url).port
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("POST", f"/{made_up}")
    conn.putheader("Content-Length", str(10**9))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    # FastAPI's own answers are counted and say their kind: a body that is not UTF-8 (400), a path the app
    # lacks (404), a method a route lacks (405); health and version answers too
    bad = requests.post(f"{app_url}/v1/recommend", data=b'{"user_id": "\xff"}',
                        headers={"content-type": "application/json"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["kind"] == "bad_request", bad.text
    missing = requests.get(f"{app_url}/{made_up}", timeout=60)
    assert missing.status_code == 404 and missing.json()["kind"] == "not_found", missing.text
    wrong = requests.get(f"{app_url}/v1/recommend", timeout=60)
    assert wrong.status_code == 405 and wrong.json()["kind"] == "method_not_allowed", wrong.text
    assert "POST" in wrong.headers["allow"]
    assert requests.get(f"{app_url}/healthz", timeout=60).status_code == 200
    assert requests.get(f"{app_url}/v1/version", timeout=60).status_code == 200
    port = ray_session.nodes()[0]["MetricsExportPort"]
    wanted = {
        "latency": re.compile(r'^ray_tessera_serve_stage_latency_ms_bucket\{[^}]*route="recommend"[^}]*stage="rank"',
                              re.M),
        "ok": re.compile(r'^ray_tessera_serve_requests_total\{[^}]*route="recommend"[^}]*status="200"[^}]*\} (\S+)',
                         re.M),
        "bad": re.compile(r'^ray_tessera_serve_requests_total\{[^}]*route="recommend"[^}]*status="422"[^}]*\} (\S+)',
                          re.M),
        "cold": re.compile(r'^ray_tessera_serve_cold_start_total\{[^}]*route="recommend"[^}]*\} (\S+)', re.M),
        "other": re.compile(r'^ray_tessera_serve_requests_total\{[^}]*route="other"[^}]*status="413"[^}]*\} (\S+)',
                            re.M),
        **{name: re.compile(rf'^ray_tessera_serve_requests_total\{{[^}}]*route="{route}"[^}}]*status="{status}"', re.M)
           for name, route, status in (("not_utf8", "recommend", 400), ("not_found", "other", 404),
                                       ("not_allowed", "recommend", 405), ("health", "healthz", 200),
                                       ("version", "version", 200))},
    }
    deadline, found = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        found = {name: p.findall(text) for name, p in wanted.items()}
        if all(found.values()):
            break
        time.sleep(3)
    assert all(found.values()), {k: bool(v) for k, v in found.items()}
    assert sum(float(v) for v in found["ok"]) >= 2 and sum(float(v) for v in found["cold"]) >= 1
    assert made_up not in text
