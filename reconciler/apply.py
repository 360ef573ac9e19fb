"""apply: carry out a Plan. The only stage that writes files, talks to a CA or runs commands.

It executes the plan it is given and never re-decides it. One certificate's failure
never stops the others; every failure is recorded and makes the pass exit 1.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from reconciler.atomic import commit, discard, fsync_dirs, make_parents, set_metadata, stage, sweep_temporaries
from reconciler.diff import CHMOD, CHOWN, RENEW, REWRITE_CHAIN, WRITE_CA
from reconciler.hooks import HookOutcome, run_hook
from reconciler.issuers import IssueRequest, Issuer, IssuerError
from reconciler.model import CA_MODE, DesiredCert
from reconciler.plan import CertPlan, Plan
from reconciler.sans import ordered
from reconciler.status import HookRun, StatusStore

log = logging.getLogger("reconciler.apply")


@dataclass
class CertResult:
    name: str
    actions: tuple[str, ...]
    ok: bool
    error: str | None = None
    content_changed: bool = False
    transient: bool = False


@dataclass
class Result:
    certificates: list[CertResult] = field(default_factory=list)
    hooks: list[HookOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.certificates) and all(h.ok for h in self.hooks)

    @property
    def changed(self) -> bool:
        return any(c.actions for c in self.certificates if c.ok)

    def failures(self) -> list[str]:
        out = [f"{c.name}: {c.error}" for c in self.certificates if not c.ok]
        out += [f"hook {h.command!r} for {', '.join(h.certificates)} {h.describe()}" for h in self.hooks if not h.ok]
        return out


class DeployError(Exception):
    pass


# crash-consistency tests: RECONCILER_FAULT_INJECT=<point>[@N] SIGKILLs the process at the
# N-th fault_point("<point>") (see reconciler/faults.py for every point). Inert otherwise.
from reconciler.faults import fault_point  # noqa: E402


def _os_error(exc: OSError, what: str, path: Path) -> str:
    import errno

    hints = {
        errno.ENOSPC: "the filesystem is full; the old files were left as they were. Free space and run again",
        errno.EDQUOT: "a disk quota is exhausted; the old files were left as they were",
        errno.EACCES: "permission denied; run as root or give the reconciler write access to the folder",
        errno.EPERM: "operation not permitted; run as root (chown needs it)",
        errno.EROFS: "the filesystem is read-only",
        errno.ELOOP: "it is a symlink now; refusing to follow it",
    }
    return f"cannot {what} {path}: {exc.strerror or exc}" + (f" ({hints[exc.errno]})" if exc.errno in hints else "")


def sweep(plan: Plan, extra: tuple[Path, ...] = ()) -> list[Path]:
    """Remove temporary files earlier, killed passes left beside managed files (and in
    `extra` folders: the state folder, where the status store is written)."""
    folders = {p.cert.cert_path.parent for p in plan.certificates} | {p.cert.key_path.parent for p in plan.certificates}
    folders |= {p.cert.ca_path.parent for p in plan.certificates if p.cert.ca_path is not None}
    folders |= {Path(os.path.realpath(path)).parent for p in plan.certificates if p.cert.allow_symlink for path in (p.cert.cert_path, p.cert.key_path)}
    folders |= set(extra)
    removed: list[Path] = []
    for folder in sorted(folders):
        removed += sweep_temporaries(folder)
    return removed


def _request(cert: DesiredCert) -> IssueRequest:
    return IssueRequest(cert.name, cert.common_name, ordered(cert.sans), cert.duration, cert.cert_type, cert.key)


def _current_key(cert: DesiredCert):
    from reconciler.crypto import load_key

    try:
        return load_key(cert.key_path.read_bytes())
    except (OSError, ValueError, TypeError):
        return None


def _check_issued(cert: DesiredCert, key, leaf_pem: bytes) -> None:
    """Never deploy what we did not ask for: the CA's answer must carry our key and our names."""
    from cryptography import x509

    from reconciler.crypto import same_public_key
    from reconciler.observe import Trust, parse_cert

    try:
        leaf = x509.load_pem_x509_certificates(leaf_pem)[0]
    except ValueError:
        raise IssuerError("the CA returned something that is not a PEM certificate", hint="check the CA's logs") from None
    if not same_public_key(leaf, key):
        raise IssuerError("the CA returned a certificate for another key than the one requested", hint="check the CA's logs")
    facts, err = parse_cert(leaf_pem, Trust.of([], False))
    if facts is None or facts.sans != cert.sans:
        got = ", ".join(sorted(facts.sans)) if facts else err
        raise IssuerError(f"the CA returned a certificate for other SANs ({got}) than requested", hint="check the CA's policy for this provisioner")


