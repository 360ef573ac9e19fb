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

from reconciler.atomic import commit, discard, fsync_dirs, set_metadata, stage, sweep_temporaries
from reconciler.diff import CHMOD, CHOWN, RENEW, REWRITE_CHAIN, WRITE_CA
from reconciler.folders import Folder, FolderError, resolve_file
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

    if isinstance(exc, FolderError):
        return str(exc)
    hints = {
        errno.ENOSPC: "the filesystem is full; the old files were left as they were. Free space and run again",
        errno.EDQUOT: "a disk quota is exhausted; the old files were left as they were",
        errno.EACCES: "permission denied; run as root or give the reconciler write access to the folder",
        errno.EPERM: "operation not permitted; run as root (chown needs it)",
        errno.EROFS: "the filesystem is read-only",
        errno.ELOOP: "it is a symlink now; refusing to follow it",
        errno.EBUSY: "it is a mount point (a bind mount?); unmount it, or point the manifest at the mounted file's own path",
        errno.EISDIR: "it is a directory; point the manifest at a file inside it",
    }
    if os.geteuid() == 0:  # root already: "run as root" would send the operator the wrong way
        hints[errno.EPERM] = hints[errno.EACCES] = (
            "not permitted even as root: the file or its folder may have the immutable or append-only attribute "
            f"(lsattr -d {path} {path.parent}; chattr -i -a ...), or sit on a read-only or bind mount (findmnt {path})"
        )
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


def deploy(cert_plan: CertPlan, issuer: Issuer, pending_dirs: set[Path] | None = None, manager: str | None = None) -> CertResult:
    """`manager`: our state folder's identity (reconciler.managed), marked on every file
    written; a file marked by another state folder is refused."""
    cert = cert_plan.cert
    action = cert_plan.content_action
    names = tuple(a.action for a in cert_plan.actions)
    try:
        if action is not None:
            _deploy_content(cert, action.action, issuer, pending_dirs, manager)
            return CertResult(cert.name, names, True, content_changed=True)
        by_kind = {a.action: a for a in cert_plan.actions}
        targets = []
        if REWRITE_CHAIN in by_kind:
            targets.append(("cert", cert.cert_path, _rewritten_chain(cert, by_kind[REWRITE_CHAIN], issuer), cert.cert_mode))
        if WRITE_CA in by_kind and cert.ca_path is not None:
            targets.append(("ca", cert.ca_path, issuer.root_pem(), CA_MODE))
        if targets:
            _write_all(cert, targets, pending_dirs, manager)
        if CHOWN in by_kind or CHMOD in by_kind:
            # owner and mode in one step per file, through its folder opened without
            # following a planted link, never through a symlink that appeared since observe
            # (unless the entry allows links), never wider than the final mode
            uid = cert.uid if CHOWN in by_kind else None
            gid = cert.gid if CHOWN in by_kind else None
            files = [("cert", cert.cert_path, cert.cert_mode), ("key", cert.key_path, cert.key_mode)]
            if cert.ca_path is not None:
                files.append(("ca", cert.ca_path, CA_MODE))
            for label, path, mode in files:
                try:
                    folder, name = _open_target(cert, label, path)
                    with folder:
                        if label != "ca":
                            _refuse_foreign(folder, name, label, path, manager)
                        set_metadata(Path(name), uid, gid, mode if CHMOD in by_kind else None, folder=folder)
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


def _open_target(cert: DesiredCert, label: str, path: Path, create: bool = False) -> tuple[Folder, str]:
    """The folder a write to `path` lands in, opened from / without following a link
    that anyone but root could have planted (reconciler.folders), and the file's name there.
    A symlink at `path` itself is replaced, never written through, unless the entry says
    "allow_symlink": true: then its final target is (observe followed it too)."""
    return resolve_file(path, {cert.uid} if cert.uid is not None else set(), cert.allow_symlink, 0o755 if create else None, label)


def _refuse_foreign(folder: Folder, name: str, label: str, path: Path, manager: str | None) -> None:
    if manager is None:
        return
    from reconciler.managed import foreign, refusal

    other = foreign(folder.path / name, manager)
    if other:
        raise DeployError(refusal(label, path, other, manager))


