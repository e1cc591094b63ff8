"""A real Prometheus server (Debian's `prometheus` package, which scripts/setup installs) scrapes a short
training run on a loopback port, and its HTTP query API returns a non-zero rate() of NVMe read bytes."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import infinity
from infinity import exporter as exporter_module

from test_initialize import config
from test_metrics import free_port
from training_reference import fresh_model, make_batches, train

ROOT = Path(__file__).resolve().parents[2]

PROMETHEUS = shutil.which("prometheus") or next((p for p in ("/usr/bin/prometheus",) if os.path.exists(p)), None)
SCRAPE_INTERVAL = "500ms"
RATE_QUERY = 'sum(rate(infinity_tier_transfer_bytes_total{src_tier="nvme",dst_tier="host",job="infinity-test"}[5s]))'

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus package is not installed "
                                "(scripts/setup installs it: apt-get install --no-install-recommends prometheus)")


@pytest.fixture
def prometheus(tmp_path):
    """Starts Prometheus on a free loopback port scraping `target` (set by the test through the file it
    reads); yields (api url, target port); stops it and removes its storage."""
    target = free_port()
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        f"global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  scrape_timeout: {SCRAPE_INTERVAL}\n"
        f"scrape_configs:\n  - job_name: infinity-test\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target}']\n")
    log = open(tmp_path / "prometheus.log", "w")
    server = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                               "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: get(f"{api}/-/ready") is not None, 30, "Prometheus did not become ready", tmp_path)
        yield api, target
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def get(url: str) -> str | None:
    try:
        return urllib.request.urlopen(url, timeout=5).read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None


def query(api: str, promql: str) -> list[dict]:
    """The result vector; a query Prometheus refuses (HTTP 400/422, status error) fails the test."""
    try:
        body = urllib.request.urlopen(f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": promql}),
                                      timeout=10).read().decode()
    except urllib.error.HTTPError as err:
        body = err.read().decode()
    answer = json.loads(body)
    assert answer["status"] == "success", (promql, answer)
    return answer["data"]["result"]


def wait_until(ok, seconds: float, what: str, tmp_path) -> None:
    deadline = time.monotonic() + seconds
    while not ok():
        if time.monotonic() > deadline:
            log = (tmp_path / "prometheus.log").read_text()[-2000:]
            pytest.fail(f"{what} within {seconds} s; Prometheus log:\n{log}")
        time.sleep(0.2)


def test_prometheus_scrapes_a_training_run_and_rates_nvme_reads(tmp_path, prometheus):
    api, target = prometheus
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    cfg = config(nvme, prometheus={"enabled": True, "port": target})
    engine, *_ = infinity.initialize(model=fresh_model(), config=cfg)
    batches = make_batches()
    rates: list[float] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # train until Prometheus has seen the reads move (a few seconds)
            train(engine, batches[:2])
            result = query(api, RATE_QUERY)
            rates = [float(r["value"][1]) for r in result]
            if rates and rates[0] > 0:
                break
        up = query(api, 'up{job="infinity-test"}')
        families = query(api, 'count by (__name__) ({__name__=~"infinity_.+", job="infinity-test"})')
        # Every query of the dashboard and of docs/metrics.md is valid PromQL that this server evaluates.
        answered = {expr: query(api, expr) for expr in dashboard_queries() + documented_queries()}
    finally:
        engine.close()
        exporter_module.stop_all()
    assert rates and rates[0] > 0, f"rate() of NVMe read bytes stayed {rates}"
    assert [r["value"][1] for r in up] == ["1"]
    names = {r["metric"]["__name__"] for r in families}
    assert {"infinity_io_request_duration_seconds_bucket", "infinity_tier_resident_bytes",
            "infinity_aio_info"} <= names
    bandwidth = [e for e in answered
                 if "rate(infinity_tier_transfer_bytes_total" in e and "by (src_tier, dst_tier)" in e]
    assert bandwidth and all(answered[e] for e in bandwidth)  # the dashboard's bandwidth panel has data


def dashboard_queries() -> list[str]:
    dashboard = json.loads((ROOT / "configs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return [e.replace("$job", ".*").replace("$rank", ".*") for e in exprs]


def documented_queries() -> list[str]:
    """The PromQL column of docs/metrics.md's table (the last backticked span of each metric's row)."""
    rows = [line for line in (ROOT / "docs" / "metrics.md").read_text().splitlines() if line.startswith("| `infinity_")]
    return [re.findall(r"`([^`]+)`", row)[-1].replace("\\|", "|") for row in rows]
