"""The metrics exporter: serves infinity's metrics (infinity/metrics.py) at http://ADDRESS:PORT/metrics.

    exporter = start_exporter(port=9400, rank=0, labels={"job_name": "llama"})
    ...
    exporter.stop()

`infinity.initialize` starts one from the config's `prometheus` block (`from_config`) and
`engine.close()` stops it; `infinity-train --metrics-port N` and `infinity-bench --metrics-port N` turn
it on from the command line.  A port already in use is a MetricsPortInUse naming the port and the fix.

[Note: several processes on a node]  Each process serves its own port: prometheus.port + LOCAL_RANK
(torchrun sets LOCAL_RANK), and every sample carries a `rank` label.  prometheus_client's multiprocess
mode is not used: it aggregates only prometheus_client's own metric objects through files in
PROMETHEUS_MULTIPROC_DIR, while infinity's collector reads each process's tally and live objects at
scrape time (see the note in metrics.py); a port per rank also keeps one slow rank visible as itself.

Within one process, starts on the same address and port share one server (initialize inside
infinity-train, which starts it before building the model so zero.Init's writes are counted too); the
last stop() shuts it down, and anything still running is stopped at exit.
"""
from __future__ import annotations

import atexit
import errno
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily, Metric as Family)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from infinity import metrics
from infinity.errors import ConfigError, InfinityError, Problem

log = logging.getLogger("infinity.metrics")


class ExporterError(InfinityError, OSError):
    """The metrics exporter cannot listen where it was asked to."""

    def __init__(self, address: str, port: int, err: int, setting: str, fix: str):
        self.address, self.port = address, port
        message = (f"cannot serve metrics on {address}:{port}: {os.strerror(err)} ({metrics.errno_name(err)}); "
                   f"{fix}")
        OSError.__init__(self, err, message)
        self.setting, self.message = setting, message

    def __str__(self) -> str:
        return self.message


class MetricsPortInUse(ExporterError):
    """Another process (or another exporter of this one, with other labels) listens on the port."""

    def __init__(self, address: str, port: int, setting: str, detail: str = ""):
        fix = (f"{detail + '; ' if detail else ''}set {setting} to a free port, or stop the process listening "
               f"there (ss -ltnp 'sport = :{port}' names it); with several processes per node each uses "
               f"its port + LOCAL_RANK, so leave room for them")
        super().__init__(address, port, errno.EADDRINUSE, setting, fix)


class InfinityCollector(Collector):
    """Turns the tally and the live objects into metric families when Prometheus scrapes."""

    def __init__(self, const_labels: Mapping[str, str]):
        self._names, self._values = tuple(const_labels), tuple(const_labels.values())

    def describe(self) -> list[Family]:
        return []  # the families are built at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Family]:
        tally = metrics.TALLY.snapshot()
        scalars: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in metrics.METRICS}
        for name, labels in metrics.DECLARED:
            scalars[name][labels] = 0
        for source in (tally.counters, tally.gauges, metrics.live_gauges()):
            for (name, labels), value in source.items():
                scalars[name][labels] = value
        histograms: dict[str, dict[tuple[str, ...], metrics.Buckets]] = {name: {} for name in metrics.METRICS}
        for (name, labels), h in tally.histograms.items():
            histograms[name][labels] = h
        for m in metrics.METRICS.values():
            yield self._family(m, scalars[m.name], histograms[m.name])

    def _family(self, m: metrics.Metric, values: dict[tuple[str, ...], float],
                hists: dict[tuple[str, ...], metrics.Buckets]) -> Family:
        names = [*self._names, *m.labels]
        if m.type == "info":
            family = InfoMetricFamily(m.name[: -len("_info")], m.help, labels=list(self._names))
            for labels in sorted(values):
                family.add_metric(list(self._values), dict(zip(m.labels, labels)))
            return family
        if m.type == "histogram":
            family = HistogramMetricFamily(m.name, m.help, labels=names)
            for labels, h in sorted(hists.items()):
                family.add_metric([*self._values, *labels], _cumulative(h), h.sum)
            return family
        family = (CounterMetricFamily if m.type == "counter" else GaugeMetricFamily)(m.name, m.help, labels=names)
        for labels, value in sorted(values.items()):
            family.add_metric([*self._values, *labels], value)
        return family


