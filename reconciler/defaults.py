"""Defaults, and the one place the reconciler reads its environment.

Every tunable's default lives here, next to the `RECONCILER_*` variable that overrides it,
so the CLI's help, the settings objects and the issuers cannot drift apart. The package
reads `os.environ` only as `ENVIRON`, here (fault injection keeps its own test switch in
`faults.py`; post-renewal commands inherit the environment as it is, in `hooks.py`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

MANIFEST = "certificate-manifest.json"  # relative to the working folder
ROOT_STATE_DIR = Path("/var/lib/reconciler")  # as root; other users: $XDG_STATE_HOME/reconciler
LOCK_TIMEOUT = 60.0  # seconds a pass waits for another pass on the same state folder
WORKERS = 4  # certificates issued concurrently
CA_CONNECT_TIMEOUT = 5.0  # seconds to connect to a step-ca (never more than the request timeout)
CA_TIMEOUT = 30.0  # seconds one step-ca request may take once connected
RESYNC = "10m"  # --watch: a full pass at least this often
GUEST_POLL = "30s"  # --watch: a stopped Proxmox guest owing a delivery is looked at this often
PVE_CLUSTER_DIR = Path("/etc/pve")  # a manifest in it is a Proxmox cluster's shared one

# Variables of our own. The issuer ones (URL, root, ...) are a step-ca setting's third
# source, after the manifest and the flags (issuers/stepca_config.py).
ENV_MANIFEST = "RECONCILER_MANIFEST"
ENV_STATE_DIR = "RECONCILER_STATE_DIR"
ENV_CA_TIMEOUT = "RECONCILER_CA_TIMEOUT"
ENV_ALLOW_UNTRUSTED_MANIFEST = "RECONCILER_ALLOW_UNTRUSTED_MANIFEST"
ENV_ISSUER = "RECONCILER_ISSUER"
# cluster mode for a manifest shared among Proxmox nodes some other way than /etc/pve
ENV_PVE_CLUSTER = "RECONCILER_PROXMOX_CLUSTER"
ENV_ISSUER_SETTINGS = {
    "url": "RECONCILER_CA_URL",
    "root": "RECONCILER_ROOT",
    "fingerprint": "RECONCILER_FINGERPRINT",
    "provisioner": "RECONCILER_PROVISIONER",
    "password_file": "RECONCILER_PASSWORD_FILE",
}


# The process environment, live. Whatever reads settings from it takes a Mapping defaulting
# to this, so a test hands it a plain dict instead of patching os.environ.
ENVIRON: Mapping[str, str] = os.environ


def setting(name: str, default: str = "", env: Mapping[str, str] = ENVIRON) -> str:
    """A variable's value; `default` when it is unset or empty."""
    return env.get(name) or default


def flag(name: str, env: Mapping[str, str] = ENVIRON) -> bool:
    """A yes/no variable: set to anything but empty or "0" means yes."""
    return setting(name, "", env) not in ("", "0")


def colour_allowed(env: Mapping[str, str] = ENVIRON) -> bool:
    """Colour on a terminal unless NO_COLOR is set (no-color.org) or TERM says it cannot."""
    return "NO_COLOR" not in env and env.get("TERM") != "dumb"


def state_dir(env: Mapping[str, str] = ENVIRON) -> Path:
    """Where the state folder is when neither --state-dir nor RECONCILER_STATE_DIR says."""
    if os.geteuid() == 0:
        return ROOT_STATE_DIR
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "reconciler"