def deploy(cert_plan: CertPlan, issuer: Issuer, pending_dirs: set[Path] | None = None) -> CertResult:
    cert = cert_plan.cert
    action = cert_plan.content_action
    names = tuple(a.action for a in cert_plan.actions)
    try:
        if action is not None:
            _deploy_content(cert, action.action, issuer, pending_dirs)
            return CertResult(cert.name, names, True, content_changed=True)
        by_kind = {a.action: a for a in cert_plan.actions}
        targets = []
        if REWRITE_CHAIN in by_kind:
            targets.append(("cert", _write_target(cert, cert.cert_path), _rewritten_chain(cert, by_kind[REWRITE_CHAIN], issuer), cert.cert_mode))
        if WRITE_CA in by_kind and cert.ca_path is not None:
            targets.append(("ca", _write_target(cert, cert.ca_path), issuer.root_pem(), CA_MODE))
        if targets:
            _write_all(cert, targets, pending_dirs)
        if CHOWN in by_kind or CHMOD in by_kind:
            # owner and mode in one step per file, never through a symlink that appeared
            # since observe (unless the entry allows links), never wider than the final mode
            uid = cert.uid if CHOWN in by_kind else None
            gid = cert.gid if CHOWN in by_kind else None
            files = [(cert.cert_path, cert.cert_mode), (cert.key_path, cert.key_mode)]
            if cert.ca_path is not None:
                files.append((cert.ca_path, CA_MODE))
            for path, mode in files:
                try:
                    set_metadata(path, uid, gid, mode if CHMOD in by_kind else None, follow_symlinks=cert.allow_symlink)
                except OSError as exc:
                    raise DeployError(_os_error(exc, "change the owner or mode of", path)) from None
        return CertResult(cert.name, names, True, content_changed=bool(targets))
    except IssuerError as exc:
        return CertResult(cert.name, names, False, str(exc), transient=exc.transient)
    except DeployError as exc:
        return CertResult(cert.name, names, False, str(exc))
    except OSError as exc:
        return CertResult(cert.name, names, False, _os_error(exc, "read or write", Path(exc.filename or cert.cert_path)))
    except Exception as exc:  # one certificate's bug or bad answer must not stop the others
        log.debug("unexpected failure for %s", cert.name, exc_info=True)
        return CertResult(cert.name, names, False, f"unexpected error: {type(exc).__name__}: {exc}")


def _deploy_content(cert: DesiredCert, action: str, issuer: Issuer, pending_dirs: set[Path] | None = None) -> None:
    from reconciler.crypto import generate_key, key_to_pem
    from reconciler.observe import key_type_of

    current = _current_key(cert) if (cert.key.rotation == "never" or action == RENEW) else None
    reuse = cert.key.rotation == "never" and current is not None and key_type_of(current.public_key()) == cert.key.describe()
    key = current if reuse else generate_key(cert.key)
    request = _request(cert)
    if action == RENEW and current is not None:
        issued = issuer.renew(request, key, cert.cert_path.read_bytes(), current)
    else:
        issued = issuer.issue(request, key)
    _check_issued(cert, key, issued.leaf_pem)
    body = issued.leaf_pem.rstrip(b"\n") + b"\n"
    if cert.include_ca and issued.chain_pem:
        body += issued.chain_pem.rstrip(b"\n") + b"\n"
    # key first, then certificate: a crash in between shows as a key mismatch next pass
    targets = [] if reuse else [("key", _write_target(cert, cert.key_path), key_to_pem(key), cert.key_mode)]
    targets.append(("cert", _write_target(cert, cert.cert_path), body, cert.cert_mode))
    if cert.ca_path is not None and issued.root_pem:
        targets.append(("ca", _write_target(cert, cert.ca_path), issued.root_pem, CA_MODE))
    _write_all(cert, targets, pending_dirs)


