"""Metrics during real training runs: /metrics scraped over HTTP parses with prometheus_client's own parser,
the byte counters equal what the memory manager asked the I/O layer to move (to the byte, per kind), the
histograms count every request, a failing write counts its errno, and the exporter's life follows the engine."""
from __future__ import annotations

import errno
import gc
import socket
import urllib.error
import urllib.request
from collections import defaultdict

import pytest
from prometheus_client.parser import text_string_to_metric_families

import infinity
from infinity import exporter as exporter_module
from infinity import metrics
from infinity.config.aio import Backend
from infinity.errors import AioError
from infinity.exporter import MetricsPortInUse, start_exporter
from infinity.zero import Engine

from test_faults import fill, punch_hole, settings, small_fs  # noqa: F401 (small_fs is a fixture)
from test_initialize import config
from training_reference import SPEC, fresh_model, make_batches, train


@pytest.fixture(autouse=True)
def no_exporter_left():
    gc.collect()  # gauges sum every live ledger, pool and handle: engines earlier tests left to the collector go
    yield
    exporter_module.stop_all()
    assert not metrics.ACTIVE


@pytest.fixture(scope="module")
def batches():
    return make_batches()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FIELD = {"read": "bytes_read", "write": "bytes_written"}  # IoStats fields
Samples = dict[tuple[str, frozenset], float]


def scrape(url: str) -> tuple[Samples, dict[str, str]]:
    """{(sample name, labels without the constant ones): value}, and the constant labels seen."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples: Samples = {}
    constant: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.startswith("infinity_"):
                continue
            constant.update({k: v for k, v in s.labels.items() if k in ("rank", "job_name")})
            key = frozenset((k, v) for k, v in s.labels.items() if k not in ("rank", "job_name"))
            samples[(s.name, key)] = s.value
    return samples, constant


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of name's samples whose labels include labels."""
    want = set(labels.items())
    return sum(v for (n, key), v in samples.items() if n == name and want <= key)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


class Moved:
    """What the engine's memory managers asked for, counted by wrapping their handles and to_compute."""

    def __init__(self, engine: Engine):
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)  # (route, region) -> bytes
        self.requests: dict[str, int] = defaultdict(int)
        for m in engine.run.managers:
            for op in ("read", "write"):
                setattr(m.handle, f"submit_{op}", self._submit(getattr(m.handle, f"submit_{op}"), op))
            m.to_compute = self._to_compute(m)

    def _submit(self, submit, op):
        def counted(buffer, file, offset=0):
            self.bytes[(op, file.label)] += buffer.numel() * buffer.element_size()
            self.requests[op] += 1
            return submit(buffer, file, offset)
        return counted

    def _to_compute(self, manager):
        real = manager.to_compute

        def counted(key):
            host = manager.host_view(key)
            self.bytes[("to_compute", "param")] += host.numel() * host.element_size()
            return real(key)
        return counted


def train_reporting(engine, batches) -> list:
    """Steps engine over batches (training_reference.train); each step's StepReport."""
    reports = []
    for batch in batches:
        train(engine, [batch])
        reports.append(engine.step_report())
    return reports


