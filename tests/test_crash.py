"""Crash consistency: a pass that changes 50 certificates, SIGKILLed at 260+ points.

Each run changes all 50 certificates (new SANs: key + certificate + 5 CA files + 5 hooks;
or new owner and mode: chown/chmod of 100 files), kills the pass at one point, checks what
the kill left on disk, then runs the next pass and checks that it converged. The points are
the fault points of reconciler/faults.py, each at its N-th hit (`after_key@17` = after the
17th key was renamed into place), plus kills at random moments.

After every kill: every certificate, key and CA file is the complete old or the complete
new version (never torn, never a new certificate beside an old key); a file that changed
has exactly its final owner and mode; no key, nor a temporary copy of one, is readable by
anyone its final mode does not allow; the status store parses. The next pass exits 0,
leaves no temporary file, plans nothing more, and every hook of the change has run.

For speed the passes run in forked children of two worker processes (no interpreter
start-up per pass) on a tmpfs; the CLI entry point is the same `reconciler.cli.main`.
"""

from __future__ import annotations

import grp
import json
import multiprocessing
import os
import pwd
import random
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from helpers import figure, run_cli_forked

from reconciler.atomic import is_temporary

N_CERTS = 50
HOOK_COMMANDS = 5
NOBODY = pwd.getpwnam("nobody").pw_uid
NOGROUP = grp.getgrnam("nogroup").gr_gid
WWW = grp.getgrnam("www-data").gr_gid
# (owner, cert mode, key mode) -> (uid, gid)
META = [("nobody:nogroup", 0o644, 0o600, NOBODY, NOGROUP), ("root:www-data", 0o640, 0o640, 0, WWW)]

# (point, N values, kind) — kind "content": the run re-issues all 50; "meta": chown/chmod all 50
CONTENT_POINTS = [
    ("after_key", list(range(1, 51, 2))[:25] + [2, 10, 24, 48, 50], "content"),  # 30
    ("after_cert", list(range(2, 51, 2))[:25] + [1, 13, 27, 45, 49], "content"),  # 30
    ("after_ca", [1, 2, 3, 4, 5], "content"),  # 5
    ("tmp_created", list(range(1, 101, 5)), "content"),  # 20
    ("tmp_partial", list(range(1, 101, 10)) + list(range(3, 101, 5))[:20], "content"),  # 30
    ("before_rename", list(range(2, 101, 4)), "content"),  # 25
    ("before_status", [1, 2, 3, 1, 2, 3], "content"),  # 6
    ("after_status", [1, 2, 3, 1, 2, 3], "content"),  # 6
    ("before_hooks", [1, 1, 1], "content"),  # 3
    ("before_hook", [1, 2, 3, 4, 5, 1, 2, 3, 4, 5], "content"),  # 10
    ("hook_started", [1, 2, 3, 4, 5, 1, 2, 3, 4, 5], "content"),  # 10
    ("after_chown", list(range(1, 101, 5)), "meta"),  # 20
    ("after_chmod", list(range(3, 101, 5)), "meta"),  # 20
]
RANDOM_CONTENT, RANDOM_META = 40, 10
WORKERS = 2


@pytest.fixture(autouse=True)
def _root():
    if os.geteuid() != 0:
        pytest.fail("the crash tests chown to real users and mount a tmpfs: run them as root (they never skip)")


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=0755", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# --------------------------------------------------------------------------- one site


