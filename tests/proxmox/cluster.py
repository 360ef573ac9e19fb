"""A simulated Proxmox cluster for the tests: the stand-in `pct`, `qm` and `pvesh` (standin.py)
over guests that are chroots of Debian's busybox-static, where `mv`, `chown` and `chmod`
really run. See standin.py for the folder layout and the contracts followed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = HERE / "bin"
BUSYBOX = Path("/bin/busybox")
# the users a typical web guest has; www-data's group is the one key files are shared with
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "www-data:x:33:33:www-data:/var/www:/bin/sh\n"
    "nginx:x:101:101:nginx:/var/lib/nginx:/bin/sh\n"
)
GROUP = "root:x:0:\nwww-data:x:33:\nnginx:x:101:\nssl-cert:x:110:www-data\n"


def _busybox_is_static() -> bool:
    out = (
        subprocess.run(["file", "-L", str(BUSYBOX)], capture_output=True, text=True).stdout
        if shutil.which("file")
        else ""
    )
    return "statically linked" in out or not out


class Cluster:
    """`root` is $PVE_STANDIN; `node` the node commands run on unless a call names another."""

    def __init__(self, root: Path, node: str = "pve1"):
        if not BUSYBOX.exists():
            raise RuntimeError(
                "the Proxmox stand-ins need Debian's busybox-static (/bin/busybox): run scripts/install --test"
            )
        self.root = root
        self.node = node
        (root / "pve" / "nodes" / node).mkdir(parents=True, exist_ok=True)
        self._template = root / "template"
        if not self._template.exists():
            self._build_template()

    def env(self, node: str | None = None) -> dict[str, str]:
        """What a process that runs these commands needs: the stand-ins first in PATH."""
        return {
            "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "PVE_STANDIN": str(self.root),
            "PVE_STANDIN_NODE": node or self.node,
        }

    def _build_template(self) -> None:
        rootfs = self._template
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
        for folder in ("etc", "tmp", "root", "run", "etc/ssl/certs", "etc/nginx/ssl", "var/www"):
            (rootfs / folder).mkdir(parents=True, exist_ok=True)
        os.chmod(rootfs / "tmp", 0o1777)
        (rootfs / "etc" / "passwd").write_text(PASSWD)
        (rootfs / "etc" / "group").write_text(GROUP)
        subprocess.run(["chroot", str(rootfs), "/bin/busybox", "--install", "-s", "/bin"], check=True)
        # the published hooks say `bash -c`; busybox's shell understands what they ask of it
        (rootfs / "bin" / "bash").write_text('#!/bin/sh\nexec /bin/sh "$@"\n')
        os.chmod(rootfs / "bin" / "bash", 0o755)

    def add(
        self, vmid: int, kind: str = "lxc", node: str | None = None, running: bool = True, agent: bool = True
    ) -> Path:
        """A guest (`kind` "lxc" or "vm") on `node`; returns its root folder as the host sees it."""
        node = node or self.node
        folder = "lxc" if kind == "lxc" else "qemu-server"
        conf = self.root / "pve" / "nodes" / node / folder / f"{vmid}.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(f"hostname: guest{vmid}\nmemory: 512\n" + ("agent: 1\n" if kind == "vm" and agent else ""))
        home = self.guest_dir(vmid)
        shutil.copytree(self._template, home / "rootfs", symlinks=True)
        if running:
            (home / "running").write_text(node)
        return home / "rootfs"

    def guest_dir(self, vmid: int) -> Path:
        return self.root / "guests" / str(vmid)

    def rootfs(self, vmid: int) -> Path:
        return self.guest_dir(vmid) / "rootfs"

    def _mark(self, vmid: int, name: str, on: bool) -> None:
        marker = self.guest_dir(vmid) / name
        if on:
            marker.write_text("")
        else:
            marker.unlink(missing_ok=True)

    def stop(self, vmid: int) -> None:
        self._mark(vmid, "running", False)

    def start(self, vmid: int) -> None:
        self._mark(vmid, "running", True)

    def fail_inside(self, vmid: int, on: bool = True) -> None:
        self._mark(vmid, "fail-inside", on)

    def hang(self, vmid: int, on: bool = True) -> None:
        self._mark(vmid, "hang", on)

    def lose_agent(self, vmid: int, on: bool = True) -> None:
        self._mark(vmid, "agent-down", on)

    def migrate(self, vmid: int, kind: str, target: str) -> None:
        """Offline migration: the guest's configuration moves to `target` (pmxcfs does it atomically)."""
        tool = "pct" if kind == "lxc" else "qm"
        node = next(p.parent.parent.name for p in (self.root / "pve" / "nodes").glob(f"*/*/{vmid}.conf"))
        was_running = (self.guest_dir(vmid) / "running").exists()
        self.stop(vmid)
        proc = self.run(tool, "migrate", str(vmid), target, node=node)
        assert proc.returncode == 0, proc.stderr
        if was_running:
            self.start(vmid)

    def run(
        self, tool: str, *args: str, node: str | None = None, input: bytes | None = None
    ) -> subprocess.CompletedProcess:
        """Run a stand-in as the reconciler would (tests of the contracts themselves)."""
        env = {**os.environ, **self.env(node)}
        return subprocess.run([str(BIN / tool), *args], input=input, capture_output=True, env=env, timeout=120)


def legacy_entry(out: Path, name: str, vmid: int, kind: str, command: str, **extra) -> dict:
    """One entry of the published legacy manifest shape (guest_id + guest_type)."""
    return {
        "name": name,
        "common_name": f"{name}.guest.test",
        "cert_path": str(out / f"{name}.crt"),
        "key_path": str(out / f"{name}.key"),
        "guest_id": vmid,
        "guest_type": kind,
        "post_renewal_command": command,
        **extra,
    }
