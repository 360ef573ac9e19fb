"""Prometheus metrics for `--watch`: served on `--metrics-listen`, written to `--metrics-file`.

Gauges describe the state after the last pass (one series per certificate in the
manifest; series of removed certificates are dropped); counters count events since the
process started.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("reconciler.metrics")

PASS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def parse_listen(text: str) -> tuple[str, int]:
    """"127.0.0.1:9101", "[::1]:9101", ":9101" (all interfaces) → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--metrics-listen {text!r} is not HOST:PORT; write e.g. 127.0.0.1:9101")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


class Metrics:
    def __init__(self):
        import prometheus_client
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        prometheus_client.disable_created_metrics()  # no *_created series: noise in a textfile
        self.registry = r = CollectorRegistry()
        by_name = ["name"]
        self.not_after = Gauge("reconciler_certificate_not_after_timestamp_seconds", "Expiry of the certificate on disk (Unix time).", by_name, registry=r)
        self.renewal = Gauge(
            "reconciler_certificate_renewal_timestamp_seconds", "When the certificate on disk enters its (jittered) renewal window (Unix time).", by_name, registry=r
        )
        self.ready = Gauge("reconciler_certificate_ready", "1 when the certificate on disk matches the manifest and nothing is left to do.", by_name, registry=r)
        self.issuance_failures = Counter("reconciler_issuance_failures_total", "Failed issuances, renewals and file repairs.", by_name, registry=r)
        self.hook_failures = Counter("reconciler_hook_failures_total", "Failed or timed-out post-renewal commands, per certificate.", by_name, registry=r)
        self.manifest_valid = Gauge("reconciler_manifest_valid", "1 when the manifest on disk is valid; 0 while the last valid version is used.", registry=r)
        self.ca_reachable = Gauge("reconciler_ca_reachable", "0 while the CA does not answer (one probe at a time until it does).", registry=r)
        self.pass_duration = Histogram("reconciler_pass_duration_seconds", "Duration of reconcile passes.", buckets=PASS_BUCKETS, registry=r)
        self.last_pass = Gauge("reconciler_last_pass_timestamp_seconds", "When the last pass finished (Unix time).", registry=r)
        self.passes = Counter("reconciler_passes_total", "Passes by outcome.", ["result"], registry=r)
        self.ca_reachable.set(1)
        self._names: set[str] = set()

    def record_pass(self, snap, result, pending: set[str], renewal_at: dict[str, float], duration: float, finished_at: float, ca_reachable: bool) -> None:
        """After a pass: `snap.observed` is the disk after it; `pending` the names left with work
        to do; `renewal_at` each certificate's renewal deadline (Unix time)."""
        names = set()
        for p in snap.plan.certificates:
            name = p.cert.name
            names.add(name)
            facts = snap.observed[name].cert if name in snap.observed else None
            if facts is not None:
                self.not_after.labels(name).set(facts.not_after.timestamp())
                if name in renewal_at:
                    self.renewal.labels(name).set(renewal_at[name])
            else:
                for gauge in (self.not_after, self.renewal):
                    _remove(gauge, name)
            self.ready.labels(name).set(0 if (p.error or name in pending) else 1)
            self.issuance_failures.labels(name)  # the series exists from the start, at 0
            self.hook_failures.labels(name)
        for c in result.certificates:
            if not c.ok and c.actions:  # attempted and failed (a blocked path attempts nothing)
                self.issuance_failures.labels(c.name).inc()
        for h in result.hooks:
            if not h.ok:
                for name in h.certificates:
                    self.hook_failures.labels(name).inc()
        for gone in self._names - names:
            for metric in (self.not_after, self.renewal, self.ready, self.issuance_failures, self.hook_failures):
                _remove(metric, gone)
        self._names = names
        self.pass_duration.observe(duration)
        self.last_pass.set(finished_at)
        self.passes.labels("ok" if result.ok else "error").inc()
        self.ca_reachable.set(1 if ca_reachable else 0)

    def record_single_pass(self, snap, result, duration: float, finished_at: float) -> None:
        """A one-shot `reconcile --metrics-file`: the same series as --watch, from one pass."""
        from reconciler.diff import renewal_due_at

        renewal_at = {
            p.cert.name: renewal_due_at(p.cert, facts.not_before, facts.not_after).timestamp()
            for p in snap.plan.certificates
            if (facts := snap.observed[p.cert.name].cert) is not None
        }
        unreachable = any(c.transient for c in result.certificates if not c.ok)
        self.set_manifest_valid(True)
        self.record_pass(snap, result, pending_after(snap, result), renewal_at, duration, finished_at, not unreachable)

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
        from reconciler.atomic import write_atomic

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


def pending_after(snap, result) -> set[str]:
    """Names still left with work after a pass: planned and not done, or a hook that failed."""
    done = {c.name for c in result.certificates if c.ok}
    pending = {p.cert.name for p in snap.plan.certificates if p.actions and p.cert.name not in done}
    return pending | {n for h in result.hooks if not h.ok for n in h.certificates}


def _remove(metric, name: str) -> None:
    try:
        metric.remove(name)
    except KeyError:
        pass
