#!/usr/bin/python3
"""Stand-ins for Proxmox VE's `pct`, `qm` and `pvesh`, for the guest-delivery tests.

Only the parts of the real command-line contracts the reconciler uses, with the real
arguments, output formats and exit codes, as pve-container (src/PVE/CLI/pct.pm) and
qemu-server (src/PVE/CLI/qm.pm, src/PVE/QemuServer/Agent.pm) define them and pct(1),
qm(1) and pvesh(1) document them:

  pct status <vmid>                      "status: running" / "status: stopped"
  pct start|stop <vmid>
  pct exec <vmid> [--keep-env 0|1] -- <command...>   the command's own exit code
  pct push <vmid> <file> <destination> [--perms <mode>] [--user <u>] [--group <g>]
        the file is created mode 0 with O_EXCL, chmod/chown'ed, then written (create_file);
        names are looked up in the container's /etc/passwd and /etc/group
  pct migrate <vmid> <target>            (offline; the config moves to the target node)
  qm status <vmid>                       "status: running" / "status: stopped"
  qm start|stop <vmid>, qm migrate <vmid> <target>
  qm guest cmd <vmid> ping               nothing on success
  qm guest exec <vmid> [--pass-stdin 0|1] [--timeout <s>] [--synchronous 0|1] -- <command...>
        prints the agent's answer as pretty JSON ({"exitcode", "exited", "out-data",
        "err-data"}) and EXITS 0 WHATEVER THE COMMAND'S EXIT CODE; at the timeout it warns
        "timeout reached, returning pid" and prints {"pid": N}
  pvesh get /cluster/resources [--type vm] --output-format json
  pvesh get /cluster/status --output-format json     (the local node has "local": 1)

Every error is a line on stderr and exit status 255 (a Perl `die` in the PVE CLI handler):
"Configuration file 'nodes/<node>/lxc/<vmid>.conf' does not exist" for a guest on another
node or none, "container '<vmid>' not running!", "can only push files to a running CT",
"VM <vmid> is not running", "QEMU guest agent is not running".

The cluster lives in the folder $PVE_STANDIN:
  pve/nodes/<node>/lxc/<vmid>.conf, pve/nodes/<node>/qemu-server/<vmid>.conf  (/etc/pve)
  guests/<vmid>/rootfs/      the guest: a chroot of Debian's busybox-static; commands run in it
  guests/<vmid>/running      present while the guest runs
  calls.log                  every command line the stand-ins were given, one JSON list a line
and $PVE_STANDIN_NODE names the node this command runs on (default pve1). Tests steer a
guest with marker files in guests/<vmid>/: `agent-down` (the VM's agent does not answer),
`fail-inside` (every command run in the guest fails: exit 1, "boom" on stderr), `hang`
(every command run in the guest sleeps until killed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(os.environ.get("PVE_STANDIN", "/nonexistent-pve-standin"))
NODE = os.environ.get("PVE_STANDIN_NODE", "pve1")
KINDS = {"pct": ("lxc", "lxc"), "qm": ("qemu", "qemu-server")}
GUEST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class Die(Exception):
    pass


def die(message: str):
    raise Die(message)


def config_dir(node: str, tool: str) -> Path:
    return ROOT / "pve" / "nodes" / node / KINDS[tool][1]


def find_node(vmid: str) -> str | None:
    for tool in KINDS:
        for conf in (ROOT / "pve" / "nodes").glob(f"*/{KINDS[tool][1]}/{vmid}.conf"):
            return conf.parent.parent.name
    return None


def load_config(tool: str, vmid: str) -> dict:
    if not vmid.isdigit() or int(vmid) < 100:
        print(
            "400 Parameter verification failed.\nvmid: invalid format - value does not look like a valid VM ID\n",
            file=sys.stderr,
        )
        raise SystemExit(255)
    conf = config_dir(NODE, tool) / f"{vmid}.conf"
    if not conf.exists():
        die(f"Configuration file 'nodes/{NODE}/{KINDS[tool][1]}/{vmid}.conf' does not exist")
    out = {}
    for line in conf.read_text().splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def guest(vmid: str) -> Path:
    return ROOT / "guests" / vmid


def running(vmid: str) -> bool:
    return (guest(vmid) / "running").exists()


def split_options(args: list[str], booleans=(), values=()) -> tuple[list[str], dict[str, str], list[str]]:
    """(positional, options, extra after --), the way PVE's CLI handler reads them."""
    pos, opts, extra = [], {}, []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            extra = args[i + 1 :]
            break
        if a.startswith("-") and len(a) > 1:
            name = a.lstrip("-")
            if "=" in name:
                name, value = name.split("=", 1)
            elif name in booleans and (i + 1 >= len(args) or args[i + 1] not in ("0", "1", "true", "false")):
                value = "1"
            else:
                i += 1
                if i >= len(args):
                    print(f"400 Parameter verification failed.\n{name}: missing value\n", file=sys.stderr)
                    raise SystemExit(255)
                value = args[i]
            if name not in booleans and name not in values:
                print(
                    f"400 Parameter verification failed.\n{name}: property is not defined in schema "
                    "and the schema does not allow additional properties\n",
                    file=sys.stderr,
                )
                raise SystemExit(255)
            opts[name] = value
        else:
            pos.append(a)
        i += 1
    return pos, opts, extra


