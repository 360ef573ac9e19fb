"""`reconcile doctor`: one line per check with ✓/✗ and a hint. Reads; never writes certificates.

The checks run in dependency order: the manifest, the state folder, the issuer (its own
`diagnose()`: the embedded CA's files, or step-ca's DNS, TCP, TLS, health, provisioner and
password), then what every certificate needs (its folders, owners, hook programs), then the
Proxmox guests entries deliver into (reconciler.guests.diagnose), then every `serve` endpoint,
probed once (reconciler.probe)."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from reconciler.checks import Check, failed, private_folder, writable_folder
from reconciler.issuers import IssuerConfigError, IssuerError, make_issuer
from reconciler.manifest import ManifestError, load
from reconciler.model import Desired, IssuerSpec
from reconciler.desired import load_desired, resolve_issuer
from reconciler.guests.diagnose import guest_checks
from reconciler.passes import Settings
from reconciler.probe import doctor_checks as serve_checks
from reconciler.render import plural

SHELL_BUILTINS = frozenset(
    {"echo", "test", "[", "true", "false", "cd", "exit", "printf", ":", "set", "export", "if", "for", "{", "("}
)


def _line(check: Check) -> str:
    mark = "✓" if check.ok else "✗"
    return f"{mark} {check.what}" + (f"  — {check.hint}" if check.hint and not check.ok else "")


def _folder_check(path: Path) -> Check:
    folder = path.parent
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return Check(
            False, f"target folder {folder} cannot be created: {probe} is not a folder", "fix the path in the manifest"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        return Check(False, f"target folder {folder} is not writable", "run as root or grant write access")
    word = "exists" if probe == folder else f"can be created (under {probe})"
    return Check(True, f"target folder {folder} {word}")


def _hook_check(command: str) -> Check:
    try:
        words = shlex.split(command)
    except ValueError as exc:
        return Check(False, f"hook {command!r} does not parse as a shell command ({exc})", "fix its quoting")
    program = next((w for w in words if "=" not in w.split("/")[0]), None) if words else None
    if program is None:
        return Check(True, f"hook {command!r}")
    if program in SHELL_BUILTINS or shutil.which(program) or (os.path.isabs(program) and os.access(program, os.X_OK)):
        return Check(True, f"hook program {program} is found")
    return Check(False, f"hook program {program} not found on PATH ({command!r})", "install it, or give its full path")


def _manifest_checks(settings: Settings, unsafe_state: bool) -> tuple[Desired | None, IssuerSpec | None, list[Check]]:
    """(the manifest, its issuer, the checks saying so): either may be None when it failed."""
    try:
        if unsafe_state:
            # its validation cache cannot be trusted: check the manifest without it
            desired = load(settings.manifest)
            spec = resolve_issuer(desired, settings.issuer_options)
        else:
            desired = load_desired(settings)
            spec = desired.issuer
    except ManifestError as exc:
        hint = f"{plural(len(exc.issues), 'error')}; run `reconcile validate -m {settings.manifest}`"
        return None, None, [Check(False, f"manifest {settings.manifest} is invalid: {exc.issues[0]}", hint)]
    except IssuerConfigError as exc:
        # the manifest itself is fine: check its targets too, and list every issuer setting to fix
        desired, spec = load(settings.manifest), None
        return desired, spec, [_valid(settings, desired), Check(False, str(exc))]
    return desired, spec, [_valid(settings, desired)]


def _valid(settings: Settings, desired: Desired) -> Check:
    return Check(True, f"manifest {settings.manifest} is valid ({plural(len(desired.certificates), 'certificate')})")


def _issuer_checks(spec: IssuerSpec, state_dir: Path) -> list[Check]:
    try:
        issuer = make_issuer(spec, state_dir)
    except IssuerError as exc:  # an embedded CA folder another user can change: refused, said so
        return [failed(exc.message, exc.hint)]
    try:
        return issuer.diagnose()
    finally:
        issuer.close()


def _target_checks(desired: Desired) -> list[Check]:
    """Each target folder and hook command once, in manifest order."""
    checks: list[Check] = []
    seen_folders: set[Path] = set()
    seen_hooks: set[str] = set()
    for c in desired.certificates:
        for path in map(Path, (c.cert_path, c.key_path)):
            if path.parent not in seen_folders:
                seen_folders.add(path.parent)
                checks.append(_folder_check(path))
        if c.owner:
            checks.append(Check(True, f"{c.name}: owner {c.owner} exists"))
        if c.post_renewal_command and c.post_renewal_command not in seen_hooks:
            seen_hooks.add(c.post_renewal_command)
            checks.append(_hook_check(c.post_renewal_command))
    return checks


def run_doctor(settings: Settings) -> int:
    unsafe_state = private_folder(settings.state_dir, "state folder")
    desired, spec, checks = _manifest_checks(settings, unsafe_state is not None)
    checks.append(unsafe_state or writable_folder(settings.state_dir, "state folder"))
    if desired is not None:
        if spec is not None:
            checks += _issuer_checks(spec, settings.state_dir)
        checks += _target_checks(desired)
        checks += guest_checks(desired)
        checks += serve_checks(desired.certificates)
    if spec is not None:
        print(f"issuer: {spec.describe(settings.state_dir)}")
    for check in checks:
        print(_line(check))
    failures = sum(1 for check in checks if not check.ok)
    print(
        f"{len(checks) - failures} of {len(checks)} checks passed" + (f"; {failures} failed" if failures else ""),
        file=sys.stderr if failures else sys.stdout,
    )
    return 1 if failures else 0
