"""A post-renewal command is owed from the moment its certificate's files change until it
succeeds, across any number of kills, stops and `--no-hooks` passes.

Sequences of SIGKILLs: pass 1 changes every certificate and is killed at one phase, the
recovery passes 2 and 3 are killed at a phase each (or finish when that phase never comes),
then one pass runs to the end. After it, every certificate's hook must have run for the
content now on disk, and nothing may be owed any more.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from helpers import reconcile, run_cli_forked

N_CERTS = 3
# the phases of a pass, in order (reconciler/faults.py): before anything is recorded, between
# the renames, after the store records "deployed, hook owed", in the hook phase
PHASES = [
    "before_status@1",
    "after_key@2",
    "after_cert@1",
    "after_cert@3",
    "after_status@1",
    "before_hook@1",
    "hook_started@1",
    "before_hook@2",
]


class Site:
    """Three certificates from the embedded CA; c0 and c1 share one command, c2 has its own.
    Every hook run appends the sha256 of each certificate it ran for to hooks/<name>.log."""

    def __init__(self, base: Path):
        self.base = base
        self.out, self.state, self.hooks = base / "out", base / "state", base / "hooks"
        self.manifest = base / "m.json"
        self.hooks.mkdir(parents=True, exist_ok=True)
        self.script = base / "record.sh"
        self.script.write_text(
            f'for n in $RECONCILER_CERTIFICATES; do sha256sum < "{self.out}/$n.crt" | cut -d" " -f1 '
            f'>> "{self.hooks}/$n.log"; done\n'
        )
        self.version = 0

    def write_manifest(self) -> None:
        entries = [
            {
                "name": f"c{i}",
                "common_name": f"c{i}.owed.test",
                "sans": [f"v{self.version}.c{i}.owed.test"],
                "cert_path": str(self.out / f"c{i}.crt"),
                "key_path": str(self.out / f"c{i}.key"),
                "post_renewal_command": f"sh {self.script} {'shared' if i < 2 else 'own'}",
            }
            for i in range(N_CERTS)
        ]
        tmp = self.manifest.with_suffix(".new")
        tmp.write_text(json.dumps({"issuer": {"type": "local"}, "certificates": entries}))
        os.rename(tmp, self.manifest)

    def change(self) -> None:
        self.version += 1
        self.write_manifest()

    def argv(self, *extra: str) -> list[str]:
        return ["-m", str(self.manifest), "--state-dir", str(self.state), *extra]

    def unhooked(self) -> list[str]:
        """Certificates whose last hook run was not for the certificate now on disk."""
        out = []
        for i in range(N_CERTS):
            log = self.hooks / f"c{i}.log"
            lines = log.read_text().split() if log.exists() else []
            if not lines or lines[-1] != hashlib.sha256((self.out / f"c{i}.crt").read_bytes()).hexdigest():
                out.append(f"c{i}")
        return out


def run_cli(site: Site, argv: list[str], fault: str | None = None) -> tuple[int, str]:
    """(exit or -signal, stderr) of a forked pass, SIGKILLed at `fault`."""
    rc, _out, err = run_cli_forked(site.base, argv, fault)
    return rc, err


def sequences() -> list[tuple[str, ...]]:
    """Every phase as the one kill; every pair (pass 1, pass 2); for three kills every pair of
    phases in passes 2 and 3, with pass 1's phase rotating: each phase is killed in every pass."""
    seqs = [(p,) for p in PHASES]
    seqs += [(a, b) for a in PHASES for b in PHASES]
    n = len(PHASES)
    seqs += [(PHASES[(i + j) % n], PHASES[i], PHASES[j]) for i in range(n) for j in range(n)]
    return seqs


def test_an_owed_hook_survives_every_sequence_of_up_to_three_kills(tmp_path, capsys):
    from reconciler.desired import load_desired
    from reconciler.passes import Settings, snapshot
    from reconciler.status import StatusStore

    site = Site(tmp_path / "site")
    site.write_manifest()
    rc, err = run_cli(site, site.argv())
    assert rc == 0, err
    problems: list[str] = []
    kills = 0
    started = time.monotonic()
    for number, seq in enumerate(sequences()):
        site.change()  # pass 1 changes every certificate
        for n, phase in enumerate(seq):
            if n and (number + n) % 3 == 0:
                site.change()  # now and then a recovery pass changes the certificates again
            rc, err = run_cli(site, site.argv(), fault=phase)
            kills += rc == -signal.SIGKILL
            if "Traceback" in err:
                problems.append(f"{seq}: traceback in pass {n + 1}: {err[-800:]}")
        rc, err = run_cli(site, site.argv())
        if rc != 0:
            problems.append(f"{seq}: the pass after the kills exited {rc}: {err[-800:]}")
        if site.unhooked():
            problems.append(f"{seq}: the hook never ran for the certificate on disk: {site.unhooked()}")
        settings = Settings(manifest=site.manifest, state_dir=site.state)
        store = StatusStore(site.state)
        snap = snapshot(settings, load_desired(settings), store)
        serials = {n: (o.cert.serial if o.cert else None) for n, o in snap.observed.items()}
        if store.hooks_pending(serials) or any(p.actions for p in snap.plan.certificates):
            planned = [(p.cert.name, [a.action for a in p.actions]) for p in snap.plan.certificates if p.actions]
            problems.append(f"{seq}: not converged: owed {sorted(store.hooks_pending(serials))}, plan {planned}")
    with capsys.disabled():
        print(
            f"\nowed-hook kill sequences: {len(sequences())} ({kills} kills) "
            f"in {time.monotonic() - started:.0f}s; problems: {len(problems)}"
        )
    assert not problems, "\n".join(problems[:30])