def test_scrape_during_training_equals_what_the_manager_moved(tmp_path, batches):
    port = free_port()
    cfg = config(tmp_path, prometheus={"enabled": True, "port": port, "labels": {"job_name": "metrics-test"}})
    before, others = metrics.TALLY.snapshot(), metrics.live_gauges()  # others: objects earlier tests left alive
    model = fresh_model()
    engine, *_ = infinity.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        assert metrics.ACTIVE
        start, constant = scrape(url)  # after initialize wrote the first values, before training
        assert constant == {"rank": "0", "job_name": "metrics-test"}
        io_start, moved = engine.io_stats(), Moved(engine)
        reports = train_reporting(engine, batches[:2])
        middle, _ = scrape(url)  # a scrape during the run
        reports += train_reporting(engine, batches[2:4])
        engine.run.coordinator.settle()  # the next step's reads, started ahead, are counted once they complete
        engine.run.optimizer.settle()  # and the last step's state writes, left in flight
        end, _ = scrape(url)
        io_end, report = engine.io_stats(), engine.memory_report()
    finally:
        engine.close()
    assert not metrics.ACTIVE
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)

    # Everything the engine's handles did since initialize began (the exporter started first) is counted.
    for op, field in FIELD.items():
        assert value(start, "infinity_io_bytes_total", op=op) - before.counters[("infinity_io_bytes_total", (op,))] \
            == getattr(io_start, field)
    # Per kind, to the byte: what the manager asked the handles for between the two scrapes.
    regions = {"param": ["param"], "grad": ["grad"], "optimizer_state": ["master", "exp_avg", "exp_avg_sq"]}
    for kind, names in regions.items():
        for op, route in (("read", ("nvme", "host")), ("write", ("host", "nvme"))):
            want = sum(moved.bytes[(op, r)] for r in names)
            got = delta(end, start, "infinity_tier_transfer_bytes_total", src_tier=route[0], dst_tier=route[1],
                        kind=kind, result="ok")
            assert got == want, (kind, op)
    assert moved.bytes[("read", "param")] > 0 and moved.bytes[("write", "grad")] > 0
    assert delta(end, start, "infinity_tier_transfer_bytes_total", src_tier="host", dst_tier="compute",
                 kind="param") == moved.bytes[("to_compute", "param")] > 0
    for op in ("read", "write"):
        assert delta(end, start, "infinity_io_bytes_total", op=op) == getattr(io_end, FIELD[op]) - getattr(
            io_start, FIELD[op]) == sum(v for (o, _), v in moved.bytes.items() if o == op)
        # Histograms count every request, and the size histogram's sum is the bytes asked for.
        requests = moved.requests[op]
        assert delta(end, start, "infinity_io_requests_total", op=op) == requests
        assert delta(end, start, "infinity_io_request_duration_seconds_count", op=op) == requests
        assert delta(end, start, "infinity_io_request_size_bytes_count", op=op) == requests
        assert delta(end, start, "infinity_io_request_duration_seconds_bucket", op=op, le="+Inf") == requests
        assert delta(end, start, "infinity_io_request_size_bytes_sum", op=op) == sum(
            v for (o, _), v in moved.bytes.items() if o == op)
        assert value(end, "infinity_io_requests_in_flight", op=op) == 0
        assert delta(end, start, "infinity_io_requests_total", op=op, result="error") == 0
    assert delta(end, start, "infinity_tier_transfer_duration_seconds_count", src_tier="nvme",
                 dst_tier="host") == moved.requests["read"]
    assert io_end.requests - io_start.requests == sum(moved.requests.values())
    # Each step's report is exported once: steps, prefetch outcomes and stall seconds add up.
    assert delta(end, start, "infinity_steps_total") == len(reports) == 4
    for outcome, field in (("hit", "prefetch_hits"), ("late", "prefetch_late"), ("miss", "prefetch_misses")):
        assert delta(end, start, "infinity_prefetch_total", outcome=outcome) == sum(getattr(r, field) for r in reports)
    assert delta(end, start, "infinity_prefetch_total") > 0
    assert delta(end, start, "infinity_stall_seconds_total", phase="read") == pytest.approx(
        sum(r.read_wait_s for r in reports))
    # The middle scrape sits between the two, counter by counter.
    for op in ("read", "write"):
        assert value(start, "infinity_io_bytes_total", op=op) < value(middle, "infinity_io_bytes_total", op=op) \
            < value(end, "infinity_io_bytes_total", op=op)
    # Gauges read the live objects: resident bytes are the engine's memory report, buffers its pools.
    def mine(name: str, **labels: str) -> float:
        return value(end, name, **labels) - sum(v for (n, key), v in others.items()
                                                 if n == name and set(labels.items()) <= set(zip(
                                                     metrics.METRICS[n].labels, key)))

    for tier in ("compute", "host", "nvme"):
        assert mine("infinity_tier_resident_bytes", tier=tier) == getattr(report, f"{tier}_bytes")
        assert mine("infinity_tier_peak_resident_bytes", tier=tier) == getattr(report, f"peak_{tier}_bytes")
    assert mine("infinity_tier_capacity_bytes", tier="host") == report.host_pool_bytes
    for pool in engine.run.pools():
        assert mine("infinity_host_buffers", pool=pool.name) == pool.buffer_count
    assert value(end, "infinity_aio_info") >= 1


