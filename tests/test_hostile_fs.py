"""A hostile filesystem: symlinks, folders others can write, wrong file types, a full disk,
a manifest another user can write. Every case through the real CLI, as root.

Each refusal exits 1 with an error that names the path and the fix, writes nothing
through the link or into the unsafe folder, and leaves the other certificates alone.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest

from helpers import cert_sans, reconcile, tree_snapshot, write_manifest
from reconciler.atomic import commit, is_temporary, set_metadata, stage
from reconciler.folders import FolderError, Walked, open_folder

NOBODY = pwd.getpwnam("nobody").pw_uid


@pytest.fixture(autouse=True)
def _root():
    if os.geteuid() != 0:
        pytest.fail("the hostile-filesystem tests chown, mknod and mount: run them as root (they never skip)")


@pytest.fixture
def site(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    return tmp_path, tmp_path / "state", out


def entry(out: Path, name: str = "a", **extra) -> dict:
    return {
        "common_name": f"{name}.fs.test",
        "cert_path": str(out / f"{name}.crt"),
        "key_path": str(out / f"{name}.key"),
        **extra,
    }


def no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr


# --------------------------------------------------------------------------- symlinks


@pytest.mark.parametrize("which", ["cert", "key"])
def test_a_symlink_at_cert_or_key_path_is_refused_and_never_written_through(site, which):
    tmp, state, out = site
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "victim"
    victim.write_bytes(b"precious\n")
    os.chmod(victim, 0o644)
    e = entry(out)
    os.symlink(victim, e[f"{which}_path"])
    m = write_manifest(tmp / "m.json", [e, entry(out, "b")])
    before = victim.stat()

    plan = reconcile("-m", str(m), "--plan", state_dir=state)
    assert plan.returncode == 1
    proc = reconcile("-m", str(m), state_dir=state)
    assert proc.returncode == 1
    no_traceback(proc)
    assert f"{which} {e[f'{which}_path']} is a symlink to {victim}; refusing to write through it" in proc.stderr
    assert '"allow_symlink": true' in proc.stderr
    assert victim.read_bytes() == b"precious\n"
    after = victim.stat()
    assert (after.st_mode, after.st_uid, after.st_ino, after.st_mtime_ns) == (
        before.st_mode,
        before.st_uid,
        before.st_ino,
        before.st_mtime_ns,
    )
    assert os.path.islink(e[f"{which}_path"])
    assert (out / "b.crt").exists(), "the other certificate still converged"


def test_allow_symlink_follows_the_link_and_replaces_its_target(site):
    tmp, state, out = site
    real = tmp / "real"
    real.mkdir()
    e = entry(out, owner="nobody:nogroup", allow_symlink=True)
    os.symlink(real / "a.crt", e["cert_path"])
    os.symlink(real / "a.key", e["key_path"])
    m = write_manifest(tmp / "m.json", [e])
    reconcile("-m", str(m), state_dir=state, check=0)
    assert os.path.islink(e["cert_path"]) and os.path.islink(e["key_path"]), "the links are kept"
    assert cert_sans(real / "a.crt") == {"a.fs.test"}
    key = (real / "a.key").stat()
    assert (key.st_uid, stat.S_IMODE(key.st_mode)) == (NOBODY, 0o600)
    reconcile("-m", str(m), "--detailed-exitcode", state_dir=state, check=0)  # converged through the link


def test_set_metadata_and_commit_never_follow_a_link_swapped_in_after_the_check(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    os.chmod(victim, 0o600)
    link = tmp_path / "a.key"
    os.symlink(victim, link)
    with pytest.raises(OSError) as err:
        set_metadata(link, NOBODY, None, 0o644)
    assert err.value.errno == errno.ELOOP
    st = victim.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    commit(stage(link, b"new\n", 0o600), link)
    assert not link.is_symlink() and link.read_bytes() == b"new\n"
    assert victim.read_bytes() == b"precious\n", "the rename replaced the link, it did not write through it"


# --------------------------------------------------------------------------- StrictModes


@pytest.mark.parametrize(
    "mode, owner, expect",
    [
        (0o777, 0, "can be written by group root and every user"),
        (0o775, 0, "can be written by group root"),
        (0o755, "nobody", "can be written by its owner nobody"),
    ],
)
def test_a_folder_others_can_write_is_refused_naming_the_folder_and_the_fix(site, mode, owner, expect):
    tmp, state, out = site
    unsafe = out / "unsafe"
    unsafe.mkdir()
    os.chmod(unsafe, mode)
    if owner == "nobody":
        os.chown(unsafe, NOBODY, -1)
    safe = entry(out, "b")
    m = write_manifest(tmp / "m.json", [entry(unsafe), safe])
    proc = reconcile("-m", str(m), state_dir=state)
    assert proc.returncode == 1
    no_traceback(proc)
    assert f"folder {unsafe} (owner" in proc.stderr and expect in proc.stderr
    assert "refusing to write keys there, as sshd's StrictModes would" in proc.stderr
    fix = f"chmod go-w {unsafe}" if mode & 0o022 else f"chown root {unsafe}"
    assert f"Fix: {fix}" in proc.stderr
    assert os.listdir(unsafe) == []
    assert Path(safe["cert_path"]).exists()
    # the fix works
    os.chown(unsafe, 0, 0)
    os.chmod(unsafe, 0o755)
    reconcile("-m", str(m), state_dir=state, check=0)


def test_a_grandparent_folder_others_can_write_is_refused_too(site):
    tmp, state, out = site
    top = out / "top"
    (top / "deep" / "er").mkdir(parents=True)
    os.chmod(top, 0o757)
    m = write_manifest(tmp / "m.json", [entry(top / "deep" / "er")])
    proc = reconcile("-m", str(m), state_dir=state)
    assert proc.returncode == 1 and f"folder {top} (owner root" in proc.stderr and "every user" in proc.stderr


def test_folders_of_the_owner_and_sticky_folders_are_accepted(site):
    tmp, state, out = site
    owned = out / "owned"
    owned.mkdir()
    os.chown(owned, NOBODY, -1)  # the certificate's owner may own its folder, like a home for sshd
    sticky = out / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # like /tmp: nobody can rename what is not theirs
    m = write_manifest(tmp / "m.json", [entry(owned, owner="nobody"), entry(sticky, "b")])
    reconcile("-m", str(m), state_dir=state, check=0)


# --------------------------------------------------------------------------- wrong file types


@pytest.mark.parametrize("kind", ["directory", "fifo", "device", "socket"])
def test_a_folder_fifo_device_or_socket_at_the_path_is_a_clear_error(site, kind):
    tmp, state, out = site
    e = entry(out)
    target = Path(e["key_path"])
    if kind == "directory":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "device":
        os.mknod(target, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null
    else:
        import socket

        s = socket.socket(socket.AF_UNIX)
        s.bind(str(target))
        s.close()
    m = write_manifest(tmp / "m.json", [e, entry(out, "b")])
    before = os.lstat(target)
    for args in (("--plan",), ()):
        proc = reconcile("-m", str(m), *args, state_dir=state, timeout=30)  # a FIFO must not hang anything
        assert proc.returncode == 1
        no_traceback(proc)
    want = (
        "is a directory; point key_path at a file inside it"
        if kind == "directory"
        else "is a device, FIFO or socket, not a regular file"
    )
    assert f"key {target} {want}" in proc.stderr
    after = os.lstat(target)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert not Path(e["cert_path"]).exists(), "nothing is written for a certificate whose key path is unusable"
    assert Path(out / "b.crt").exists()


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path) -> Path:
    """Fill the filesystem to the last byte: 4 KiB writes, then single bytes."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize(
    "state_on_full_disk, pages_left",
    [(False, 0), (False, 1), (True, 0)],
    ids=["full", "room-for-a-key-not-its-certificate", "state-folder-full"],
)
def test_a_full_disk_keeps_the_old_files_says_so_and_the_next_pass_converges(
    tmp_path, small_fs, state_on_full_disk, pages_left
):
    out = small_fs / "out"
    state = small_fs / "state" if state_on_full_disk else tmp_path / "state"
    runs = tmp_path / "runs"
    hook = f"echo run >> {runs}"
    entries = [entry(out, n, post_renewal_command=hook) for n in ("a", "b", "c")]
    m = write_manifest(tmp_path / "m.json", entries)
    reconcile("-m", str(m), state_dir=state, check=0)
    old = tree_snapshot(out)
    for e in entries:
        e["sans"] = ["new.fs.test"]
    write_manifest(m, entries)
    filler = fill(small_fs)
    if pages_left:  # one 4 KiB page free: a key's temporary fits, its certificate's does not
        os.truncate(filler, filler.stat().st_size - 4096 * pages_left)

    proc = reconcile("-m", str(m), state_dir=state)
    assert proc.returncode == 1
    no_traceback(proc)
    if state_on_full_disk:  # the pass cannot even record its intent: it stops before touching a file
        assert "cannot write the status store" in proc.stderr and "the filesystem is full" in proc.stderr
    else:
        import re

        for n in ("a", "b", "c"):
            line = (
                rf"  {n}\.fs\.test: cannot write {re.escape(str(out / n))}\.(key|crt): No space left on device "
                r"\(the filesystem is full; the old files were left as they were"
            )
            assert re.search(line, proc.stderr), proc.stderr
    assert tree_snapshot(out) == old, "every old key and certificate is intact"
    assert not [n for n in os.listdir(out) if is_temporary(n)]
    assert runs.read_text().count("run") == 1, "no hook ran for a change that was not made"

    filler.unlink()
    reconcile("-m", str(m), state_dir=state, check=0)
    for n in ("a", "b", "c"):
        assert cert_sans(out / f"{n}.crt") == {f"{n}.fs.test", "new.fs.test"}
    assert runs.read_text().count("run") == 2
    reconcile("-m", str(m), "--detailed-exitcode", state_dir=state, check=0)


