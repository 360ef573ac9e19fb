import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

pytest_plugins = ["stepca_ca", "tls_servers"]

# A test that starts a real step-ca reaches it through one of these fixtures (directly or
# through another fixture): its closure names them, so the marker follows the fixture and
# cannot be forgotten on a new test.
STEPCA_FIXTURES = frozenset({"step_ca", "other_step_ca", "step_ca_factory", "step_ca_binary"})

# Fixtures that cannot be set up without root: a test module's autouse `_root` (it chowns
# to other users, mounts, runs commands as `nobody`; fails, never skips, without root), the
# Proxmox stand-ins' `cluster` (busybox guests entered with chroot), and the serve-probe
# servers that run Debian's daemons under their own users: `postgres`, `postfix` (master as
# root, smtpd as postfix) and `dovecot` (login as dovenull). A single test that needs root is
# marked `root` by hand.
ROOT_FIXTURES = frozenset({"_root", "cluster", "postgres", "postfix", "dovecot"})


def pytest_collection_modifyitems(config, items):
    """Mark tests `stepca` / `root` from what they use, so `-m "not root and not stepca"`
    is a green loop for a contributor with neither; CI deselects nothing."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & STEPCA_FIXTURES:
            item.add_marker(pytest.mark.stepca)
        if used & ROOT_FIXTURES:
            item.add_marker(pytest.mark.root)


def pytest_runtest_setup(item):
    """A test marked `root` by hand (not through `_root`) fails without root, as the
    `_root` modules do: tests never skip."""
    if item.get_closest_marker("root") and os.geteuid() != 0:
        pytest.fail("this test needs root (it is marked `root`); deselect it with -m 'not root'", pytrace=False)


def pytest_terminal_summary(terminalreporter):
    """Figures the tests measured (helpers.figure), in a section after the -ra summary."""
    from helpers import FIGURES

    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