def _preflight(folder: Folder, name: str, label: str, path: Path, manager: str | None) -> None:
    """Refuse, before the CA is asked and before anything is replaced, a target that a
    rename could not replace: a folder, an immutable or append-only file, a file another
    state folder manages."""
    import errno
    import stat as stat_

    try:
        st = os.stat(name, dir_fd=folder.fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat_.S_ISDIR(st.st_mode):
        raise DeployError(f"{label} {path} is a directory; point {label}_path at a file inside it")
    if label != "ca":  # one CA root file may serve several reconcilers
        _refuse_foreign(folder, name, label, path, manager)
    if stat_.S_ISREG(st.st_mode) and _immutable(folder, name):
        raise DeployError(_os_error(OSError(errno.EPERM, "the file has the immutable or append-only attribute"), "replace", path))


def _immutable(folder: Folder, name: str) -> bool:
    import fcntl

    FS_IOC_GETFLAGS, IMMUTABLE, APPEND = 0x80086601, 0x10, 0x20
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder.fd)
    except OSError:
        return False
    try:
        flags = int.from_bytes(fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))[:4], sys.byteorder)
    except OSError:
        return False  # a filesystem without these attributes
    finally:
        os.close(fd)
    return bool(flags & (IMMUTABLE | APPEND))


def _read(folder: Folder, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder.fd)
    with os.fdopen(fd, "rb") as fh:
        return fh.read(1024 * 1024)


def _read_key(folder: Folder, name: str):
    from reconciler.crypto import load_key

    try:
        return load_key(_read(folder, name))
    except (OSError, ValueError, TypeError):
        return None


def _open_existing(cert: DesiredCert, targets, manager: str | None) -> dict[str, tuple[Folder, str] | None]:
    """Each target's folder if it exists (None: created once there is something to write,
    so a refused issuance creates nothing), each existing target checked by _preflight."""
    import errno

    folders: dict[str, tuple[Folder, str] | None] = {}
    try:
        for label, path in targets:
            try:
                folders[label] = _open_target(cert, label, path)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    folders[label] = None
                    continue
                raise DeployError(_os_error(exc, "write", path)) from None
            _preflight(*folders[label], label, path, manager)
    except BaseException:
        _close(folders)
        raise
    return folders


def _close(folders: dict) -> None:
    for opened in folders.values():
        if opened is not None:
            opened[0].close()


def _deploy_content(cert: DesiredCert, action: str, issuer: Issuer, pending_dirs: set[Path] | None = None, manager: str | None = None) -> None:
    from reconciler.crypto import generate_key, key_to_pem
    from reconciler.observe import key_type_of

    paths = [("key", cert.key_path), ("cert", cert.cert_path)] + ([("ca", cert.ca_path)] if cert.ca_path is not None else [])
    # every target is checked before the CA is asked: a folder, an immutable file or
    # another state folder's file fails here, with nothing issued and nothing replaced
    folders = _open_existing(cert, paths, manager)
    try:
        wants_current = folders["key"] is not None and (cert.key.rotation == "never" or action == RENEW)
        current = _read_key(*folders["key"]) if wants_current else None
        reuse = cert.key.rotation == "never" and current is not None and key_type_of(current.public_key()) == cert.key.describe()
        key = current if reuse else generate_key(cert.key)
        request = _request(cert)
        if action == RENEW and current is not None and folders["cert"] is not None:
            issued = issuer.renew(request, key, _read(*folders["cert"]), current)
        else:
            issued = issuer.issue(request, key)
        _check_issued(cert, key, issued.leaf_pem)
        body = issued.leaf_pem.rstrip(b"\n") + b"\n"
        if cert.include_ca and issued.chain_pem:
            body += issued.chain_pem.rstrip(b"\n") + b"\n"
        # key first, then certificate: a crash in between shows as a key mismatch next pass
        targets = [] if reuse else [("key", cert.key_path, key_to_pem(key), cert.key_mode)]
        targets.append(("cert", cert.cert_path, body, cert.cert_mode))
        if cert.ca_path is not None and issued.root_pem:
            targets.append(("ca", cert.ca_path, issued.root_pem, CA_MODE))
        _write_all(cert, targets, pending_dirs, manager, folders)
    finally:
        _close(folders)