# --------------------------------------------------------------------------- an untrusted manifest


@pytest.mark.parametrize("how", ["owned by nobody", "world-writable", "folder writable by others"])
def test_hooks_of_a_manifest_another_user_can_write_are_refused(site, how):
    tmp, state, out = site
    marker = tmp / "hook-ran"
    folder = tmp / "manifests"
    folder.mkdir()
    m = write_manifest(folder / "m.json", [entry(out, post_renewal_command=f"touch {marker}")])
    if how == "owned by nobody":
        os.chown(m, NOBODY, -1)
    elif how == "world-writable":
        os.chmod(m, 0o666)
    else:
        os.chmod(folder, 0o777)
    proc = reconcile("-m", str(m), state_dir=state)
    assert proc.returncode == 1
    no_traceback(proc)
    assert "the manifest is not trusted" in proc.stderr
    assert "its post_renewal_commands would run as root; refusing to run them" in proc.stderr
    assert "--allow-untrusted-manifest" in proc.stderr
    named = str(folder) if how.startswith("folder") else str(m)
    assert named in proc.stderr
    assert not marker.exists()
    assert (out / "a.crt").exists(), "the certificates still converge; only the commands are refused"
    status = json.loads(reconcile("status", "-m", str(m), "--output", "json", state_dir=state).stdout)
    assert status["certificates"][0]["last_hook"] == "refused"
    assert status["certificates"][0]["state"] == "hook pending"

    # the documented override, as a flag and as an environment variable
    reconcile("-m", str(m), "--allow-untrusted-manifest", state_dir=state, check=0)
    assert marker.exists()
    marker.unlink()
    (out / "a.crt").unlink()
    reconcile("-m", str(m), state_dir=state, env={"RECONCILER_ALLOW_UNTRUSTED_MANIFEST": "1"}, check=0)
    assert marker.exists()


def test_a_root_owned_manifest_runs_its_hooks_and_the_override_is_in_the_help(site):
    tmp, state, out = site
    marker = tmp / "hook-ran"
    m = write_manifest(tmp / "m.json", [entry(out, post_renewal_command=f"touch {marker}")])
    os.chmod(m, 0o644)
    reconcile("-m", str(m), state_dir=state, check=0)
    assert marker.exists()
    assert "--allow-untrusted-manifest" in reconcile("--help").stdout


# --------------------------------------------------------------------------- folders swapped for links


def wait_for(path: Path, proc, deadline: float = 120.0) -> None:
    import time

    end = time.monotonic() + deadline
    while not path.exists():
        assert proc.poll() is None, f"the pass ended before reaching the pause point:\n{proc.stderr.read()}"
        assert time.monotonic() < end, f"{path} did not appear within {deadline}s"
        time.sleep(0.02)


def as_nobody(*argv: str, cwd: Path) -> None:
    """Run a command as the unprivileged user `nobody`: the attacker owns the folder."""
    subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv], cwd=cwd, check=True)


@pytest.fixture
def shared_site():
    """A site `nobody` can walk into: pytest's own tmp folders are root's alone (0700)."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="reconciler-fs-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        subprocess.run(["chattr", "-R", "-i", str(base)], capture_output=True)
        shutil.rmtree(base)


def owner_site(base: Path, n: int) -> tuple[Path, Path, Path, list[dict]]:
    """srv/www (owned by www-data, here nobody) holding tls/, and a victim service's folder."""
    www = base / "srv" / "www"
    (www / "tls").mkdir(parents=True)
    os.chown(www, NOBODY, -1)
    os.chown(www / "tls", NOBODY, -1)
    victim = base / "victim"
    victim.mkdir()
    (victim / "service.key").write_bytes(b"the victim's own key\n")
    os.chmod(victim / "service.key", 0o600)
    entries = [entry(www / "tls", f"c{i:02d}", owner="nobody") for i in range(n)]
    return www, www / "tls", victim, entries


def test_a_folder_the_owner_swaps_for_a_link_mid_pass_redirects_no_write(shared_site):
    base = shared_site
    www, tls, victim, entries = owner_site(base, 20)
    m = write_manifest(base / "m.json", entries)
    before = tree_snapshot(victim)
    hold = base / "hold"
    hold.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
    env.update(
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),
        NO_COLOR="1",
        RECONCILER_STATE_DIR=str(base / "state"),
        RECONCILER_ISSUER="local",
        RECONCILER_FAULT_HOLD=f"after_cert:{hold}",  # every certificate waits for our go
    )
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "-m", str(m), "--workers", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(hold / "after_cert.1.held", proc)
        (hold / "after_cert.1.go").touch()
        wait_for(hold / "after_cert.2.held", proc)
        (hold / "after_cert.2.go").touch()
        wait_for(hold / "after_cert.3.held", proc)
        # the attack, as the certificate's owner: its folder becomes a link to another service's
        as_nobody("mv", "tls", "tls.old", cwd=www)
        as_nobody("ln", "-s", str(victim), "tls", cwd=www)
        for n in range(3, 21):  # let every later certificate go on (those that get this far)
            (hold / f"after_cert.{n}.go").touch()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    assert tree_snapshot(victim) == before, (
        f"files landed in the victim's folder: {sorted(set(os.listdir(victim)) - {'service.key'})}"
    )
    assert f"{tls} is a symlink to {victim}" in err and "refusing to follow it" in err, err
    assert len(list((www / "tls.old").glob("*.crt"))) == 3, "what was written before the swap stayed where it was"


@pytest.mark.parametrize("allow_symlink", [False, True])
def test_a_link_the_owner_planted_in_its_folder_is_never_followed(shared_site, allow_symlink):
    base = shared_site
    www, tls, victim, entries = owner_site(base, 2)
    os.rmdir(tls)
    as_nobody("ln", "-s", str(victim), "tls", cwd=www)
    for e in entries:
        e["allow_symlink"] = allow_symlink
    m = write_manifest(base / "m.json", entries)
    before = tree_snapshot(victim)
    proc = reconcile("-m", str(m), state_dir=base / "state")
    assert proc.returncode == 1
    no_traceback(proc)
    assert f"{tls} is a symlink to {victim}, and folder {www} (owner nobody" in proc.stderr, proc.stderr
    assert tree_snapshot(victim) == before


def test_links_only_root_can_change_are_still_followed(site):
    tmp, state, out = site
    real = out / "real"
    real.mkdir()
    os.symlink(real, out / "via")  # a root-owned link in a root-owned folder: like /etc/ssl -> ...
    m = write_manifest(tmp / "m.json", [entry(out / "via" / "deeper")])
    reconcile("-m", str(m), state_dir=state, check=0)
    assert (real / "deeper" / "a.crt").exists()


# --------------------------------------------------------------------------- umask and private folders


