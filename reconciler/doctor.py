"""`reconcile doctor`: one line per check with ✓/✗ and a hint. Reads; never writes certificates."""

from __future__ import annotations

import os
import shutil
import shlex
import sys
import tempfile
from pathlib import Path

from reconciler.manifest import ManifestError


def _line(ok: bool, what: str, hint: str = "") -> str:
    mark = "✓" if ok else "✗"
    return f"{mark} {what}" + (f"  — {hint}" if hint and not ok else "")


def _state_dir_check(state_dir: Path, label: str = "state folder") -> tuple[bool, str, str]:
    probe = state_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():  # probing its parent instead would report a folder that can never exist as writable
        return False, f"{label} {state_dir} cannot be created: {probe} is not a folder", "pass --state-dir a folder, or move that file away"
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".reconciler-doctor-"):
            pass
        return True, f"{label} {state_dir} is writable", ""
    except OSError as exc:
        return False, f"{label} {state_dir} is not writable ({exc.strerror})", "run as root, or pass --state-dir to a folder you own"


def _private_check(folder: Path, label: str) -> tuple[bool, str, str] | None:
    """A ✗ line when another user could change `folder` (see folders.private_folder_problem)."""
    from reconciler.folders import private_folder_problem

    problem = private_folder_problem(folder, label)
    if problem is None:
        return None
    what, _, fix = problem.partition(". Fix: ")
    return False, what, fix


def _folder_check(path: Path) -> tuple[bool, str, str]:
    folder = path.parent
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return False, f"target folder {folder} cannot be created: {probe} is not a folder", "fix the path in the manifest"
    if not os.access(probe, os.W_OK | os.X_OK):
        return False, f"target folder {folder} is not writable", "run as root or grant write access"
    word = "exists" if probe == folder else f"can be created (under {probe})"
    return True, f"target folder {folder} {word}", ""


def _hook_check(command: str) -> tuple[bool, str, str]:
    try:
        words = shlex.split(command)
    except ValueError as exc:
        return False, f"hook {command!r} does not parse as a shell command ({exc})", "fix its quoting"
    program = next((w for w in words if "=" not in w.split("/")[0]), None) if words else None
    if program is None:
        return True, f"hook {command!r}", ""
    shell_builtins = {"echo", "test", "[", "true", "false", "cd", "exit", "printf", ":", "set", "export", "if", "for", "{", "("}
    if program in shell_builtins or shutil.which(program) or (os.path.isabs(program) and os.access(program, os.X_OK)):
        return True, f"hook program {program} is found", ""
    return False, f"hook program {program} not found on PATH ({command!r})", "install it, or give its full path"


def run_doctor(settings) -> int:
    from reconciler.issuers import IssuerConfigError
    from reconciler.manifest import load
    from reconciler.desired import load_desired
    from reconciler.render import plural

    from reconciler.desired import resolve_issuer

    checks: list[tuple[bool, str, str]] = []
    desired = None
    spec = None
    unsafe_state = _private_check(settings.state_dir, "state folder")
    try:
        if unsafe_state:
            # its validation cache cannot be trusted: check the manifest without it
            desired = load(settings.manifest)
            spec = resolve_issuer(desired, settings.issuer_options)
        else:
            desired = load_desired(settings)
            spec = desired.issuer
    except ManifestError as exc:
        checks.append((False, f"manifest {settings.manifest} is invalid: {exc.issues[0]}", f"{plural(len(exc.issues), 'error')}; run `reconcile validate -m {settings.manifest}`"))
    except IssuerConfigError as exc:
        # the manifest itself is fine: check its targets too, and list every issuer setting to fix
        desired = load(settings.manifest)
        checks.append((False, str(exc), ""))
    if desired is not None:
        checks.insert(0, (True, f"manifest {settings.manifest} is valid ({plural(len(desired.certificates), 'certificate')})", ""))
    checks.append(unsafe_state or _state_dir_check(settings.state_dir))
    if desired is not None:
        if spec is not None and spec.type == "step-ca":
            from reconciler.issuers.stepca_doctor import doctor_checks

            checks += doctor_checks(spec, settings.state_dir)
        elif spec is not None:
            from reconciler.issuers.local import LocalCA

            folder = spec.ca_dir(settings.state_dir)
            local = LocalCA(folder)
            unsafe_ca = _private_check(folder, "embedded CA folder")
            problem = None if unsafe_ca else local.check()
            if unsafe_ca:
                checks.append(unsafe_ca)
            elif problem is not None:
                checks.append((False, problem.args[0], problem.hint))
            elif local.exists():
                checks.append((True, f"embedded CA in {folder} is present (keys match, the chain verifies, valid now)", ""))
            else:
                ok, what, hint = _state_dir_check(folder, "embedded CA folder")
                checks.append((ok, f"embedded CA in {folder} will be created on the first pass" if ok else what, hint))
        seen_folders: set[Path] = set()
        seen_hooks: set[str] = set()
        for c in desired.certificates:
            for path in (c.cert_path, c.key_path):
                if path.parent not in seen_folders:
                    seen_folders.add(path.parent)
                    checks.append(_folder_check(path))
            if c.owner:
                checks.append((True, f"{c.name}: owner {c.owner} exists", ""))
            if c.post_renewal_command and c.post_renewal_command not in seen_hooks:
                seen_hooks.add(c.post_renewal_command)
                checks.append(_hook_check(c.post_renewal_command))
    if spec is not None:
        print(f"issuer: {spec.describe(settings.state_dir)}")
    for ok, what, hint in checks:
        print(_line(ok, what, hint))
    failed = sum(1 for ok, _, _ in checks if not ok)
    print(f"{len(checks) - failed} of {len(checks)} checks passed" + (f"; {failed} failed" if failed else ""), file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0
