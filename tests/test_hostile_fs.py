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
    return {"common_name": f"{name}.fs.test", "cert_path": str(out / f"{name}.crt"), "key_path": str(out / f"{name}.key"), **extra}


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
    assert (after.st_mode, after.st_uid, after.st_ino, after.st_mtime_ns) == (before.st_mode, before.st_uid, before.st_ino, before.st_mtime_ns)
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
    want = "is a directory; point key_path at a file inside it" if kind == "directory" else "is a device, FIFO or socket, not a regular file"
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
def test_a_full_disk_keeps_the_old_files_says_so_and_the_next_pass_converges(tmp_path, small_fs, state_on_full_disk, pages_left):
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
            line = rf"  {n}\.fs\.test: cannot write {re.escape(str(out / n))}\.(key|crt): No space left on device \(the filesystem is full; the old files were left as they were"
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
