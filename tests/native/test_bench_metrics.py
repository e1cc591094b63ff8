"""infinity-bench --metrics-port: the sweep's requests are served for Prometheus while it runs."""
from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from infinity import exporter, metrics
from infinity.bench import sweep

from test_bench import SMALL, bench, nvme  # noqa: F401 (nvme is a fixture)

pytestmark = pytest.mark.native
IO_SIZE = 8 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples if s.name.startswith("infinity_")}


def test_sweep_is_scraped_while_it_runs(capsys, nvme, monkeypatch):  # noqa: F811 (fixture)
    port, seen = free_port(), []
    real = sweep._timed

    def timed_then_scraped(handle, op, *args):
        run = real(handle, op, *args)
        seen.append((op.name.lower(), scrape(port)))
        return run

    monkeypatch.setattr(sweep, "_timed", timed_then_scraped)
    before = metrics.TALLY.snapshot().counters
    status, _, err = bench(capsys, nvme, *SMALL, "--queue_depth", "4,8", "--metrics-port", str(port))
    assert status == 0, err
    assert f"metrics at http://127.0.0.1:{port}/metrics" in err
    assert [op for op, _ in seen] == ["write", "read", "write", "read"]
    for i, (op, samples) in enumerate(seen):
        reads = sum(1 for o, _ in seen[:i + 1] if o == "read")
        counted = samples[("infinity_io_bytes_total", (("op", "read"),))] - before[
            ("infinity_io_bytes_total", ("read",))]
        assert counted == reads * IO_SIZE  # every byte the sweep read so far, no more
        info = {dict(labels)["queue_depth"] for (name, labels) in samples if name == "infinity_aio_info"}
        assert ("4" if i < 2 else "8") in info  # the setting being timed (handles other tests left open show too)
    with pytest.raises(urllib.error.URLError):  # the sweep is over: the port is closed again
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    assert not metrics.ACTIVE


def test_port_in_use_names_the_flag(capsys, nvme):  # noqa: F811 (fixture)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, _, err = bench(capsys, nvme, *SMALL, "--metrics-port", str(port))
    assert status == 1
    assert f"127.0.0.1:{port}" in err and "set --metrics-port to a free port" in err
    exporter.stop_all()
