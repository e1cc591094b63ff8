"""infinity/metrics.py and infinity/exporter.py without the native engine: names follow Prometheus' rules,
buckets cover the sizes and latencies asked for, step reports add up, the exporter's life and errors; and
docs/metrics.md and the Grafana dashboard name only metrics that exist."""
from __future__ import annotations

import errno
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from infinity import exporter, metrics
from infinity.errors import ConfigError
from infinity.exporter import ExporterError, InfinityCollector, MetricsPortInUse, start_exporter
from infinity.zero.step_report import StepReport

ROOT = Path(__file__).resolve().parents[2]
LABEL = re.compile(r"^[a-z][a-z0-9_]*$")
UNIT_SUFFIXES = ("_bytes", "_seconds", "_ratio", "_in_flight", "_buffers")


@pytest.fixture(autouse=True)
def no_exporter_left():
    yield
    exporter.stop_all()
    assert not metrics.ACTIVE


def samples(const: dict[str, str] | None = None) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(InfinityCollector(const or {}))
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def report(**overrides) -> StepReport:
    fields = dict(step=1, step_s=2.0, other_s=1.0, read_wait_s=0.25, write_wait_s=0.25, optimizer_s=0.5,
                  optimizer_io_wait_s=0.125, bytes_read=1 << 20, bytes_written=1 << 19, prefetch_hits=7,
                  prefetch_late=2, prefetch_misses=1, peak_live_elements=100, trace_invalidations=1)
    return StepReport(**{**fields, **overrides})


@pytest.mark.parametrize("m", list(metrics.METRICS.values()), ids=list(metrics.METRICS))
def test_names_follow_prometheus_conventions(m):
    assert m.name.startswith("infinity_") and re.fullmatch(r"[a-z_]+", m.name)
    assert m.type in ("counter", "gauge", "histogram", "info")
    if m.type == "counter":
        assert m.name.endswith("_total")
    else:
        assert not m.name.endswith("_total")
    if m.type == "histogram":
        assert m.name.endswith(("_seconds", "_bytes"))
    if m.type == "info":
        assert m.name.endswith("_info")
    if m.type == "gauge":
        assert m.name.endswith(UNIT_SUFFIXES), "a gauge names its unit"
    for label in m.labels:
        assert LABEL.match(label) and label not in ("rank", "le", "job", "instance")
    assert len(m.labels) <= 6 and m.help


def test_labels_take_few_values():
    """Never a label per parameter: each label's values come from a short fixed list (or an errno name)."""
    vocab = {"src_tier": metrics.TIERS, "dst_tier": metrics.TIERS, "tier": metrics.TIERS, "kind": metrics.KINDS,
             "result": metrics.RESULTS, "op": metrics.OPS, "phase": metrics.STEP_PHASES + metrics.STALL_PHASES,
             "outcome": metrics.PREFETCH_OUTCOMES, "state": ("free", "used"), "pinned": ("true", "false"),
             "value": metrics.NONFINITE_VALUES}
    for name, labels in metrics.DECLARED:
        for label, v in zip(metrics.METRICS[name].labels, labels):
            assert v in vocab[label]
    assert len(set(metrics.KIND_OF_REGION.values())) == len(metrics.KINDS)


def test_buckets_cover_4k_to_1g_requests_and_100us_to_10s():
    lat, size = metrics.LATENCY_BUCKETS, metrics.SIZE_BUCKETS
    assert list(lat) == sorted(lat) and lat[0] <= 100e-6 and lat[-1] == 10.0
    assert list(size) == sorted(size) and size[0] == 4096 and size[-1] == 1 << 30
    h = metrics.Buckets((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 2.0, 3.0):
        h.observe(v)
    assert h.counts == [2, 2, 1] and h.sum == 8.0 and h.count == 5  # le: a value on a bound counts in it


def test_step_report_adds_up_and_only_while_active():
    before = samples()
    metrics.record_step(report())  # nothing exports: not counted
    assert samples() == before
    metrics.enable()
    try:
        metrics.record_step(report())
        metrics.record_step(report(step=2, step_s=4.0, other_s=3.0, prefetch_misses=0, trace_invalidations=0,
                                   gathered_ahead=5, params=1 << 16))
    finally:
        metrics.disable()
    after = samples()

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0)

    assert grew("infinity_steps_total") == 2
    assert grew("infinity_step_duration_seconds_count") == 2 and grew("infinity_step_duration_seconds_sum") == 6.0
    assert grew("infinity_step_duration_seconds_bucket", le="2.5") == 1
    phases = sum(grew("infinity_step_phase_seconds_total", phase=p) for p in metrics.STEP_PHASES)
    assert phases == 6.0  # the phases add up to the steps
    assert grew("infinity_stall_seconds_total", phase="read") == 0.5
    assert grew("infinity_stall_seconds_total", phase="optimizer_io") == 0.25
    assert grew("infinity_prefetch_total", outcome="hit") == 14 and grew("infinity_prefetch_total", outcome="miss") == 1
    assert grew("infinity_trace_invalidations_total") == 1
    assert grew("infinity_gathered_ahead_total") == 5
    assert after[("infinity_step_stall_ratio", ())] == report(step_s=4.0).stall_ratio  # the last step's
    # the last step's bytes over its parameters: 1 MiB read, 512 KiB written over 64 Ki parameters
    assert after[("infinity_step_io_per_param_bytes", (("op", "read"),))] == 16.0
    assert after[("infinity_step_io_per_param_bytes", (("op", "write"),))] == 8.0