@pytest.mark.parametrize("backend", [Backend.LIBAIO, Backend.POSIX], ids=["libaio", "posix"])
def test_failing_write_counts_its_errno(small_fs, batches, backend):  # noqa: F811 (fixture)
    """A gradient write into a hole punched in a full tmpfs fails with ENOSPC (tests/integration/test_faults.py):
    the error counter gets exactly the failed requests, with their errno, and the tier transfer says error."""
    exporter = start_exporter(0)
    engine = Engine(fresh_model(), settings(small_fs, backend))
    try:
        train_reporting(engine, batches[:1])
        (manager,) = engine.run.managers
        before, io_before = scrape(exporter.url)[0], engine.io_stats()
        loss = engine(*batches[1])
        punch_hole(str(manager.store.folder / "grad.swp"))
        fill(small_fs)
        with pytest.raises(AioError) as err:
            engine.backward(loss)
            engine.step()
        assert err.value.errno == errno.ENOSPC
        after = scrape(exporter.url)[0]
        failed = engine.io_stats().errors - io_before.errors
    finally:
        engine.close()
        exporter.stop()
    assert failed >= 1
    assert delta(after, before, "infinity_io_errors_total", op="write", errno="ENOSPC") == failed
    assert delta(after, before, "infinity_io_errors_total") == failed
    assert delta(after, before, "infinity_io_requests_total", op="write", result="error") == failed
    assert delta(after, before, "infinity_tier_transfers_total", src_tier="host", dst_tier="nvme", kind="grad",
                 result="error") == failed


def test_port_in_use_is_a_typed_error_naming_port_and_fix(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = config(tmp_path, prometheus={"enabled": True, "port": port})
        with pytest.raises(MetricsPortInUse) as err:
            infinity.initialize(model=fresh_model(), config=cfg)
    message = str(err.value)
    assert err.value.port == port and err.value.errno == errno.EADDRINUSE
    assert f"127.0.0.1:{port}" in message and "set prometheus.port to a free port" in message
    assert "LOCAL_RANK" in message
    assert not metrics.ACTIVE
    assert not list((tmp_path / "infinity-swap").glob("rank-0/run-*"))  # no engine was built


def test_one_port_per_local_rank(tmp_path, monkeypatch):
    port = free_port()
    with socket.socket() as s:  # the next port must be free too: it is this process's if LOCAL_RANK is 1
        try:
            s.bind(("127.0.0.1", port + 1))
        except OSError:
            pytest.skip(f"port {port + 1} is taken")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "5")
    cfg = config(tmp_path, prometheus={"enabled": True, "port": port})
    engine, *_ = infinity.initialize(model=fresh_model(), config=cfg)
    try:
        assert engine.exporter.port == port + 1
        _, constant = scrape(engine.exporter.url)
        assert constant == {"rank": "5"}
    finally:
        engine.close()


def test_disabled_block_starts_nothing(tmp_path):
    engine, *_ = infinity.initialize(model=fresh_model(), config=config(tmp_path))
    try:
        assert engine.exporter is None and not metrics.ACTIVE
    finally:
        engine.close()


def test_engine_parameters_are_counted_from_the_start(tmp_path):
    """The exporter starts before the engine is built: initialize's own writes (parameters and master
    weights) are in the counters."""
    port = free_port()
    before = metrics.TALLY.snapshot()
    engine, *_ = infinity.initialize(model=fresh_model(), config=config(
        tmp_path, prometheus={"enabled": True, "port": port}))
    try:
        written = engine.io_stats().bytes_written
        samples, _ = scrape(engine.exporter.url)
    finally:
        engine.close()
    counted = value(samples, "infinity_io_bytes_total", op="write") - before.counters[
        ("infinity_io_bytes_total", ("write",))]
    assert counted == written > SPEC.parameters * 4