def test_the_issue_10_sequence_kill_after_the_certificate_then_in_the_recovery_hook_phase(tmp_path):
    """The reported case: pass 1 killed after the certificate is replaced, pass 2 killed once
    its hook phase begins; pass 3 must still run the hook (it used to say "No changes")."""
    site = Site(tmp_path / "site")
    site.write_manifest()
    assert run_cli(site, site.argv())[0] == 0
    site.change()
    assert run_cli(site, site.argv(), fault="after_cert@3")[0] == -signal.SIGKILL
    assert run_cli(site, site.argv(), fault="before_hooks")[0] == -signal.SIGKILL
    assert site.unhooked() == ["c0", "c1", "c2"]
    rc, err = run_cli(site, site.argv())
    assert rc == 0, err
    assert site.unhooked() == []


def test_no_hooks_converges_the_files_records_the_hooks_as_owed_and_the_next_pass_runs_them(tmp_path):
    site = Site(tmp_path / "site")
    site.write_manifest()
    proc = reconcile(*site.argv("--no-hooks"), check=0)
    assert "--no-hooks" in proc.stderr
    assert all((site.out / f"c{i}.crt").exists() for i in range(N_CERTS))
    assert site.unhooked() == ["c0", "c1", "c2"], "a hook ran under --no-hooks"
    status = json.loads(reconcile("status", *site.argv("--output", "json")).stdout)
    assert [(r["name"], r["state"], r["hook_owed"], r["last_hook"]) for r in status["certificates"]] == [
        (f"c{i}", "hook pending", True, "skipped") for i in range(N_CERTS)
    ]
    # a second --no-hooks pass keeps them owed and issues nothing
    serials = [(site.out / f"c{i}.crt").read_bytes() for i in range(N_CERTS)]
    reconcile(*site.argv("--no-hooks"), check=0)
    assert [(site.out / f"c{i}.crt").read_bytes() for i in range(N_CERTS)] == serials
    assert site.unhooked() == ["c0", "c1", "c2"]
    reconcile(*site.argv(), check=0)
    assert site.unhooked() == []
    status = json.loads(reconcile("status", *site.argv("--output", "json")).stdout)
    assert {(r["state"], r["hook_owed"], r["last_hook"]) for r in status["certificates"]} == {("ready", False, "ok")}
    assert "No changes" in reconcile(*site.argv(), check=0).stdout


def test_a_crash_then_a_stopped_watcher_keeps_every_hook_it_did_not_run_owed(tmp_path):
    """The graceful variant: pass 1 is killed after the certificates are replaced; a
    `--watch` then starts, and is stopped (SIGTERM, as systemctl stop) while the first
    hook runs. The hook it left must still be owed, and the next pass must run it."""
    base = tmp_path / "site"
    out, hooks = base / "out", base / "hooks"
    hooks.mkdir(parents=True)
    started, go = base / "a-started", base / "go"
    record = (
        f'sha256sum < "{out}/$RECONCILER_CERTIFICATES.crt" | cut -d" " -f1 >> "{hooks}/$RECONCILER_CERTIFICATES.log"'
    )
    slow = f"touch {started}; i=0; while [ ! -e {go} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; {record}"
    manifest = base / "m.json"

    def write(version: int) -> None:
        manifest.write_text(
            json.dumps(
                {
                    "issuer": {"type": "local"},
                    "certificates": [
                        {
                            "name": n,
                            "common_name": f"{n}.owed.test",
                            "sans": [f"v{version}.{n}.owed.test"],
                            "cert_path": str(out / f"{n}.crt"),
                            "key_path": str(out / f"{n}.key"),
                            "post_renewal_command": cmd,
                        }
                        for n, cmd in (("a", slow), ("b", record))
                    ],
                }
            )
        )

    site = Site.__new__(Site)
    site.base, site.out, site.hooks, site.state, site.manifest = base, out, hooks, base / "state", manifest
    go.touch()
    write(0)
    assert run_cli(site, site.argv())[0] == 0
    go.unlink()
    started.unlink()
    write(1)
    assert run_cli(site, site.argv(), fault="after_cert@2")[0] == -signal.SIGKILL
    log_path = base / "watch.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_") and k != "NOTIFY_SOCKET"}
    env.update(NO_COLOR="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    with open(log_path, "wb") as log_file:
        watch = subprocess.Popen(
            [sys.executable, "-m", "reconciler", *site.argv("--watch", "-vv")],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            deadline = time.monotonic() + 60
            while not started.exists():
                assert watch.poll() is None and time.monotonic() < deadline, (
                    f"the first hook never started\n{log_path.read_text()}"
                )
                time.sleep(0.05)
            watch.send_signal(signal.SIGTERM)
            go.touch()
            assert watch.wait(timeout=30) == 0, log_path.read_text()
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait()
    text = log_path.read_text()
    assert "left for the next start" in text, text
    status = json.loads(reconcile("status", *site.argv("--output", "json")).stdout)
    assert {r["name"]: r["hook_owed"] for r in status["certificates"]} == {"a": False, "b": True}, text
    reconcile(*site.argv(), check=0)
    for n in ("a", "b"):
        lines = (hooks / f"{n}.log").read_text().split()
        assert lines[-1] == hashlib.sha256((out / f"{n}.crt").read_bytes()).hexdigest(), n