class Site:
    def __init__(self, base: Path):
        self.base = base
        self.out = base / "out"
        self.state = base / "state"
        self.hooks = base / "hooks"
        self.manifest = base / "m.json"
        self.hooks.mkdir(parents=True)
        self.version = 0
        self.meta = 0
        self.log = base / "log"
        self.log.mkdir()

    def cert_path(self, i: int) -> Path:
        return self.out / f"d{i % 5}" / f"c{i}.crt"

    def key_path(self, i: int) -> Path:
        return self.out / f"d{i % 5}" / f"c{i}.key"

    def ca_path(self, i: int) -> Path | None:
        return self.out / f"d{i % 5}" / f"root{i}.crt" if i % 10 == 0 else None

    def sans(self, i: int, version: int) -> set[str]:
        return {f"c{i}.crash.test", f"v{version}.c{i}.crash.test"}

    def write_manifest(self) -> None:
        owner, cert_mode, key_mode, _, _ = META[self.meta]
        entries = []
        for i in range(N_CERTS):
            e = {
                "common_name": f"c{i}.crash.test",
                "sans": [f"v{self.version}.c{i}.crash.test"],
                "cert_path": str(self.cert_path(i)),
                "key_path": str(self.key_path(i)),
                "owner": owner,
                "cert_permissions": f"{cert_mode:o}",
                "key_permissions": f"{key_mode:o}",
                # 5 distinct commands, each shared by 10 certificates: one run per command per pass
                "post_renewal_command": f"echo run >> {self.hooks / f'h{i % HOOK_COMMANDS}'}",
            }
            if self.ca_path(i):
                e["ca_path"] = str(self.ca_path(i))
            entries.append(e)
        tmp = self.manifest.with_suffix(".new")
        tmp.write_text(json.dumps({"issuer": {"type": "local"}, "certificates": entries}))
        os.rename(tmp, self.manifest)

    def managed(self) -> list[tuple[str, int, Path]]:
        out = []
        for i in range(N_CERTS):
            out += [("cert", i, self.cert_path(i)), ("key", i, self.key_path(i))]
            if self.ca_path(i):
                out.append(("ca", i, self.ca_path(i)))
        return out

    def final_meta(self, kind: str) -> tuple[int, int, int]:
        _, cert_mode, key_mode, uid, gid = META[self.meta]
        return (uid, gid, {"cert": cert_mode, "key": key_mode, "ca": 0o644}[kind])

    def snapshot(self) -> dict[Path, tuple[bytes, int, int, int]]:
        snap = {}
        for _kind, _i, p in self.managed():
            try:
                st = os.lstat(p)
                snap[p] = (p.read_bytes(), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
            except FileNotFoundError:
                pass
        return snap

    def hook_lines(self) -> list[int]:
        out = []
        for h in range(HOOK_COMMANDS):
            f = self.hooks / f"h{h}"
            out.append(len(f.read_text().splitlines()) if f.exists() else 0)
        return out


# --------------------------------------------------------------------------- the checks


def _within(st: os.stat_result, uid: int, gid: int, mode: int) -> bool:
    """Nobody can read this file who could not read it with (uid, gid, mode)."""
    m = stat.S_IMODE(st.st_mode)
    if m & ~mode & 0o777:
        return False
    if m & 0o070 and st.st_gid != gid:
        return False
    if m & 0o700 and st.st_uid not in (uid, 0):
        return False
    return True


def check_after_kill(site: Site, kind: str, old: dict, problems: list[str], figures: dict) -> None:
    keys_by_i: dict[int, tuple[bytes, bool]] = {}
    certs_by_i: dict[int, tuple[bytes, bool]] = {}
    for what, i, p in site.managed():
        seen = _check_file_after_kill(site, kind, old, problems, figures, what, i, p)
        if seen is not None:
            (keys_by_i if what == "key" else certs_by_i if what == "cert" else {})[i] = seen
    _check_new_pairs(keys_by_i, certs_by_i, problems)
    _check_temporaries_and_status(site, problems, figures)


def _check_file_after_kill(
    site: Site, kind: str, old: dict, problems: list[str], figures: dict, what: str, i: int, p: Path
) -> tuple[bytes, bool] | None:
    """One managed file: the old version whole, or a complete new one. (content, is_old), or None if unusable."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        st = os.lstat(p)
        data = p.read_bytes()
    except FileNotFoundError:
        if p in old:
            problems.append(f"{p} vanished")
        return None
    if not stat.S_ISREG(st.st_mode):
        problems.append(f"{p} is not a regular file")
        return None
    final = site.final_meta(what)
    meta = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    is_old = p in old and old[p][0] == data
    if not is_old:
        if kind == "meta":
            problems.append(f"{p}: content changed in a chown/chmod pass")
            return None
        # complete new version: it parses in full, and was renamed in with its final metadata
        try:
            if what == "key":
                serialization.load_pem_private_key(data, None)
            else:
                certs = x509.load_pem_x509_certificates(data)
                if what == "cert":
                    ext = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                    if set(ext.get_values_for_type(x509.DNSName)) != site.sans(i, site.version):
                        problems.append(f"{p}: neither the old certificate nor one for the new SANs")
        except Exception as exc:
            problems.append(f"{p}: torn or garbage ({exc})")
            return None
        if meta != final:
            problems.append(f"{p}: new content with owner/mode {meta}, want {final}")
        figures["new_files"] += 1
    else:
        figures["old_files"] += 1
        if kind == "meta" and meta != old[p][1:] and what == "key" and not _within(st, *final):
            problems.append(f"{p}: metadata {meta} in between old {old[p][1:]} and final {final} exposes the key")
    return data, is_old


def _check_new_pairs(
    keys_by_i: dict[int, tuple[bytes, bool]], certs_by_i: dict[int, tuple[bytes, bool]], problems: list[str]
) -> None:
    """Key first, certificate second: a new certificate always sits beside its own new key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    for i, (cert_data, cert_old) in certs_by_i.items():
        if cert_old:
            continue
        key_data, key_old = keys_by_i.get(i, (b"", True))
        if key_old:
            problems.append(f"certificate {i} is new but its key is old")
            continue
        cert = x509.load_pem_x509_certificates(cert_data)[0]
        key = serialization.load_pem_private_key(key_data, None)
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            problems.append(f"certificate {i} is new but does not match the key beside it")


def _check_temporaries_and_status(site: Site, problems: list[str], figures: dict) -> None:
    # temporaries: never readable beyond the final mode of what they will become
    for folder in {p.parent for _w, _i, p in site.managed()}:
        for name in os.listdir(folder):
            if is_temporary(name):
                figures["temporaries_seen"] += 1
                st = os.lstat(folder / name)
                what = "key" if ".key" in name else "ca" if name.startswith(".root") else "cert"
                if not _within(st, *site.final_meta(what)):
                    problems.append(
                        f"temporary {folder / name} mode {stat.S_IMODE(st.st_mode):04o} uid {st.st_uid} "
                        f"gid {st.st_gid} is wider than its final mode"
                    )
    for name in os.listdir(site.state) if site.state.exists() else ():
        if is_temporary(name):
            figures["temporaries_seen"] += 1
    status = site.state / "status.json"
    if status.exists():
        try:
            data = json.loads(status.read_bytes())
            assert data["version"] == 1 and isinstance(data["certificates"], dict)
        except Exception as exc:
            problems.append(f"status store unreadable after the kill: {exc}")


def check_converged(
    site: Site, kind: str, hooks_before: list[int], problems: list[str], figures: dict, point: str
) -> None:
    from reconciler.desired import load_desired
    from reconciler.passes import Settings, snapshot
    from reconciler.status import StatusStore

    for folder in {p.parent for _w, _i, p in site.managed()} | {site.state, site.state / "cache"}:
        left = [n for n in os.listdir(folder) if is_temporary(n)] if folder.exists() else []
        if left:
            problems.append(f"temporary files left after the next pass in {folder}: {left}")
    settings = Settings(manifest=site.manifest, state_dir=site.state)
    desired = load_desired(settings)
    status = StatusStore(site.state)
    if status.warning:
        problems.append(status.warning)
    snap = snapshot(settings, desired, status)
    for p in snap.plan.certificates:
        if p.actions or p.error:
            problems.append(f"not converged: {p.cert.name}: {[a.action for a in p.actions]} {p.error or ''}")
    for what, _i, p in site.managed():
        st = os.lstat(p)
        if what == "ca":
            continue  # a CA file is public and written with its certificate; its owner is not managed
        if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) != site.final_meta(what):
            problems.append(f"{p}: owner/mode not final after the next pass")
    if status.hooks_pending({n: (o.cert.serial if o.cert else None) for n, o in snap.observed.items()}):
        problems.append("hooks still pending after the next pass")
    if kind == "content":
        after = site.hook_lines()
        for h, (a, b) in enumerate(zip(hooks_before, after, strict=True)):
            if b <= a:
                problems.append(f"hook {h} never ran for the change")
            figures["hook_runs"] += b - a
            if b - a > 1:  # killed after it started, before its result was recorded: at least once
                figures["hooks_run_twice"] += 1
                figures[f"hooks_run_twice_at_{point}"] = figures.get(f"hooks_run_twice_at_{point}", 0) + 1


