"""Prometheus metrics for `--watch`: served on `--metrics-listen`, written to `--metrics-file`.

Gauges describe the state after the last pass (one series per certificate in the
manifest; series of removed certificates are dropped); counters count events since the
process started.
"""

from __future__ import annotations

import logging
from pathlib import Path

from reconciler.atomic import write_atomic
from reconciler.endpoints import CURRENT, UNREACHABLE
from reconciler.outcome import PassOutcome

log = logging.getLogger("reconciler.metrics")

PASS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def parse_listen(text: str) -> tuple[str, int]:
    """ "127.0.0.1:9101", "[::1]:9101", ":9101" (all interfaces) → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--metrics-listen {text!r} is not HOST:PORT; write e.g. 127.0.0.1:9101")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


class Metrics:
    def __init__(self):
        # third-party, and only --watch and --metrics-file need it: not imported by other runs
        import prometheus_client
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        prometheus_client.disable_created_metrics()  # no *_created series: noise in a textfile
        self.registry = r = CollectorRegistry()
        by_name = ["name"]
        self.not_after = Gauge(
            "reconciler_certificate_not_after_timestamp_seconds",
            "Expiry of the certificate on disk (Unix time).",
            by_name,
            registry=r,
        )
        self.renewal = Gauge(
            "reconciler_certificate_renewal_timestamp_seconds",
            "When the certificate on disk enters its (jittered) renewal window (Unix time).",
            by_name,
            registry=r,
        )
        self.ready = Gauge(
            "reconciler_certificate_ready",
            "1 when the certificate on disk matches the manifest and nothing is left to do.",
            by_name,
            registry=r,
        )
        self.issuance_failures = Counter(
            "reconciler_issuance_failures_total", "Failed issuances, renewals and file repairs.", by_name, registry=r
        )
        self.hook_failures = Counter(
            "reconciler_hook_failures_total",
            "Failed or timed-out post-renewal commands, per certificate.",
            by_name,
            registry=r,
        )
        self.manifest_valid = Gauge(
            "reconciler_manifest_valid",
            "1 when the manifest on disk is valid; 0 while the last valid version is used.",
            registry=r,
        )
        self.ca_reachable = Gauge(
            "reconciler_ca_reachable", "0 while the CA does not answer (one probe at a time until it does).", registry=r
        )
        self.pass_duration = Histogram(
            "reconciler_pass_duration_seconds", "Duration of reconcile passes.", buckets=PASS_BUCKETS, registry=r
        )
        self.last_pass = Gauge(
            "reconciler_last_pass_timestamp_seconds", "When the last pass finished (Unix time).", registry=r
        )
        self.passes = Counter("reconciler_passes_total", "Passes by outcome.", ["result"], registry=r)
        by_endpoint = ["name", "endpoint"]
        self.served_not_after = Gauge(
            "reconciler_served_certificate_not_after_timestamp_seconds",
            "Expiry of the certificate a serve endpoint presents (Unix time); absent while it is unreachable.",
            by_endpoint,
            registry=r,
        )
        self.served_current = Gauge(
            "reconciler_served_certificate_current",
            "1 when the serve endpoint presents the certificate on disk.",
            by_endpoint,
            registry=r,
        )
        self.endpoint_up = Gauge(
            "reconciler_serve_endpoint_up",
            "1 when the serve endpoint completed a TLS handshake.",
            by_endpoint,
            registry=r,
        )
        self.ca_reachable.set(1)
        self._names: set[str] = set()
        self._endpoints: set[tuple[str, str]] = set()

    def record(self, outcome: PassOutcome, ca_reachable: bool) -> None:
        """After a pass: the gauges say what its outcome says; the counters count its failures."""
        names = set()
        for c in outcome.certificates:
            names.add(c.name)
            if c.not_after is not None:
                self.not_after.labels(c.name).set(c.not_after.timestamp())
            else:
                _remove(self.not_after, c.name)
            if c.renewal_at is not None:
                self.renewal.labels(c.name).set(c.renewal_at.timestamp())
            else:
                _remove(self.renewal, c.name)
            self.ready.labels(c.name).set(1 if c.ready else 0)
            failures = self.issuance_failures.labels(c.name)  # the series exists from the start, at 0
            if c.attempted and c.failed:  # a blocked path attempts nothing
                failures.inc()
            hook_failures = self.hook_failures.labels(c.name)
            if c.hook_ok is False:
                hook_failures.inc()
        for gone in self._names - names:
            for metric in (self.not_after, self.renewal, self.ready, self.issuance_failures, self.hook_failures):
                _remove(metric, gone)
        self._names = names
        self._record_served(outcome)
        self.pass_duration.observe(outcome.duration)
        self.last_pass.set(outcome.finished_at)
        self.passes.labels("ok" if outcome.ok else "error").inc()
        self.ca_reachable.set(1 if ca_reachable else 0)

    def _record_served(self, outcome: PassOutcome) -> None:
        """Per `serve` endpoint: what it presents, so an alert fires when a service presents a
        certificate about to expire although the file is fresh (docs/operations.md)."""
        seen: set[tuple[str, str]] = set()
        for c in outcome.certificates:
            for e in c.served:
                key = (c.name, e.served.connect)
                seen.add(key)
                self.endpoint_up.labels(*key).set(0 if e.state == UNREACHABLE else 1)
                if e.served.not_after is not None:
                    self.served_not_after.labels(*key).set(e.served.not_after.timestamp())
                    self.served_current.labels(*key).set(1 if e.state == CURRENT else 0)
                else:
                    for gauge in (self.served_not_after, self.served_current):
                        _remove(gauge, *key)
        for gone in self._endpoints - seen:
            for gauge in (self.served_not_after, self.served_current, self.endpoint_up):
                _remove(gauge, *gone)
        self._endpoints = seen

    def record_failed_pass(self, duration: float, finished_at: float) -> None:
        """A pass that could not run at all (lock held elsewhere, issuer misconfigured)."""
        self.pass_duration.observe(duration)
        self.passes.labels("error").inc()

    def set_manifest_valid(self, valid: bool) -> None:
        self.manifest_valid.set(1 if valid else 0)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def write_file(self, path: Path) -> None:
        """Textfile-collector format, atomically (node_exporter never reads half a file)."""
        try:
            write_atomic(path, self.exposition(), mode=0o644)
        except OSError as exc:
            log.warning("cannot write metrics to %s: %s", path, exc.strerror or exc)

    def serve(self, listen: str):
        """Serve /metrics on `listen` (HOST:PORT) from a daemon thread; returns the bound (host, port)."""
        from prometheus_client import start_http_server

        host, port = parse_listen(listen)
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[0], server.server_address[1]


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass
