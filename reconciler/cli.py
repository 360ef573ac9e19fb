"""The `reconcile` command line: argument parsing, output and exit codes. No certificate logic."""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn

from reconciler import defaults
from reconciler.desired import load_desired
from reconciler.cli_args import SUBCOMMANDS, build_parser
from reconciler.doctor import run_doctor
from reconciler.durations import DurationError, parse_duration
from reconciler.errors import ReconcilerError
from reconciler.folders import require_private
from reconciler.guestfacts import validate_notes
from reconciler.loop import WatchSettings, run_watch
from reconciler.manifest_schema import schema_bytes
from reconciler.metrics import Metrics
from reconciler.passes import ForcedRenewal, IssuerOptions, Settings, run_pass, snapshot
from reconciler.render import failure_headline, held_back, json_pieces, plan_json, plan_text, result_text, use_colour
from reconciler.report import status_json, status_outcome, status_text
from reconciler.status import read_only

EXIT_OK, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a program whose reader left


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def setup_logging(fmt: str, verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("reconciler")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose or fmt == "json" else logging.WARNING)
    root.propagate = False


def settings_from(args):
    return Settings(
        manifest=Path(args.manifest),
        state_dir=Path(args.state_dir),
        issuer_options=IssuerOptions(
            args.ca_url, args.root, args.fingerprint, args.provisioner, args.password_file, args.issuer
        ),
        lock_timeout=getattr(args, "lock_timeout", defaults.LOCK_TIMEOUT),
        workers=getattr(args, "workers", defaults.WORKERS),
        allow_untrusted_manifest=getattr(args, "allow_untrusted_manifest", False),
        ca_timeout=args.ca_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    """`reconcile ... | head -1`: the reader leaving early is not an error worth a traceback.
    The work is done either way; only the rest of the output has nowhere to go."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # inside the try: a buffered write fails here, not at exit
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that cannot fail too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def run() -> NoReturn:
    """The `reconcile` command (the console script and `python -m reconciler`): main, then
    exit without tearing the interpreter down. A one-shot run ends holding ~20 objects per
    certificate, and freeing them one by one at exit is ~3 % of a 10,000-certificate plan
    that nobody waits for (mypy ends the same way). What a caller reads is flushed first;
    no atexit work is skipped: the package registers none, and every thread, pool and child
    process has been joined by the time main returns."""
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone or a stream closed: nothing left to tell it
            pass
    os._exit(code)


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sub = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    # intermixed: `renew a -m m.json --plan b` takes both names, as users expect of a CLI
    args = build_parser(sub).parse_intermixed_args(argv[1:] if sub else argv)
    if sub == "schema":
        sys.stdout.write(schema_bytes().decode("utf-8"))
        return EXIT_OK
    if not getattr(args, "watch", False):
        # a one-shot run builds ~20 objects per certificate and frees them all at exit:
        # the cyclic collector only costs time there (~25 % of a 10k-certificate plan)
        gc.disable()
    setup_logging(args.log_format, args.verbose)
    try:
        if sub == "validate":
            return cmd_validate(args)
        if sub == "status":
            return cmd_status(args)
        if sub == "renew":
            return cmd_renew(args)
        if sub == "doctor":
            return run_doctor(settings_from(args))
        if args.watch:
            if args.no_hooks:
                print(
                    "error: --no-hooks goes with a single pass (a maintenance window), not with --watch",
                    file=sys.stderr,
                )
                return EXIT_ERROR
            # refused at start with one clear error, not a retried pass failure
            require_private(Path(args.state_dir), "state folder")
            if args.plan:
                print("error: --plan and --watch do not go together; --plan shows one pass and exits", file=sys.stderr)
                return EXIT_ERROR
            return cmd_watch(args)
        return cmd_plan(args) if args.plan else cmd_apply(args)
    except ReconcilerError as exc:  # the one place: message and hint, nothing else to say
        print(f"error: {exc.explain()}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def cmd_watch(args) -> int:
    periods = {}
    for flag, value in (("--resync", args.resync), ("--guest-poll", args.guest_poll)):
        try:
            periods[flag] = parse_duration(value).total_seconds()
        except DurationError as exc:
            print(f"error: {flag}: {exc}", file=sys.stderr)
            return EXIT_ERROR
    return run_watch(
        WatchSettings(
            settings_from(args),
            periods["--resync"],
            poll=args.poll,
            metrics_listen=args.metrics_listen,
            metrics_file=Path(args.metrics_file) if args.metrics_file else None,
            guest_poll=periods["--guest-poll"],
        )
    )


def cmd_validate(args) -> int:
    # the issuer too: a first pass would stop on it, so validate says so before
    settings = settings_from(args)
    desired = load_desired(settings)
    n = len(desired.certificates)
    print(f"issuer: {desired.issuer.describe(settings.state_dir)}")
    print(f"ok: {n} certificate{'s' if n != 1 else ''}")
    for note in validate_notes(desired.certificates):
        print(note)
    return EXIT_OK


def cmd_renew(args) -> int:
    if bool(args.names) == args.all:
        build_parser("renew").error("name the certificates to renew, or --all for every one (not both)")
    forced = ForcedRenewal(None if args.all else tuple(args.names))
    return cmd_plan(args, forced) if args.plan else cmd_apply(args, forced)


def cmd_plan(args, forced=None) -> int:
    settings = settings_from(args)
    desired = load_desired(settings)
    # only the plan is kept: what was observed (half a 50,000-entry plan's memory) is freed
    # before the output is built
    plan = snapshot(settings, desired, read_only(settings.state_dir), forced=forced).plan
    issuer = desired.issuer
    if args.output == "json":
        sys.stdout.writelines(json_pieces(plan_json(plan, issuer.summary(settings.state_dir))))
    else:
        sys.stdout.write(plan_text(plan, use_colour(), issuer.describe(settings.state_dir)))
    if plan.errors:
        return EXIT_ERROR
    return EXIT_CHANGES if args.detailed_exitcode and plan.changes else EXIT_OK


def cmd_apply(args, forced=None) -> int:
    settings = settings_from(args)
    snap, outcome = run_pass(settings, forced=forced, skip_hooks=args.no_hooks)
    result = outcome.result
    assert result is not None, "a pass always has a result"
    if getattr(args, "metrics_file", None):
        metrics = Metrics()
        metrics.set_manifest_valid(True)
        metrics.record(outcome, ca_reachable=not outcome.ca_unreachable)
        metrics.write_file(Path(args.metrics_file))
    issuer = snap.desired.issuer
    if args.output == "json":
        data = plan_json(outcome.plan, issuer.summary(settings.state_dir))
        data["result"] = {
            "ok": outcome.ok,
            "failures": outcome.failures(),
            "hooks": [
                {"command": h.command, "certificates": list(h.certificates), "ok": h.ok, "result": h.describe()}
                for h in result.hooks
            ],
            "hooks_held_back": [
                {"command": c, "certificates": list(names), "reason": why}
                for c, names, why in held_back(outcome.plan, result)
            ],
        }
        sys.stdout.writelines(json_pieces(data))
    else:
        sys.stdout.write(result_text(outcome.plan, result, issuer=issuer.describe(settings.state_dir)))
    failures = outcome.failures()
    if failures:
        print(f"error: {failure_headline(outcome.plan, result)}; everything else was done:", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_CHANGES if args.detailed_exitcode and outcome.changed else EXIT_OK


def cmd_status(args) -> int:
    settings = settings_from(args)
    outcome, manifest_note, issuer = status_outcome(settings)
    if args.output == "json":
        # streamed: indented JSON is encoded in Python, and joined into one string it held a
        # 50,000-certificate status twice over
        json.dump(status_json(outcome, manifest_note, issuer), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(status_text(outcome, manifest_note, issuer))
    all_serving = manifest_note is None and (outcome is None or outcome.all_serving)
    return EXIT_OK if all_serving else EXIT_ERROR