# --------------------------------------------------------------------------- a campaign


def campaign(args) -> dict:
    """Runs in a worker process: `runs` on a site of its own. Returns figures and problems."""
    base, runs, seed = args
    rng = random.Random(seed)
    site = Site(Path(base))
    figures = {
        k: 0
        for k in (
            "runs",
            "killed",
            "finished_before_kill",
            "new_files",
            "old_files",
            "temporaries_seen",
            "hook_runs",
            "hooks_run_twice",
            "recovery_removed_temporaries",
        )
    }
    per_point: dict[str, int] = {}
    problems: list[str] = []
    argv = ["-m", str(site.manifest), "--state-dir", str(site.state)]
    site.write_manifest()
    rc, out, err = run_cli_forked(site.log, argv)  # creates the embedded CA and the first 50
    site.version += 1
    site.write_manifest()
    t0 = time.monotonic()
    rc2, out, err2 = run_cli_forked(site.log, argv)  # a warm re-issue of all 50: how long random kills may wait
    full_pass = time.monotonic() - t0
    if rc or rc2:
        return {
            "figures": figures,
            "per_point": per_point,
            "problems": [f"first passes exit {rc}/{rc2}: {err[-2000:]}{err2[-2000:]}"],
        }
    for point, kind in runs:
        if kind == "content":
            site.version += 1
        else:
            site.meta ^= 1
        site.write_manifest()
        old = site.snapshot()
        hooks_before = site.hook_lines()
        here: list[str] = []
        if point.startswith("random"):
            rc, out, err = run_cli_forked(site.log, argv, kill_after=rng.uniform(0.0, full_pass))
        else:
            rc, out, err = run_cli_forked(site.log, argv, fault=point)
            if rc != -signal.SIGKILL:
                here.append(f"{point}: the pass was not killed (exit {rc}); the point was never reached: {err[-500:]}")
        figures["runs"] += 1
        per_point[point.split("@")[0]] = per_point.get(point.split("@")[0], 0) + 1
        if rc == -signal.SIGKILL:
            figures["killed"] += 1
        elif point.startswith("random"):
            figures["finished_before_kill"] += 1
        if "Traceback" in err:
            here.append(f"{point}: traceback in the killed pass: {err[-1500:]}")
        check_after_kill(site, kind, old, here, figures)
        rc, out, err = run_cli_forked(site.log, argv)
        if rc != 0:
            here.append(f"{point}: the next pass exited {rc}: {err[-1500:]}")
        figures["recovery_removed_temporaries"] += err.count("a temporary file left by an interrupted pass")
        check_converged(site, kind, hooks_before, here, figures, point.split("@")[0])
        problems += [f"[{point} {kind}] {p}" for p in here]
    figures["full_pass_seconds"] = round(full_pass, 3)
    return {"figures": figures, "per_point": per_point, "problems": problems}