def run_inside(vmid: str, argv: list[str], stdin: bytes | None = None, timeout: float | None = None):
    """Run argv in the guest's chroot; returns (exit code or None on timeout, stdout, stderr, pid)."""
    if (guest(vmid) / "fail-inside").exists():
        return 1, b"", b"boom\n", 0
    if (guest(vmid) / "hang").exists():
        argv = ["/bin/sleep", "3600"]
    proc = subprocess.Popen(
        ["chroot", str(guest(vmid) / "rootfs"), *argv],
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C"},
    )
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        # a real agent leaves the command running in the VM; a test must not leave it behind
        proc.kill()
        proc.wait()
        return None, b"", b"", proc.pid
    return proc.returncode, out, err, proc.pid


def passwd_id(vmid: str, table: str, name: str) -> int | None:
    if name.isdigit():
        return int(name)
    try:
        lines = (guest(vmid) / "rootfs" / "etc" / table).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":")
        if len(parts) > 2 and parts[0] == name:
            return int(parts[2])
    return None


def lifecycle(tool: str, cmd: str, rest: list[str]) -> int | None:
    """status, start, stop, migrate: the same for pct and qm (None: another command)."""
    if cmd == "status":
        pos, _opts, _ = split_options(rest, booleans=("verbose",))
        load_config(tool, pos[0])
        print(f"status: {'running' if running(pos[0]) else 'stopped'}")
        return 0
    if cmd in ("start", "stop"):
        return start_stop(tool, cmd, rest)
    if cmd == "migrate":
        return migrate(tool, rest)
    return None


def pct(cmd: str, rest: list[str]) -> int:
    if cmd == "exec":
        pos, _opts, extra = split_options(rest, booleans=("keep-env",))
        load_config("pct", pos[0])
        if not running(pos[0]):
            die(f"container '{pos[0]}' not running!")
        if not extra:
            die("missing command")
        sys.stdout.flush()
        code, out, err, _pid = run_inside(pos[0], extra, sys.stdin.buffer.read() if not sys.stdin.isatty() else None)
        sys.stdout.buffer.write(out)
        sys.stderr.buffer.write(err)
        return code if code is not None else 1
    if cmd == "push":
        pos, opts, _ = split_options(rest, values=("perms", "user", "group"))
        if len(pos) != 3:
            die("400 wrong number of arguments")
        vmid, src, dest = pos
        load_config("pct", vmid)
        if not running(vmid):
            die("can only push files to a running CT")
        return push_file(vmid, src, dest, opts)
    die(f"unknown command 'pct {cmd}'")