def test_submit_failures_and_short_transfers_count_as_errors():
    before = samples()
    metrics.enable()
    try:
        metrics.io_submitted("read")
        metrics.io_completed("read", "exp_avg", 8192, 4096, 4096, 0.001, errno.EIO, short=True)
        metrics.io_submit_failed("write", errno.EBADF)
    finally:
        metrics.disable()
    after = samples()

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0)

    assert grew("infinity_io_errors_total", op="read", errno="EIO") == 1
    assert grew("infinity_io_errors_total", op="write", errno="EBADF") == 1
    assert grew("infinity_io_short_transfers_total", op="read") == 1
    assert grew("infinity_io_requests_total", op="read", result="error") == 1
    assert grew("infinity_tier_transfer_bytes_total", src_tier="nvme", dst_tier="host", kind="optimizer_state",
                result="error") == 4096
    assert after[("infinity_io_requests_in_flight", (("op", "read"),))] == before[
        ("infinity_io_requests_in_flight", (("op", "read"),))]


def test_constant_labels_on_every_sample():
    got = samples({"rank": "3", "job_name": "x"})
    assert got and all(dict(labels).get("rank") == "3" and dict(labels).get("job_name") == "x"
                       for (_, labels) in got)


def test_starts_on_one_port_share_a_server_and_the_last_stop_closes_it():
    first = start_exporter(0, rank=0)
    second = start_exporter(first.port, rank=0)
    assert metrics.ACTIVE
    first.stop()
    first.stop()  # twice is once
    assert urllib.request.urlopen(second.url, timeout=5).status == 200
    second.stop()
    assert not metrics.ACTIVE
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(second.url, timeout=2)


def test_same_port_other_labels_and_reserved_labels_are_refused():
    with start_exporter(0, rank=0) as running:
        with pytest.raises(MetricsPortInUse, match="already serves metrics there"):
            start_exporter(running.port, rank=1)
    with pytest.raises(ConfigError) as err:
        start_exporter(0, labels={"kind": "x", "rank": "2"})
    assert err.value.keys == ("prometheus.labels.kind", "prometheus.labels.rank")


def test_an_address_not_of_this_machine_names_the_fix():
    with pytest.raises(ExporterError, match="bind_address is not an address of this machine") as err:
        start_exporter(0, address="192.0.2.1")  # TEST-NET-1: never local
    assert err.value.errno == errno.EADDRNOTAVAIL


def test_config_block_disabled_starts_nothing():
    from infinity.config import Config

    assert exporter.from_config(Config.load({}).prometheus) is None and not metrics.ACTIVE


def test_docs_list_every_metric_with_a_promql_example():
    text = (ROOT / "docs" / "metrics.md").read_text()
    examples = "\n".join(re.findall(r"^```promql\n(.*?)^```", text, re.S | re.M))  # run against Prometheus
    for name in metrics.METRICS:                                                 # by test_prometheus_server
        row = next((line for line in text.splitlines() if line.startswith(f"| `{name}`")), None)
        assert row is not None, f"docs/metrics.md has no row for {name}"
        assert re.search(rf"\b{name}(_bucket|_sum|_count)?\b", examples), f"{name}: no ```promql example"
    known = set(metrics.METRICS) | {f"{n}_{s}" for n, m in metrics.METRICS.items() if m.type == "histogram"
                                     for s in ("bucket", "sum", "count")}
    assert set(re.findall(r"\binfinity_[a-z_]+", examples)) <= known
    assert "LOCAL_RANK" in text


def test_dashboard_uses_only_metrics_that_exist():
    dashboard = json.loads((ROOT / "dashboards" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    known = set(metrics.METRICS) | {f"{n}_{s}" for n, m in metrics.METRICS.items() if m.type == "histogram"
                                     for s in ("bucket", "sum", "count")}
    for expr in exprs:
        for name in re.findall(r"\binfinity_[a-z_]+", expr):
            assert name in known, f"{name} in {expr!r}"
    # Declared Grafana version and schemaVersion agree: 36 is Grafana 9's dashboard schema (the default of its
    # dashboard kind in grafana/grafana docs/sources/developers/kinds/core/dashboard/schema-reference.md);
    # 38 (the table cellOptions migration) belongs to Grafana 10, which 9.x cannot read as written.
    grafana = next(r["version"] for r in dashboard["__requires"] if r["id"] == "grafana")
    assert (grafana, dashboard["schemaVersion"]) == ("9.0.0", 36)
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("bandwidth", "latency", "stall", "resident", "prefetch", "error"):
        assert topic in titles