def all_runs() -> list[tuple[str, str]]:
    runs = [(f"{point}@{n}", kind) for point, ns, kind in CONTENT_POINTS for n in ns]
    runs += [("random", "content")] * RANDOM_CONTENT + [("random", "meta")] * RANDOM_META
    return runs


def test_sigkill_at_260_points_of_a_50_certificate_pass_loses_nothing(tmpfs):
    runs = all_runs()
    assert len(runs) >= 200
    random.Random(6).shuffle(runs)
    shares = [(str(tmpfs / f"site{w}"), runs[w::WORKERS], 1000 + w) for w in range(WORKERS)]
    started = time.monotonic()
    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        results = pool.map(campaign, shares)
    elapsed = time.monotonic() - started
    figures: dict[str, float] = {}
    per_point: dict[str, int] = {}
    problems: list[str] = []
    for r in results:
        for k, v in r["figures"].items():
            figures[k] = figures.get(k, 0) + v
        for k, v in r["per_point"].items():
            per_point[k] = per_point.get(k, 0) + v
        problems += r["problems"]
    figure(f"crash runs: {figures.get('runs')} in {elapsed:.1f}s; per point: {json.dumps(per_point, sort_keys=True)}")
    figure(f"crash figures: {json.dumps(figures, sort_keys=True)}; problems: {len(problems)}")
    assert not problems, "\n".join(problems[:40])
    assert figures["runs"] == len(runs)
    assert figures["killed"] >= 200
    assert figures["new_files"] > 0 and figures["old_files"] > 0 and figures["temporaries_seen"] > 0
