import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

pytest_plugins = ["stepca_ca", "tls_servers"]



def pytest_terminal_summary(terminalreporter):
    """Figures the tests measured (helpers.figure), in a section after the -ra summary."""
    from helpers import FIGURES

    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
