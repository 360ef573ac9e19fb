"""`reconcile doctor`'s checks for the entries that deliver into Proxmox guests: `pct`/`qm`
present, each guest exists on this node and runs, a VM's agent answers, and the target
folders exist inside the guest. Reads only; one command per guest for its folders."""

from __future__ import annotations

import posixpath
import shutil

from reconciler.checks import Check
from reconciler.guests.cluster import local_share
from reconciler.guests.deliver import guest_of
from reconciler.guests.proxmox import RUNNING, GuestError, GuestMissing, ProxmoxCLI

_FOLDERS = 'for d in "$@"; do if [ -d "$d" ]; then echo yes; else echo no; fi; done\n'


def guest_checks(desired, cli: ProxmoxCLI | None = None) -> list[Check]:
    """The checks for `desired`'s guest entries (in a cluster: this node's share)."""
    cli = cli or ProxmoxCLI()
    try:
        desired, _elsewhere = local_share(desired, cli)
    except GuestError as exc:
        return [Check(False, exc.message, exc.hint)]
    specs: dict[str, list] = {}
    for cert in desired.certificates:
        if cert.guest is not None:
            specs.setdefault(cert.guest.key, []).append(cert.guest)
    if not specs:
        return []
    checks: list[Check] = []
    for tool in sorted({s[0].type for s in specs.values()}):
        program = "pct" if tool == "lxc" else "qm"
        found = shutil.which(program, path=(cli.env or {}).get("PATH")) if cli.env else shutil.which(program)
        checks.append(Check(bool(found), f"{program} is present" if found else f"{program} not found on PATH", "run the reconciler on the Proxmox node that runs the guests"))
    for group in specs.values():
        checks += _one_guest(cli, group)
    return checks


def _one_guest(cli: ProxmoxCLI, specs: list) -> list[Check]:
    spec = specs[0]
    guest = guest_of(spec)
    try:
        state = cli.status(guest)
    except GuestMissing as exc:
        return [Check(False, exc.message, exc.hint)]
    except GuestError as exc:
        return [Check(False, f"{guest}: {exc.message}", exc.hint)]
    if state != RUNNING:
        return [Check(False, f"{guest} is {state}", f"its deliveries are owed until it runs ({guest.tool} start {guest.id})")]
    checks: list[Check] = [Check(True, f"{guest} exists and runs", "")]
    if guest.type == "vm":
        try:
            cli.agent_ping(guest)
            checks.append(Check(True, f"{guest}: the QEMU guest agent answers", ""))
        except GuestError as exc:
            return checks + [Check(False, exc.message, exc.hint)]
    folders = sorted({posixpath.dirname(t.path) for s in specs for t in s.targets()})
    try:
        run = cli.run(guest, _FOLDERS, tuple(folders))
    except GuestError as exc:
        return checks + [Check(False, f"{guest}: cannot look at its folders: {exc.message}", exc.hint)]
    answers = run.out.split()
    for folder, answer in zip(folders, answers + ["no"] * (len(folders) - len(answers))):
        ok = answer == "yes"
        checks.append(Check(ok, f"{guest}: target folder {folder} " + ("exists" if ok else "does not exist"), f"create it inside the guest ({guest.tool} exec {guest.id} -- mkdir -p {folder})" if guest.type == "lxc" else "create it inside the VM"))
    return checks
