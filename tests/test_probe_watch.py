"""`--watch` with a `serve` endpoint (issue 13): a command that exits 0 without reloading the
real nginx is retried with the hook backoff, pass after pass, until an edit of the manifest
gives it a command that reloads; then the service presents the file's certificate."""

from __future__ import annotations

import json

from helpers import load_cert
from reconciler.probe import probe
from test_probe_reload import document
from test_watch import wait_for, watch_factory  # noqa: F401  (fixture)

NOT_TAKEN = "exited 0 but the service did not take the new certificate"


def test_watch_retries_a_command_that_reloads_nothing_until_an_edit_makes_it_reload(tmp_path, nginx, watch_factory):  # noqa: F811
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(document(nginx, "true", settle="1s")))
    stand_in = probe(nginx.endpoint).serial
    watch = watch_factory(manifest)
    # caught at once, then retried by the backoff (10 s, then 20 s): at least twice
    wait_for(lambda: watch.log().count(NOT_TAKEN) >= 2, 120, "the command to be caught twice", watch)
    assert f"{nginx.connect} still serves serial {stand_in.upper()[:10]}" in watch.log()
    assert probe(nginx.endpoint).serial == stand_in

    issued = format(load_cert(nginx.cert).serial_number, "x")
    tmp = manifest.with_suffix(".new")
    tmp.write_text(json.dumps(document(nginx, nginx.reload_command)))
    tmp.rename(manifest)
    wait_for(lambda: probe(nginx.endpoint).serial == issued, 120, "nginx to present the issued certificate", watch)
    assert format(load_cert(nginx.cert).serial_number, "x") == issued  # the fix reissued nothing
    watch.stop()
