"""The `reconcile` command line's arguments: every subcommand's options, their help and
their checks, apart from what the commands do with them (cli.py)."""

from __future__ import annotations

import argparse

from reconciler import defaults

SUBCOMMANDS = ("validate", "status", "doctor", "renew", "schema")

DESCRIPTION = """\
Make the TLS certificates on this host match certificate-manifest.json.

  reconcile -m MANIFEST            converge once: issue, renew, fix owner/mode, run hooks
  reconcile -m MANIFEST --plan     show what would change, change nothing
  reconcile -m MANIFEST --watch    keep converging: on manifest saves, damaged files, deadlines
  reconcile renew -m MANIFEST NAME...|--all   renew now, whatever the expiry (see renew --help)
  reconcile validate -m MANIFEST   check the manifest only
  reconcile status -m MANIFEST     one row per certificate: state, expiry, last hook
  reconcile doctor -m MANIFEST     check the manifest, state folder, CA and targets
  reconcile schema                 print the manifest's JSON Schema (for editors)

Exit codes: 0 success; 1 error (invalid manifest, a failed issuance or hook, after doing
everything else that could be done); with --detailed-exitcode, 2 = success and changes
planned (with --plan) or made."""


RENEW_DESCRIPTION = """\
Renew certificates now, whatever their expiry (the old script's --force), then run their
post_renewal_command as after any renewal.

  reconcile renew -m MANIFEST web api       renew these two (names as `reconcile status` shows them)
  reconcile renew -m MANIFEST --all         renew every certificate in the manifest
  reconcile renew -m MANIFEST --plan web    show what would happen; change nothing, contact no CA

Each named certificate gets a new key and a new certificate from the manifest's issuer;
it keeps its key when its entry says "key": {"rotation": "never"}. With step-ca, a valid
certificate is renewed over mTLS with itself (no provisioner password needed); an expired
or missing one is issued with a one-time token, as a pass would. If the manifest changed
what a named certificate should be (SANs, key type) it is reissued to match; missing files
are issued. The rest of the manifest gets an ordinary pass: its drift is repaired and its
due renewals run, nothing else is renewed early.

An unknown NAME is an error that lists the known ones; nothing is done then.

Exit codes: 0 success; 1 error (unknown name, invalid manifest, a failed issuance or hook,
after doing everything else that could be done); with --detailed-exitcode, 2 = changes
planned (with --plan) or made; a usage error (no NAME and no --all, or both) exits 2."""

