"""Delivery as a stage of the pass: what each guest holds (observe side, read only) and
the deliveries and reloads a plan asks for (apply side, after the host files are in place).

Each guest is handled by one thread, its certificates one after another; guests run in
parallel. A guest that is not running (or runs on another node) leaves its deliveries
owed, not failed: the next pass that finds it running delivers. The status store keeps
per certificate what was delivered (reconciler.guestfacts.DeliveryRecord); a reload is
recorded as owed before the files move, and cleared only by its own success, so a kill at
any step leaves a pass that delivers again and reloads at least once.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Callable, Mapping

from reconciler.crypto import fingerprint, load_certificate
from reconciler.guestfacts import DELIVER, RELOAD, DeliveryRecord, GuestSeen, GuestSpec, guest_drifts, host_source
from reconciler.guests.deliver import deliver, guest_of, look, reload
from reconciler.guests.proxmox import RUNNING, GuestError, GuestMissing, ProxmoxCLI
from reconciler.model import DesiredCert, Observed

log = logging.getLogger("reconciler.guests")


# --------------------------------------------------------------------------- observe


def source_of(cert: DesiredCert, o: Observed) -> dict | None:
    """host_source() of the files a delivery of `cert` would copy now (None: not all there)."""
    spec = cert.guest
    if spec is None or not (o.cert_file.present and o.key_file.present):
        return None
    ca = None
    if spec.ca_path:
        ca = (
            o.ca_file.stamp
            if cert.ca_path is not None and o.ca_file is not None and o.ca_file.present
            else o.issuer_root
        )
    return host_source(o.cert_file.stamp, o.key_file.stamp, ca)


def with_records(
    certs, observed: Mapping[str, Observed], records: Mapping[str, DeliveryRecord | None]
) -> dict[str, Observed]:
    """`observed` with each guest entry's last delivery and host stamps; no guest is looked at."""
    out = dict(observed)
    for cert in certs:
        if cert.guest is not None:
            out[cert.name] = replace(
                observed[cert.name], guest=GuestSeen(records.get(cert.name), None, source_of(cert, observed[cert.name]))
            )
    return out


def observe_guests(
    certs,
    observed: Mapping[str, Observed],
    records: Mapping[str, DeliveryRecord | None],
    cli: ProxmoxCLI | None = None,
    look_all: bool = True,
    workers: int = 4,
) -> dict[str, Observed]:
    """`observed` with each guest entry's GuestSeen. A guest is looked at (one command for
    all its files) when `look_all` (a resync) or when one of its certificates' rows already
    asks for a delivery or reload, so the plan can say whether it runs."""
    out = with_records(certs, observed, records)
    by_guest: dict[str, list[DesiredCert]] = {}
    for cert in certs:
        if cert.guest is None:
            continue
        seen = out[cert.name].guest
        asks = guest_drifts(cert.guest, seen.source, seen.record, None, False) or seen.source is None
        if asks or (look_all and not cert.guest.legacy):
            by_guest.setdefault(cert.guest.key, []).append(cert)
    if not by_guest:
        return out
    cli = cli or ProxmoxCLI()

    def one(group: list[DesiredCert]):
        paths = list(dict.fromkeys(t.path for c in group for t in c.guest.targets()))
        return group, look(cli, group[0].guest, paths)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(by_guest)))) as pool:
        for group, view in pool.map(one, by_guest.values()):
            for cert in group:
                out[cert.name] = replace(out[cert.name], guest=replace(out[cert.name].guest, view=view))
    return out


# --------------------------------------------------------------------------- apply


@dataclass
class DeliveryOutcome:
    name: str
    guest: str  # "container 101"
    ok: bool
    delivered: bool = False
    reloaded: bool = False
    owed: str | None = None  # not done, and not a failure: the guest is not running here
    error: str | None = None

    def describe(self) -> str:
        if self.owed:
            return f"{self.name}: delivery to {self.guest} owed: {self.owed}"
        if self.error:
            return f"{self.name}: delivery to {self.guest} failed: {self.error}"
        done = [w for w, flag in (("delivered", self.delivered), ("reloaded", self.reloaded)) if flag]
        return f"{self.name}: {' and '.join(done) or 'nothing to do'} in {self.guest}"


@dataclass(frozen=True)
class DeliveryContext:
    """`records(name)`: the status store's record of that certificate (reconciler.status);
    `save()`: write the store (at the moments the reload-owed rule needs); `root_pem()`: the
    issuer's root, for a guest CA file where the host has none."""

    records: Callable[[str], object]
    save: Callable[[], None]
    root_pem: Callable[[], bytes]
    cli: ProxmoxCLI | None = None
    workers: int = 4
    node: str | None = None
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)


def wants_delivery(p) -> bool:
    return p.cert.guest is not None and any(a.action in (DELIVER, RELOAD) for a in p.actions)


def deliver_all(plans: list, ctx: DeliveryContext) -> dict[str, DeliveryOutcome]:
    """Deliver and reload what `plans` (CertPlans whose host files are in place) ask for."""
    todo = [p for p in plans if wants_delivery(p)]
    if not todo:
        return {}
    cli = ctx.cli or ProxmoxCLI()
    if ctx.node is None:  # the status store says where each guest was last delivered from
        ctx = replace(ctx, node=_node_name(cli))
    for p in todo:  # owed before anything moves: a kill from here on reloads next pass
        record = ctx.records(p.cert.name)
        if any(a.action == DELIVER for a in p.actions):
            if p.cert.guest.legacy:
                record.owe_hook()
            else:
                _delivery(record, p.cert.guest).reload_owed = bool(p.cert.guest.reload)
    ctx.save()
    by_guest: dict[str, list] = {}
    for p in todo:
        by_guest.setdefault(p.cert.guest.key, []).append(p)
    outcomes: dict[str, DeliveryOutcome] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(ctx.workers, len(by_guest)))) as pool:
        for group in pool.map(lambda group: _one_guest(group, cli, ctx), by_guest.values()):
            outcomes.update((o.name, o) for o in group)
    ctx.save()
    return outcomes