def push_file(vmid: str, src: str, dest: str, opts: dict) -> int:
    """pct.pm's create_file, inside the guest: the source is opened on the host first."""
    try:
        srcfd = os.open(src, os.O_RDONLY)
    except OSError:
        die(f"failed to open {src} for reading")
    uid = gid = None
    if "user" in opts:
        uid = passwd_id(vmid, "passwd", opts["user"])
        if uid is None:
            die(f"failed to get uid for: {opts['user']}")
    if "group" in opts:
        gid = passwd_id(vmid, "group", opts["group"])
        if gid is None:
            die(f"failed to get gid for: {opts['group']}")
    perms = opts.get("perms")
    if perms is not None:
        perms = "0" + perms if not perms.startswith("0") else perms
        try:
            perms = int(perms, 16) if perms.lower().startswith("0x") else int(perms, 8)
        except ValueError:
            die(f"invalid mode: '{opts['perms']}'")
    pid = os.fork()
    if pid == 0:  # the real one enters the container's mount namespace; a chroot here
        try:
            os.chroot(guest(vmid) / "rootfs")
            os.chdir("/")
            try:
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0)
                mode = perms if perms is not None else 0o666 & ~os.umask(0)
            except FileExistsError:
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                mode = perms
            if mode is not None:
                os.fchmod(fd, mode)
            if uid is not None or gid is not None:
                st = os.fstat(fd)
                os.fchown(fd, st.st_uid if uid is None else uid, st.st_gid if gid is None else gid)
            while chunk := os.read(srcfd, 65536):
                os.write(fd, chunk)
            os.close(fd)
            os._exit(0)
        except OSError as exc:
            sys.stderr.write(f"failed to create file: {dest}: {exc.strerror}\n")
            os._exit(255)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) & 0xFF


def start_stop(tool: str, cmd: str, rest: list[str]) -> int:
    pos, _opts, _ = split_options(rest, values=("timeout",), booleans=("skiplock", "overrule-shutdown"))
    load_config(tool, pos[0])
    marker = guest(pos[0]) / "running"
    if cmd == "start":
        if marker.exists():
            die(f"{'CT' if tool == 'pct' else 'VM'} {pos[0]} already running")
        marker.write_text(NODE)
    else:
        marker.unlink(missing_ok=True)
    return 0


def migrate(tool: str, rest: list[str]) -> int:
    pos, _opts, _ = split_options(
        rest, booleans=("online", "restart", "with-local-disks"), values=("timeout", "targetstorage")
    )
    vmid, target = pos
    load_config(tool, vmid)
    if running(vmid) and tool == "pct":
        die("CT is running - use online migration or restart mode")
    dest = config_dir(target, tool)
    dest.mkdir(parents=True, exist_ok=True)
    os.rename(config_dir(NODE, tool) / f"{vmid}.conf", dest / f"{vmid}.conf")
    return 0


def pretty(data: dict) -> str:
    # Perl's JSON->pretty->canonical: three-space indent, " : " between key and value
    return json.dumps(data, indent=3, sort_keys=True, separators=(",", " : ")) + "\n"


def qm(cmd: str, rest: list[str]) -> int:
    if cmd in ("guest", "agent"):
        if cmd == "agent":
            rest = ["cmd", *rest]
        sub, rest = rest[0], rest[1:]
        if sub == "cmd":
            pos, _opts, _ = split_options(rest)
            agent_available(pos[0])
            if pos[1] != "ping":
                die(f"unsupported agent command '{pos[1]}' in this stand-in")
            return 0
        if sub == "exec":
            return guest_exec(rest)
    die(f"unknown command 'qm {cmd}'")


def agent_available(vmid: str) -> dict:
    conf = load_config("qm", vmid)
    if conf.get("agent", "0").split(",")[0] not in ("1", "enabled=1"):
        die("No QEMU guest agent configured")
    if not running(vmid):
        die(f"VM {vmid} is not running")
    if (guest(vmid) / "agent-down").exists():
        die("QEMU guest agent is not running")
    return conf