def _rewritten_chain(cert: DesiredCert, action, issuer: Issuer) -> bytes:
    """The certificate file's leaf as it is, followed by the chain the plan names (by
    fingerprint), taken from the certificates the issuer knows: no CA is contacted."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    (drift,) = action.drifts
    try:
        leaf = x509.load_pem_x509_certificates(_write_target(cert, cert.cert_path).read_bytes())[0]
    except ValueError:
        raise DeployError(f"cannot rewrite the chain of {cert.cert_path}: it no longer holds a certificate (the next pass re-issues it)") from None
    known = {c.fingerprint(hashes.SHA256()).hex(): c for c in issuer.trust_roots()}
    missing = [fp for fp in drift.desired if fp not in known]
    if missing:
        raise DeployError(f"cannot rewrite the chain of {cert.cert_path}: the issuer no longer knows certificate {missing[0]} of it (the next pass plans again)")
    pem = serialization.Encoding.PEM
    return b"".join(c.public_bytes(pem) for c in [leaf, *(known[fp] for fp in drift.desired)])


def _write_all(cert: DesiredCert, targets: list, pending_dirs: set[Path] | None) -> None:
    uid, gid = cert.uid, cert.gid
    # every file is written out in full before the first replaces its old version: a full
    # disk or a failed write leaves the old key and certificate together, untouched
    staged: list[tuple[str, Path, Path]] = []
    try:
        for kind, path, data, mode in targets:
            try:
                make_parents(path.parent)
                staged.append((kind, stage(path, data, mode, uid, gid), path))
            except OSError as exc:
                raise DeployError(_os_error(exc, "write", path)) from None
    except BaseException:
        for _kind, tmp, _path in staged:
            discard(tmp)
        raise
    for i, (kind, tmp, path) in enumerate(staged):
        try:
            commit(tmp, path, pending_dirs)
        except OSError as exc:
            for _kind, rest, _path in staged[i + 1 :]:
                discard(rest)
            raise DeployError(_os_error(exc, "replace", path)) from None
        fault_point(f"after_{kind}")


def _write_target(cert: DesiredCert, path: Path) -> Path:
    """Where a write to `path` lands. A symlink is replaced, never written through, unless
    the entry says "allow_symlink": true: then its final target is (observe followed it too)."""
    return Path(os.path.realpath(path)) if cert.allow_symlink else path


def apply(
    plan: Plan,
    issuer: Issuer,
    status: StatusStore,
    workers: int = 4,
    progress: bool | None = None,
    before_files: Callable[[], None] | None = None,
    after_files: Callable[[], None] | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    cwd: Path | None = None,
    serials: dict[str, str | None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    refuse_hooks: str | None = None,
    skip_hooks: bool = False,
    secrets: tuple[bytes, ...] = (),
) -> Result:
    """`cancelled()` true (SIGTERM in --watch): certificates not yet started and hooks are
    left for the next pass; a write in progress finishes. `refuse_hooks`: why no command
    may run this pass (an untrusted manifest); each hook is reported failed and stays owed.
    `skip_hooks` (--no-hooks): the files converge, every hook is recorded as owed, not run.

    The status store's records follow the owed-hook rule of reconciler/status.py: each
    deployment is begun (and saved) before its files change, ended after the renames, and
    a hook is cleared only by its own success."""
    result = Result()
    todo = [p for p in plan.certificates if p.actions and not p.error]
    # a killed pass's deployments first: a certificate it replaced owes its hook, whatever
    # this pass does with it (even if this pass replaces it again, or fails to)
    status.settle(serials or {})
    for p in plan.certificates:
        record = status.records.get(p.cert.name)
        if record is not None and not p.cert.post_renewal_command:
            record.nothing_to_run()
    deploying = [p for p in todo if p.content_action]
    for p in deploying:
        status.cert(p.cert.name).begin_deploy((serials or {}).get(p.cert.name))
    # a rewritten chain or CA file keeps the serial, so begin_deploy cannot tell that it
    # changed: the hook is owed before the write (and given back if the write fails)
    rewrites = {
        p.cert.name: status.cert(p.cert.name).begin_rewrite()
        for p in todo
        if p.content_action is None and p.writes_files and p.cert.post_renewal_command
    }
    if before_files:
        before_files()
    for p in plan.errors:
        result.certificates.append(CertResult(p.cert.name, (), False, p.error))
    bar = _Progress(len(deploying), progress)
    outcomes: dict[str, CertResult] = {}
    pending_dirs: set[Path] = set()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        def one(p: CertPlan) -> CertResult | None:
            if cancelled is not None and cancelled():
                return None
            return (deploy(p, issuer, pending_dirs), bar.tick())[0]

        for res in pool.map(one, todo):
            if res is None:
                continue
            outcomes[res.name] = res
            result.certificates.append(res)
    bar.done()
    # every rename of the pass is durable before it is recorded or any hook runs
    fsync_dirs(pending_dirs)
    stamp = now().isoformat()
    for p in todo:
        res = outcomes.get(p.cert.name)
        record = status.cert(p.cert.name)
        if res is None:  # never started: the pass was cancelled
            if p.content_action:
                record.cancel_deploy()
            if p.cert.name in rewrites:
                record.cancel_rewrite(rewrites[p.cert.name])
            continue
        if p.content_action:
            record.end_deploy(res.content_changed, bool(p.cert.post_renewal_command))
        if res.ok:
            record.succeeded(stamp, p.content_action.action if res.content_changed and p.content_action else None)
            log.info("%s: %s (%s)", p.cert.name, ", ".join(res.actions), "; ".join(a.reason for a in p.actions))
        else:
            if p.cert.name in rewrites:
                record.cancel_rewrite(rewrites[p.cert.name])
            record.failed(res.error, stamp)
            log.error("%s: %s failed: %s", p.cert.name, ", ".join(res.actions), res.error)
    for p in plan.errors:
        status.cert(p.cert.name).failed(p.error, stamp, count=False)
        log.error("%s: %s", p.cert.name, p.error)
    # record "deployed, hook owed" before running anything, so a crash cannot forget it
    if after_files:
        after_files()
    fault_point("before_hooks")

    by_name = {p.cert.name: p for p in plan.certificates}
    for hook in plan.hooks:
        ready = [n for n in hook.certificates if outcomes.get(n) is not None and outcomes[n].ok]
        if not ready:
            continue
        if cancelled is not None and cancelled():
            log.warning("stopping: hook %r for %s left for the next start (recorded as owed)", hook.command, ", ".join(ready))
            continue
        if skip_hooks:
            run = HookRun(hook.command, "skipped", None, now().isoformat())
            for n in ready:
                status.cert(n).hook_not_run(run)
            log.warning("hook %r for %s not run (--no-hooks); recorded as owed, the next pass without --no-hooks runs it", hook.command, ", ".join(ready))
            continue
        certs = [by_name[n].cert for n in ready]
        actions = {n: (by_name[n].content_action or by_name[n].actions[0]).action for n in ready}
        timeout = max(c.hook_timeout for c in certs).total_seconds()
        fault_point("before_hook")
        if refuse_hooks:
            outcome = HookOutcome(hook.command, tuple(ready), False, None, False, (), 0.0, refused=refuse_hooks)
        else:
            outcome = run_hook(hook.command, certs, actions, timeout, cwd, secrets=secrets)
        result.hooks.append(outcome)
        run = HookRun(
            hook.command,
            "ok" if outcome.ok else ("timeout" if outcome.timed_out else "refused" if outcome.refused else "failed"),
            outcome.returncode,
            now().isoformat(),
            list(outcome.output_tail),
        )
        for n in ready:
            record = status.cert(n)
            if outcome.ok:
                record.hook_succeeded(run)
            elif outcome.refused:
                record.hook_not_run(run)
            else:
                record.hook_failed(run)
        # recorded at once: a kill during a later hook must not run this one again
        if after_files and outcome.ok:
            after_files()
        if outcome.ok:
            log.info("hook %r for %s succeeded in %.1fs", hook.command, ", ".join(ready), outcome.seconds)
        else:
            log.error(
                "hook %r for %s %s; it will run again on the next pass. Last output: %s",
                hook.command,
                ", ".join(ready),
                outcome.describe(),
                " | ".join(outcome.output_tail[-3:]) or "(none)",
            )
    return result


class _Progress:
    """A one-line progress bar on a TTY when a pass issues many certificates."""

    def __init__(self, total: int, enabled: bool | None):
        self.total = total
        self.count = 0
        self.enabled = (sys.stderr.isatty() if enabled is None else enabled) and total >= 20
        self._lock = threading.Lock()

    def tick(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.count += 1
            if self.count % 10 == 0 or self.count == self.total:
                width = 30
                filled = int(width * min(self.count, self.total) / self.total)
                sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {min(self.count, self.total)}/{self.total} certificates")
                sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
