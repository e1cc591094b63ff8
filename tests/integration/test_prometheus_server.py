"""A real Prometheus server (Debian's `prometheus` package, which scripts/setup installs) scrapes a short
training run on a loopback port: its HTTP query API returns a non-zero rate() of NVMe read bytes, and a
result for every PromQL example of docs/metrics.md and every panel query of the Grafana dashboard."""
from __future__ import annotations

import json
import math
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
from infinity import metrics
from infinity.config.aio import AioConfig
from infinity.errors import ShortTransferError
from infinity.io import open_handle
from infinity.memory import HostBuffer

from test_initialize import config
from test_metrics import free_port
from training_reference import fresh_model, make_batches, train

ROOT = Path(__file__).resolve().parents[2]

PROMETHEUS = shutil.which("prometheus") or next((p for p in ("/usr/bin/prometheus",) if os.path.exists(p)), None)
SCRAPE_INTERVAL = "500ms"
RATE_QUERY = 'sum(rate(infinity_tier_transfer_bytes_total{src_tier="nvme",dst_tier="host",job="infinity-test"}[5s]))'
STEPS_QUERY = 'sum(rate(infinity_steps_total{job="infinity-test"}[5s]))'
DASHBOARD = ROOT / "dashboards" / "grafana-dashboard.json"
# Grafana's $__rate_interval is max($__interval + scrape interval, 4 × scrape interval): one minute for the
# dashboard's default 30-minute range at a 15 s scrape.  Here that window holds the whole run.
RATE_INTERVAL = "1m"
# Dashboard queries over series that appear with the first error (docs/metrics.md, "Dashboard").
EMPTY_UNTIL_AN_ERROR = ("infinity_io_errors_total",)

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


def test_prometheus_scrapes_a_training_run_and_every_documented_query_has_data(tmp_path, prometheus):
    api, target = prometheus
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    cfg = config(nvme, prometheus={"enabled": True, "port": target})
    engine, *_ = infinity.initialize(model=fresh_model(), config=cfg)
    # Counters never reset within a process: an earlier test's failed request may have made the series already.
    had_errors = any(name in EMPTY_UNTIL_AN_ERROR for name, _ in metrics.TALLY.snapshot().counters)
    batches = make_batches()
    rates: list[float] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # train until Prometheus has seen reads and steps move (seconds)
            train(engine, batches[:2])
            rates = [float(r["value"][1]) for r in query(api, RATE_QUERY)]
            steps = query(api, STEPS_QUERY)  # a step counted between two scrapes: the per-step rates exist
            if rates and rates[0] > 0 and steps and float(steps[0]["value"][1]) > 0:
                break
        up = query(api, 'up{job="infinity-test"}')
        families = query(api, 'count by (__name__) ({__name__=~"infinity_.+", job="infinity-test"})')
        before_error = {expr: query(api, expr) for expr in dashboard_queries()}
        fail_one_read(tmp_path)  # a real failed request in this process: the error series appear
        wait_until(lambda: query(api, 'infinity_io_errors_total{job="infinity-test"}'), 30,
                   "the failed read reached Prometheus", tmp_path)
        after_error = {expr: query(api, expr) for expr in dashboard_queries() + documented_queries()}
    finally:
        engine.close()
        exporter_module.stop_all()
    assert rates and rates[0] > 0, f"rate() of NVMe read bytes stayed {rates}"
    assert [r["value"][1] for r in up] == ["1"]
    names = {r["metric"]["__name__"] for r in families}
    assert {"infinity_io_request_duration_seconds_bucket", "infinity_tier_resident_bytes",
            "infinity_aio_info"} <= names
    empty_before = [e for e, result in before_error.items() if not has_data(result)]
    until_an_error = [e for e in before_error if any(name in e for name in EMPTY_UNTIL_AN_ERROR)]
    assert until_an_error, "the documented empty-until-an-error query is no longer in the dashboard"
    assert empty_before == ([] if had_errors else until_an_error), (
        f"dashboard queries without data that docs/metrics.md does not list as empty until an error: "
        f"{[e for e in empty_before if e not in until_an_error]}")
    assert [e for e, result in after_error.items() if not has_data(result)] == []


def fail_one_read(tmp_path: Path) -> None:
    """Reads 16 KiB from a 10000-byte file: a short read, counted as EIO and as a short transfer."""
    path = tmp_path / "short.bin"
    path.write_bytes(os.urandom(10000))
    with open_handle(AioConfig()) as handle, pytest.raises(ShortTransferError):
        handle.pread(HostBuffer(16384).tensor, path)


def has_data(result: list[dict]) -> bool:
    """A non-empty vector with at least one number (a ratio of two zero rates is NaN: no data to draw)."""
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def dashboard_queries() -> list[str]:
    """Every panel query, with the template variables as Grafana sends them with All selected."""
    dashboard = json.loads(DASHBOARD.read_text())
    values = {f"${v['name']}": v["allValue"] for v in dashboard["templating"]["list"]}
    values["$__rate_interval"] = RATE_INTERVAL
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for name in sorted(values, key=len, reverse=True):  # $__rate_interval before any shorter name
        exprs = [e.replace(name, values[name]) for e in exprs]
    assert not [e for e in exprs if "$" in e], "a template variable the test does not substitute"
    return exprs


def documented_queries() -> list[str]:
    """Every ```promql block of docs/metrics.md (one query each)."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    blocks = [b.strip() for b in re.findall(r"^```promql\n(.*?)^```", text, re.S | re.M)]
    assert len(blocks) >= 20, "docs/metrics.md lost its ```promql blocks"
    return blocks