def guest_exec(rest: list[str]) -> int:
    pos, opts, extra = split_options(rest, booleans=("pass-stdin", "synchronous"), values=("timeout",))
    vmid = pos[0]
    extra = pos[1:] + extra
    agent_available(vmid)
    stdin = None
    if opts.get("pass-stdin") in ("1", "true"):
        stdin = sys.stdin.buffer.read()
        if len(stdin) > 1024 * 1024:
            die("'input-data' (STDIN) is limited to 1 MiB, aborting")
    if not extra and stdin is None:
        die("command or input-data (or both) required")
    timeout = int(opts.get("timeout", "30"))
    code, out, err, pid = run_inside(vmid, extra, stdin, timeout or None)
    if code is None:
        print("timeout reached, returning pid", file=sys.stderr)
        sys.stdout.write(pretty({"pid": pid}))
        return 0
    result = {"exited": 1, "exitcode": code}
    if code < 0:
        result = {"exited": 1, "signal": -code}
    if out:
        result["out-data"] = out.decode("utf-8", "replace")
    if err:
        result["err-data"] = err.decode("utf-8", "replace")
    sys.stdout.write(pretty(result))
    return 0


def pvesh(args: list[str]) -> int:
    pos, opts, _ = split_options(args, values=("type", "output-format"))
    if len(pos) != 2 or pos[0] != "get":
        die("this stand-in answers only 'pvesh get /cluster/resources' and 'pvesh get /cluster/status'")
    nodes = sorted(p.name for p in (ROOT / "pve" / "nodes").iterdir()) if (ROOT / "pve" / "nodes").is_dir() else []
    if pos[1] == "/cluster/status":
        data = [{"type": "cluster", "name": "standin", "nodes": len(nodes), "quorate": 1}]
        data += [{"type": "node", "name": n, "id": f"node/{n}", "local": int(n == NODE), "online": 1} for n in nodes]
    elif pos[1] == "/cluster/resources":
        data = []
        for node in nodes:
            data.append({"type": "node", "id": f"node/{node}", "node": node, "status": "online"})
            for tool in KINDS:
                for conf in sorted(config_dir(node, tool).glob("*.conf")):
                    vmid = conf.stem
                    kind = KINDS[tool][0]
                    data.append(
                        {
                            "type": kind,
                            "id": f"{kind}/{vmid}",
                            "vmid": int(vmid),
                            "node": node,
                            "status": "running" if running(vmid) else "stopped",
                            "name": f"guest{vmid}",
                        }
                    )
        if opts.get("type") == "vm":
            data = [d for d in data if d["type"] in ("lxc", "qemu")]
        elif opts.get("type") == "node":
            data = [d for d in data if d["type"] == "node"]
    else:
        die(f"no such path '{pos[1]}' in this stand-in")
    if opts.get("output-format", "text") not in ("json", "json-pretty"):
        die("this stand-in prints only --output-format json")
    print(json.dumps(data, indent=None if opts["output-format"] == "json" else 2))
    return 0


def main() -> int:
    tool = Path(sys.argv[0]).name
    if ROOT.is_dir():  # every command line, so tests can show no key was ever on one
        with open(ROOT / "calls.log", "a") as log:
            log.write(json.dumps([tool, *sys.argv[1:]]) + "\n")
    try:
        if tool == "pvesh":
            return pvesh(sys.argv[1:])
        if len(sys.argv) < 2:
            die("400 not enough arguments")
        cmd, rest = sys.argv[1], sys.argv[2:]
        done = lifecycle(tool, cmd, rest)
        return done if done is not None else {"pct": pct, "qm": qm}[tool](cmd, rest)
    except Die as exc:
        print(str(exc), file=sys.stderr)
        return 255


if __name__ == "__main__":
    sys.exit(main())