def _cumulative(h: metrics.Buckets) -> list[tuple[str, float]]:
    out, total = [], 0
    for bound, n in zip(h.bounds, h.counts):
        total += n
        out.append((floatToGoString(bound), total))
    out.append(("+Inf", total + h.counts[-1]))
    return out


@dataclass
class _Server:
    httpd: Any
    thread: threading.Thread
    const_labels: dict[str, str]
    users: int = 1


_servers: dict[tuple[str, int], _Server] = {}
_servers_lock = threading.Lock()


class Exporter:
    """One hold on a running server; stop() releases it (the last one shuts the server down)."""

    def __init__(self, address: str, port: int):
        self.address, self.port = address, port
        self._stopped = False

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        with _servers_lock:
            if self._stopped:
                return
            self._stopped = True
            server = _servers.get((self.address, self.port))
            if server is None:
                return
            server.users -= 1
            if server.users > 0:
                return
            del _servers[(self.address, self.port)]
        _shut(server)

    def __enter__(self) -> "Exporter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_exporter(port: int, address: str = "127.0.0.1", rank: int | None = None,
                   labels: Mapping[str, str] | None = None, setting: str = "prometheus.port") -> Exporter:
    """Serves /metrics on address:port (0: a free port, see Exporter.port) and starts recording.

    rank: the `rank` label of every sample (None: no such label); labels: more constant labels.
    setting: the option that chose the port, named in errors."""
    const = _const_labels(rank, labels or {})
    with _servers_lock:
        running = _servers.get((address, port))
        if running is not None:
            if running.const_labels != const:
                raise MetricsPortInUse(address, port, setting, f"this process already serves metrics there with "
                                       f"labels {running.const_labels}, not {const}")
            running.users += 1
            return Exporter(address, port)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(InfinityCollector(const))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        try:
            httpd, thread = start_http_server(port, address, registry)
        except OSError as err:
            raise _bind_error(err, address, port, setting) from None
        port = httpd.server_port
        _servers[(address, port)] = _Server(httpd, thread, const)
        metrics.enable()
    log.info("serving metrics at http://%s:%d/metrics", address, port)
    return Exporter(address, port)


def from_config(prometheus: Any, rank: int = 0, setting: str = "prometheus.port") -> Exporter | None:
    """The exporter the config's `prometheus` block asks for (None when disabled), on port + LOCAL_RANK.
    setting: what chose the port, for errors (a command-line flag that overrode the config)."""
    if not prometheus.enabled:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    port = prometheus.port + local_rank
    if port > 65535:
        raise ConfigError([Problem(setting, f"{prometheus.port} + LOCAL_RANK {local_rank} is above 65535",
                                   "choose a lower port")])
    setting += f" (the port + LOCAL_RANK {local_rank} is taken)" if local_rank else ""
    return start_exporter(port, prometheus.bind_address, rank=rank or int(os.environ.get("RANK", "0") or 0),
                          labels=prometheus.label_dict, setting=setting)


def _const_labels(rank: int | None, labels: Mapping[str, str]) -> dict[str, str]:
    taken = sorted(set(labels) & metrics.RESERVED_LABELS)
    if taken:
        raise ConfigError([Problem(f"prometheus.labels.{name}", "is a label infinity's own metrics use",
                                   "choose another name") for name in taken])
    const = {"rank": str(rank)} if rank is not None else {}
    const.update({k: str(v) for k, v in sorted(labels.items())})
    return const


def _bind_error(err: OSError, address: str, port: int, setting: str) -> ExporterError:
    code = errno.EADDRNOTAVAIL if isinstance(err, socket.gaierror) else err.errno or errno.EIO
    if code == errno.EADDRINUSE:
        return MetricsPortInUse(address, port, setting)
    if code in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        return ExporterError(address, port, code, setting, 'prometheus.bind_address is not an address of this '
                             'machine; use "127.0.0.1", or "0.0.0.0" for every interface')
    if code == errno.EACCES:
        return ExporterError(address, port, code, setting, f"ports below 1024 need privileges; set {setting} to "
                             "1024 or above")
    return ExporterError(address, port, code, setting, f"check {setting} and prometheus.bind_address")


def _shut(server: _Server) -> None:
    server.httpd.shutdown()
    server.httpd.server_close()
    server.thread.join(timeout=5)
    metrics.disable()


@atexit.register
def stop_all() -> None:
    """Shuts every server of this process down (at exit; tests call it too)."""
    with _servers_lock:
        servers = list(_servers.values())
        _servers.clear()
    for server in servers:
        _shut(server)
