"""The encoder pools' custom metrics reach Ray's Prometheus endpoint."""

import re
import time
import urllib.request


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_encode_metrics_exported(sample_embeddings, ray_session):
    port = ray_session.nodes()[0]["MetricsExportPort"]
    ok = sample_embeddings["counts"]["text"]["ok"]
    pattern = re.compile(r'^ray_tessera_embed_items_total\{[^}]*modality="text"[^}]*status="ok"[^}]*\} (\S+)', re.M)
    deadline, seen = time.monotonic() + 45, []
    while time.monotonic() < deadline:
        text = _scrape(port)
        seen = [float(v) for v in pattern.findall(text)]
        if sum(seen) >= ok and "ray_tessera_embed_failures_total" in text and "ray_tessera_embed_batch_seconds" in text:
            break
        time.sleep(3)
    # later runs in the session (resume, GPU) add to the counter, so at least this run's count
    assert sum(seen) >= ok, seen
