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