def test_umask_000_creates_no_folder_others_can_write(tmp_path):
    state = tmp_path / "var" / "lib" / "reconciler"
    out = tmp_path / "etc" / "deep" / "tls"
    m = write_manifest(tmp_path / "m.json", [entry(out), entry(out / "sub", "b")])
    old = os.umask(0)
    try:
        reconcile("-m", str(m), state_dir=state, check=0)
    finally:
        os.umask(old)
    wide = []
    for root in (tmp_path / "var", tmp_path / "etc"):
        for dirpath, dirs, _files in os.walk(root):
            for d in [dirpath, *(os.path.join(dirpath, x) for x in dirs)]:
                if stat.S_IMODE(os.stat(d).st_mode) & 0o022:
                    wide.append(f"{d} {stat.S_IMODE(os.stat(d).st_mode):04o}")
    assert not wide, wide
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "ca").stat().st_mode) == 0o700
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "etc").stat().st_mode) == 0o755


@pytest.mark.parametrize(
    "how",
    [
        "state folder world-writable",
        "state folder owned by nobody",
        "folder above state writable",
        "CA folder owned by nobody",
        "custom CA folder group-writable",
    ],
)
def test_a_state_or_ca_folder_another_user_can_change_is_refused_and_nothing_is_issued(site, how):
    tmp, _state, out = site
    state = tmp / "var" / "state"
    state.mkdir(parents=True)
    e = entry(out, ca_path=str(out / "root.pem"))
    issuer = {"type": "local"}
    if how == "state folder world-writable":
        os.chmod(state, 0o777)
        named = state
    elif how == "state folder owned by nobody":
        os.chown(state, NOBODY, -1)
        named = state
    elif how == "folder above state writable":
        os.chmod(state.parent, 0o777)
        named = state.parent
    elif how == "CA folder owned by nobody":
        (state / "ca").mkdir()
        os.chown(state / "ca", NOBODY, -1)
        named = state / "ca"
    else:
        ca = tmp / "myca"
        ca.mkdir()
        os.chmod(ca, 0o770)
        issuer["dir"] = str(ca)
        named = ca
    m = write_manifest(tmp / "m.json", {"issuer": issuer, "certificates": [e]})
    runs = [("--plan",), ()] + ([("--watch",)] if "CA" not in how else [])  # a watcher refuses at start
    for args in runs:
        proc = reconcile("-m", str(m), *args, state_dir=state, timeout=60)
        assert proc.returncode == 1, proc.stderr
        no_traceback(proc)
        assert "is not safe" in proc.stderr and str(named) in proc.stderr and "Refusing to use it" in proc.stderr, (
            proc.stderr
        )
    assert os.listdir(out) == [], "nothing was issued"


# --------------------------------------------------------------------------- a rename refused half-way


def pair_matches(cert: Path, key: Path) -> bool:
    from cryptography.hazmat.primitives import serialization

    from helpers import load_cert

    k = serialization.load_pem_private_key(key.read_bytes(), None)
    return load_cert(cert).public_key().public_numbers() == k.public_key().public_numbers()


@pytest.mark.parametrize("how", ["immutable certificate", "bind-mounted certificate", "ca_path is a folder"])
def test_a_rename_that_cannot_happen_keeps_the_working_pair_and_stays_reported(site, how):
    tmp, state, out = site
    runs = tmp / "runs"
    e = entry(out, post_renewal_command=f"echo run >> {runs}")
    m = write_manifest(tmp / "m.json", [e])
    reconcile("-m", str(m), state_dir=state, check=0)
    cert, key = Path(e["cert_path"]), Path(e["key_path"])
    e["sans"] = ["new.fs.test"]
    if how == "ca_path is a folder":
        e["ca_path"] = str(out / "ca")
        (out / "ca").mkdir()
    write_manifest(m, [e])
    mounted = None
    if how == "immutable certificate":
        subprocess.run(["chattr", "+i", str(cert)], check=True)
    elif how == "bind-mounted certificate":
        mounted = tmp / "elsewhere.crt"
        mounted.write_bytes(cert.read_bytes())
        subprocess.run(["mount", "--bind", str(mounted), str(cert)], check=True)

    def files():  # a key put back is a new inode with the old bytes, mode and owner
        return {p: (mode, uid, gid, data) for p, (_ino, _mtime, mode, uid, gid, data) in tree_snapshot(out).items()}

    old = files()
    try:
        for attempt in range(2):  # the failure stays visible until it is fixed
            proc = reconcile("-m", str(m), state_dir=state)
            assert proc.returncode == 1, proc.stderr
            no_traceback(proc)
            assert files() == old, f"pass {attempt + 1} changed files"
            assert pair_matches(cert, key), "the service's key and certificate still belong together"
            assert runs.read_text().count("run") == 1
            if how == "immutable certificate":
                assert "immutable" in proc.stderr and "run as root" not in proc.stderr, proc.stderr
            elif how == "bind-mounted certificate":
                assert (
                    f"cannot replace {cert}" in proc.stderr
                    and "mount point" in proc.stderr
                    and "the old key was put back" in proc.stderr
                ), proc.stderr
            else:
                assert f"ca {out / 'ca'} is a directory; point ca_path at a file inside it" in proc.stderr, proc.stderr
            assert not [n for n in os.listdir(out) if is_temporary(n)]
    finally:
        subprocess.run(["chattr", "-i", str(cert)], capture_output=True)
        if mounted is not None:
            subprocess.run(["umount", str(cert)], check=True)
    if how == "ca_path is a folder":
        os.rmdir(out / "ca")
    reconcile("-m", str(m), state_dir=state, check=0)
    assert cert_sans(cert) == {"a.fs.test", "new.fs.test"} and pair_matches(cert, key)
    assert runs.read_text().count("run") == 2