def _node_name(cli: ProxmoxCLI) -> str | None:
    try:
        return cli.local_node()
    except GuestError:
        return None  # a node outside a cluster (or pvesh broken): delivery does not need it


def _delivery(record, spec: GuestSpec) -> DeliveryRecord:
    if record.delivery is None or record.delivery.guest != spec.key:
        record.delivery = DeliveryRecord(spec.key)
    return record.delivery


def _one_guest(plans: list, cli: ProxmoxCLI, ctx: DeliveryContext) -> list[DeliveryOutcome]:
    spec = plans[0].cert.guest
    try:
        state = cli.status(guest_of(spec))
        owed = None if state == RUNNING else f"{spec.describe()} is {state}; delivered once it runs"
    except GuestMissing as exc:
        owed = f"{exc.message}; delivered by the node that runs it"
    except GuestError as exc:
        return [_failed(p, ctx, str(exc)) for p in plans]
    if owed:
        return [_owed(p, ctx, owed) for p in plans]
    outcomes = [_one_cert(p, cli, ctx) for p in plans]
    _reload_all(plans, outcomes, cli, ctx)
    return [_failed(p, ctx, o.error) if o.error else o for p, o in zip(plans, outcomes, strict=True)]


def _owed(p, ctx: DeliveryContext, why: str) -> DeliveryOutcome:
    spec = p.cert.guest
    _delivery(ctx.records(p.cert.name), spec).owed = why
    log.warning("%s: delivery to %s owed: %s", p.cert.name, spec.describe(), why)
    return DeliveryOutcome(p.cert.name, spec.describe(), True, owed=why)


def _reload_all(plans: list, outcomes: list[DeliveryOutcome], cli: ProxmoxCLI, ctx: DeliveryContext) -> None:
    """Like hooks: each distinct reload command once per guest, after all its files are in
    place, for the certificates that owe it."""
    owing: dict[str, list[tuple]] = {}
    for p, outcome in zip(plans, outcomes, strict=True):
        spec = p.cert.guest
        if outcome.ok and spec.reload and not spec.legacy and _delivery(ctx.records(p.cert.name), spec).reload_owed:
            owing.setdefault(spec.reload, []).append((p, outcome))
    for group in owing.values():
        _reload(cli, ctx, [p for p, _o in group], [o for _p, o in group])


def _one_cert(p, cli: ProxmoxCLI, ctx: DeliveryContext) -> DeliveryOutcome:
    spec: GuestSpec = p.cert.guest
    record = _delivery(ctx.records(p.cert.name), spec)
    outcome = DeliveryOutcome(p.cert.name, spec.describe(), True)
    if any(a.action == DELIVER for a in p.actions):
        try:
            payload, source = host_payload(p.cert, ctx.root_pem)
            record.files = deliver(cli, spec, payload)
        except (GuestError, OSError) as exc:
            return DeliveryOutcome(p.cert.name, spec.describe(), False, error=str(exc))
        record.source, record.node, record.at, record.owed, record.error = (
            source,
            ctx.node,
            ctx.now().isoformat(),
            None,
            None,
        )
        outcome.delivered = True
        log.info("%s: delivered to %s", p.cert.name, spec.describe())
    return outcome


def _reload(cli: ProxmoxCLI, ctx: DeliveryContext, plans: list, outcomes: list[DeliveryOutcome]) -> None:
    """One reload command in one guest, for every certificate that owes it."""
    spec: GuestSpec = plans[0].cert.guest
    try:
        run = reload(cli, spec)
        error = None if run.ok else f"the reload {spec.reload!r} {run.describe()}"
    except GuestError as exc:
        error = str(exc)
    for p, outcome in zip(plans, outcomes, strict=True):
        record = _delivery(ctx.records(p.cert.name), spec)
        if error:
            outcome.ok, outcome.error = False, error
            continue
        record.reload_owed, record.error = False, None
        outcome.reloaded = True
    if not error:
        log.info("%s: reloaded in %s", ", ".join(p.cert.name for p in plans), spec.describe())


def _failed(p, ctx: DeliveryContext, error: str) -> DeliveryOutcome:
    spec = p.cert.guest
    record = _delivery(ctx.records(p.cert.name), spec)
    record.error, record.owed = error, None
    log.error("%s: delivery to %s failed (owed, retried next pass): %s", p.cert.name, spec.describe(), error)
    return DeliveryOutcome(p.cert.name, spec.describe(), False, error=error)


def host_payload(cert: DesiredCert, root_pem: Callable[[], bytes]) -> tuple[dict[str, bytes], dict]:
    """The bytes to deliver (label → bytes) and host_source() of exactly those files."""
    payload, stamps = {}, {}
    for label, path in (("cert", cert.cert_path), ("key", cert.key_path)):
        payload[label], stamps[label] = _read(path, cert.allow_symlink)
    ca = None
    if cert.guest.ca_path:
        if cert.ca_path is not None:
            payload["ca"], ca = _read(cert.ca_path, cert.allow_symlink)
        else:
            payload["ca"] = root_pem()
            ca = fingerprint(load_certificate(payload["ca"]))
    return payload, host_source(stamps["cert"], stamps["key"], ca)


def _read(path, follow: bool) -> tuple[bytes, tuple]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        return fh.read(), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