STATUS_DESCRIPTION = """\
One row per certificate: state, expiry, SANs, owner/mode, last issued, last hook.
Reads only: it changes nothing and never contacts a CA, so it can serve as a health check.

States: ready; renewal due (still valid, the next pass renews it); missing; expired;
error (the last pass failed for it, or the file holds another certificate than the
manifest asks for); hook pending (its post-renewal command still has to succeed);
repair due (owner or mode differs, the chain in the file is not what include_ca asks,
or the ca_path file is missing or holds another root; the next pass fixes it).

Exit codes: 0 every certificate is ready or only due for renewal; 1 any certificate is
not ready (missing, expired, error, hook pending, repair due), or the manifest is invalid."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < 86400:  # also refuses nan, which compares false with everything
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 86400 seconds")
    return value


def _workers(text: str) -> int:
    try:
        value: int | None = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        shown = repr(text) if value is None else text
        raise argparse.ArgumentTypeError(f"{shown} is not a whole number of at least 1")
    return value


def common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    g.add_argument(
        "-m",
        "--manifest",
        default=defaults.setting(defaults.ENV_MANIFEST, defaults.MANIFEST),
        help="the manifest to reconcile (env RECONCILER_MANIFEST; default ./certificate-manifest.json)",
    )
    g.add_argument(
        "--state-dir",
        default=defaults.setting(defaults.ENV_STATE_DIR) or str(defaults.state_dir()),
        help="where the embedded CA, the status store and the lock live (env RECONCILER_STATE_DIR; "
        "default /var/lib/reconciler as root, $XDG_STATE_HOME/reconciler otherwise; now %(default)s)",
    )
    g.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines on stderr as text or JSON")
    g.add_argument("-v", "--verbose", action="count", default=0, help="log each action (-vv: debug)")
    s = p.add_argument_group(
        "issuer (for manifests without an \"issuer\" block, e.g. bare arrays: flag > environment > "
        "$STEPPATH/config/defaults.json; see docs/step-ca.md)"
    )
    s.add_argument(
        "--issuer",
        choices=("local", "step-ca"),
        help="local: the embedded CA, chosen on purpose; step-ca: insist on a step-ca "
        "(env RECONCILER_ISSUER). With neither, a bare array needs step-ca settings from the flags below, "
        "their variables or defaults.json. An object manifest's issuer block decides; "
        "a contradicting --issuer is an error",
    )
    s.add_argument(
        "--ca-url", help="step-ca URL, e.g. https://ca.internal:9000 (env RECONCILER_CA_URL; defaults.json ca-url)"
    )
    s.add_argument("--root", help="the CA's root certificate file (env RECONCILER_ROOT; defaults.json root)")
    s.add_argument(
        "--fingerprint",
        help="SHA-256 fingerprint of the CA's root, instead of --root "
        "(env RECONCILER_FINGERPRINT; defaults.json fingerprint)",
    )
    s.add_argument("--provisioner", help="JWK provisioner name (env RECONCILER_PROVISIONER; defaults.json provisioner)")
    s.add_argument(
        "--password-file",
        help="file holding the provisioner password (env RECONCILER_PASSWORD_FILE; defaults.json password-file)",
    )
    s.add_argument(
        "--ca-timeout",
        type=_seconds,
        # a string: argparse converts it with `type`, so a bad variable is reported like a bad flag
        default=defaults.setting(defaults.ENV_CA_TIMEOUT, f"{defaults.CA_TIMEOUT:g}"),
        metavar="SECONDS",
        help="give up on a step-ca answer that has not finished after this long, plus at most "
        f"{defaults.CA_CONNECT_TIMEOUT:g} s to connect (env RECONCILER_CA_TIMEOUT; default {defaults.CA_TIMEOUT:g})",
    )
    return p


def pass_options(p: argparse.ArgumentParser) -> None:
    """What a pass takes, whether `reconcile` or `reconcile renew` starts it."""
    p.add_argument("--plan", action="store_true", help="print the plan and change nothing (never contacts a CA)")
    p.add_argument("--output", choices=("text", "json"), default="text", help="plan output format (format_version 1)")
    p.add_argument("--detailed-exitcode", action="store_true", help="exit 2 when changes were planned (--plan) or made")
    p.add_argument(
        "--no-hooks",
        action="store_true",
        help="converge the files but run no post-renewal command: each is recorded as owed, "
        "and the next pass without --no-hooks runs it",
    )
    p.add_argument(
        "--lock-timeout",
        type=_seconds,
        default=defaults.LOCK_TIMEOUT,
        metavar="SECONDS",
        help="wait this long for another pass to finish (default %(default)g)",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default=defaults.WORKERS,
        help="certificates issued concurrently (default %(default)s)",
    )
    p.add_argument(
        "--allow-untrusted-manifest",
        action="store_true",
        default=defaults.flag(defaults.ENV_ALLOW_UNTRUSTED_MANIFEST),
        help="as root, run post_renewal_commands even when a user other than root can write the manifest or a "
        "folder above it (they run as root: see docs/security.md; env RECONCILER_ALLOW_UNTRUSTED_MANIFEST=1)",
    )


def build_parser(sub: str | None) -> argparse.ArgumentParser:
    if sub == "schema":
        return argparse.ArgumentParser(
            prog="reconcile schema",
            description="Print the JSON Schema (Draft 2020-12) of certificate-manifest.json that this installation "
            "validates with, for editors to validate and explain the manifest as it is typed: "
            "reconcile schema > certificate-manifest.schema.json (see docs/manifest.md, \"Editor support\").",
        )
    common = common_options()
    if sub == "validate":
        return argparse.ArgumentParser(
            prog="reconcile validate",
            parents=[common],
            description="Check the manifest; print `ok: N certificates` or every error. Exit 0 / 1.",
        )
    if sub == "status":
        p = argparse.ArgumentParser(
            prog="reconcile status",
            parents=[common],
            description=STATUS_DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--output", choices=("text", "json"), default="text")
        return p
    if sub == "renew":
        p = argparse.ArgumentParser(
            prog="reconcile renew",
            parents=[common],
            description=RENEW_DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "names",
            nargs="*",
            metavar="NAME",
            help="a certificate's name (its \"name\", or its common_name when it has none)",
        )
        p.add_argument("--all", action="store_true", help="renew every certificate in the manifest")
        pass_options(p)
        return p
    if sub == "doctor":
        return argparse.ArgumentParser(
            prog="reconcile doctor",
            parents=[common],
            description="Check everything a pass needs, one line per check with a hint. Exit 1 if any fails.",
        )
    p = argparse.ArgumentParser(
        prog="reconcile",
        parents=[common],
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pass_options(p)
    p.add_argument(
        "--watch",
        action="store_true",
        help="keep running: reconcile on manifest saves, damaged files, renewal deadlines",
    )
    p.add_argument(
        "--resync", default=defaults.RESYNC, help="with --watch: full pass at least this often (default %(default)s)"
    )
    p.add_argument(
        "--guest-poll",
        default=defaults.GUEST_POLL,
        help="with --watch: look at a stopped Proxmox guest that owes a delivery this often (default %(default)s)",
    )
    p.add_argument("--metrics-listen", metavar="HOST:PORT", help="with --watch: serve Prometheus metrics on /metrics")
    p.add_argument(
        "--metrics-file",
        metavar="PATH",
        help="write Prometheus textfile-collector metrics after every pass "
        "(a one-shot run writes them once; its counters count that run)",
    )
    p.add_argument(
        "--poll",
        action="store_true",
        help="with --watch: poll folders every second instead of inotify (network filesystems)",
    )
    return p