# --------------------------------------------------------------------------- two writers


def test_a_second_state_folder_refuses_files_another_one_manages(site):
    tmp, state, out = site
    runs = tmp / "runs"
    m = write_manifest(tmp / "m.json", [entry(out, post_renewal_command=f"echo run >> {runs}")])
    reconcile("-m", str(m), state_dir=state, check=0)
    old = tree_snapshot(out)
    other = tmp / "other-state"
    for args in (("--plan",), (), ()):
        proc = reconcile("-m", str(m), *args, state_dir=other)
        assert proc.returncode == 1, proc.stderr
        no_traceback(proc)
        assert (
            f"is managed by the reconciler with state folder {state}, and this one uses {other}"
            in proc.stdout + proc.stderr
        ), proc.stderr
    assert tree_snapshot(out) == old
    assert runs.read_text().count("run") == 1
    reconcile("-m", str(m), "--detailed-exitcode", state_dir=state, check=0)  # the first one is undisturbed
    # a mark naming a state folder that is gone is stale: the file is taken over
    import shutil

    shutil.rmtree(state)
    reconcile("-m", str(m), state_dir=other, check=0)
    reconcile("-m", str(m), "--detailed-exitcode", state_dir=other, check=0)


def test_two_entries_naming_one_file_through_a_linked_folder_are_invalid(site):
    tmp, state, out = site
    os.symlink(out, tmp / "alias")
    m = write_manifest(
        tmp / "m.json", [entry(out), entry(tmp / "alias", "b") | {"cert_path": str(tmp / "alias" / "a.crt")}]
    )
    proc = reconcile("validate", "-m", str(m))
    assert proc.returncode == 1
    no_traceback(proc)
    assert (
        f"{tmp / 'alias' / 'a.crt'} is also the cert_path of" in proc.stderr
        and f"the same file as {out / 'a.crt'}" in proc.stderr
    ), proc.stderr


def test_a_walk_continues_from_the_folders_walked_before_but_never_from_one_that_failed(tmp_path, monkeypatch):
    """One deployment's files share most of the way from /: the second walk opens only what
    lies below the part they share. A folder that failed its check is not kept for later."""
    os.chmod(tmp_path, 0o755)
    (tmp_path / "site" / "keys").mkdir(parents=True)
    (tmp_path / "site" / "certs").mkdir()
    (tmp_path / "open" / "x").mkdir(parents=True)
    os.chmod(tmp_path / "open", 0o777)  # writable by every user, not sticky: refused
    opened: list = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    walked = Walked()
    try:
        open_folder(tmp_path / "site" / "keys", set(), walked=walked).close()
        before = len(opened)
        with open_folder(tmp_path / "site" / "certs", set(), walked=walked) as certs:
            assert certs.path == tmp_path / "site" / "certs"
        assert opened[before:] == ["certs"]
        for _ in range(2):
            with pytest.raises(FolderError, match="can be written by group root and every user"):
                open_folder(tmp_path / "open" / "x", set(), walked=walked)
        assert opened.count("open") == 2, "the refused folder was opened again, not kept"
    finally:
        walked.close()