def _rewritten_chain(cert: DesiredCert, action, issuer: Issuer) -> bytes:
    """The certificate file's leaf as it is, followed by the chain the plan names (by
    fingerprint), taken from the certificates the issuer knows: no CA is contacted."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    (drift,) = action.drifts
    try:
        folder, name = _open_target(cert, "cert", cert.cert_path)
        with folder:
            leaf = x509.load_pem_x509_certificates(_read(folder, name))[0]
    except ValueError:
        raise DeployError(f"cannot rewrite the chain of {cert.cert_path}: it no longer holds a certificate (the next pass re-issues it)") from None
    except OSError as exc:
        raise DeployError(_os_error(exc, "read", cert.cert_path)) from None
    known = {c.fingerprint(hashes.SHA256()).hex(): c for c in issuer.trust_roots()}
    missing = [fp for fp in drift.desired if fp not in known]
    if missing:
        raise DeployError(f"cannot rewrite the chain of {cert.cert_path}: the issuer no longer knows certificate {missing[0]} of it (the next pass plans again)")
    pem = serialization.Encoding.PEM
    return b"".join(c.public_bytes(pem) for c in [leaf, *(known[fp] for fp in drift.desired)])


def _write_all(cert: DesiredCert, targets: list, pending_dirs: set[Path] | None, manager: str | None = None, folders: dict | None = None) -> None:
    """Replace `targets` ((kind, path, data, mode)) all or nothing. `folders`: as
    _open_existing returned them (the caller closes them); None: opened and checked here."""
    if folders is None:
        folders = _open_existing(cert, [(kind, path) for kind, path, _data, _mode in targets], manager)
        try:
            return _write_all(cert, targets, pending_dirs, manager, folders)
        finally:
            _close(folders)
    from reconciler.managed import XATTR, sidecar_name, xattr_supported

    paths = {kind: path for kind, path, _data, _mode in targets}
    for kind, path, _data, _mode in targets:
        if folders.get(kind) is None:
            try:
                folders[kind] = _open_target(cert, kind, path, create=True)
            except OSError as exc:
                raise DeployError(_os_error(exc, "write", path)) from None
    uid, gid = cert.uid, cert.gid
    marks = {XATTR: manager.encode()} if manager else None  # key and certificate; a CA root may be shared
    # every file is written out in full before the first replaces its old version: a full
    # disk or a failed write leaves the old key and certificate together, untouched
    staged: list[tuple[str, Path]] = []
    backups: dict[str, tuple[bytes, int, int, int] | None] = {}
    try:
        for kind, path, data, mode in targets:
            folder, name = folders[kind]
            try:
                staged.append((kind, stage(Path(name), data, mode, uid, gid, folder, marks if kind != "ca" else None)))
                backups[kind] = _keep_old(folder, name)
            except OSError as exc:
                raise DeployError(_os_error(exc, "write", path)) from None
        done: list[str] = []
        for kind, tmp in staged:
            folder, name = folders[kind]
            try:
                commit(tmp, Path(name), pending_dirs, folder)
            except OSError as exc:
                # a rename refused after an earlier one succeeded (a bind-mounted file):
                # put the old files back, so the service keeps a matching pair
                restored = _restore(done, folders, backups)
                raise DeployError(
                    _os_error(exc, "replace", paths[kind])
                    + (f"; the old {' and '.join(done)} {'were' if len(done) > 1 else 'was'} put back" if done and restored else "")
                    + (f"; putting back the old {' and '.join(done)} failed too" if done and not restored else "")
                ) from None
            done.append(kind)
            fault_point(f"after_{kind}")
        marked = [k for k, _tmp in staged if k != "ca"]
        if manager and marked and not xattr_supported(folders[marked[0]][0].fd):
            for kind in marked:  # the mark where the filesystem keeps no extended attributes
                folder, name = folders[kind]
                side = Path(sidecar_name(name))
                commit(stage(side, manager.encode() + b"\n", 0o644, None, None, folder), side, pending_dirs, folder)
    finally:
        for kind, tmp in staged:
            discard(tmp, folders[kind][0])  # no-op once renamed


def _keep_old(folder: Folder, name: str) -> tuple[bytes, int, int, int] | None:
    """The old file's bytes, mode and owner, so a later failed rename can put it back
    atomically (None: there was none; a failure removes the new file instead). Kept in
    memory, not as a second name on disk: a kill must not leave an old key lying around."""
    import stat as stat_

    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder.fd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        return fh.read(), stat_.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def _restore(done: list[str], folders, backups) -> bool:
    ok = True
    for kind in reversed(done):
        folder, name = folders[kind]
        try:
            old = backups.get(kind)
            if old is not None:
                data, mode, uid, gid = old
                commit(stage(Path(name), data, mode, uid, gid, folder), Path(name), None, folder)
            else:
                os.unlink(name, dir_fd=folder.fd)
        except OSError:
            ok = False
    return ok


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
    manager: str | None = None,
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
            return (deploy(p, issuer, pending_dirs, manager), bar.tick())[0]

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
