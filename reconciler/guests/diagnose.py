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

# one answer (yes/no) per argument: "d:<folder>" exists, "u:<user>" / "g:<group>" is known
# to the guest (numbers always are)
_LOOK = """for a in "$@"; do
  v=${a#?:}
  case $a in
    d:*) [ -d "$v" ] ;;
    u:*) case $v in *[!0-9]*) grep -q "^$v:" /etc/passwd ;; esac ;;
    g:*) case $v in *[!0-9]*) grep -q "^$v:" /etc/group ;; esac ;;
  esac && echo yes || echo no
done
"""


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
        checks.append(
            Check(
                bool(found),
                f"{program} is present" if found else f"{program} not found on PATH",
                "run the reconciler on the Proxmox node that runs the guests",
            )
        )
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
        return [
            Check(
                False, f"{guest} is {state}", f"its deliveries are owed until it runs ({guest.tool} start {guest.id})"
            )
        ]
    checks: list[Check] = [Check(True, f"{guest} exists and runs", "")]
    if guest.type == "vm":
        try:
            cli.agent_ping(guest)
            checks.append(Check(True, f"{guest}: the QEMU guest agent answers", ""))
        except GuestError as exc:
            return checks + [Check(False, exc.message, exc.hint)]
    asked = sorted({f"d:{posixpath.dirname(t.path)}" for s in specs for t in s.targets()})
    asked += sorted(
        {f"u:{t.user}" for s in specs for t in s.targets() if t.user}
        | {f"g:{t.group}" for s in specs for t in s.targets() if t.group}
    )
    try:
        run = cli.run(guest, _LOOK, tuple(asked))
    except GuestError as exc:
        return checks + [Check(False, f"{guest}: cannot look inside it: {exc.message}", exc.hint)]
    # one word per question: a missing answer (the look cut short) reads as "no", extra words are ignored
    answers = (run.out.split() + ["no"] * len(asked))[: len(asked)]
    return checks + [_answer(guest, a, answer == "yes") for a, answer in zip(asked, answers, strict=True)]


def _answer(guest, asked: str, ok: bool) -> Check:
    kind, value = asked[0], asked[2:]
    if kind == "d":
        fix = (
            f"create it inside the guest ({guest.tool} exec {guest.id} -- mkdir -p {value})"
            if guest.type == "lxc"
            else "create it inside the VM"
        )
        return Check(ok, f"{guest}: target folder {value} " + ("exists" if ok else "does not exist"), fix)
    what = "user" if kind == "u" else "group"
    return Check(
        ok,
        f"{guest}: owner {what} {value} " + ("exists" if ok else "does not exist in the guest"),
        f"create the {what} inside the guest, or change guest.owner",
    )
