"""The house's size limits (docs/design.md, "Size limits"), kept by the suite so they stay true.

A function past these limits or a module past 450 lines is split along the pipeline, not
excused here. radon counts boolean operators too, so it is stricter than ruff's C901.
"""

from pathlib import Path

from radon.complexity import cc_visit

PACKAGE = Path(__file__).resolve().parent.parent / "reconciler"
MAX_COMPLEXITY = 20
# apply and the modules it is made of read like the plan they carry out
APPLY_MODULES = {"apply.py", "apply_reporter.py", "deploy.py", "targets.py"}
MAX_APPLY_COMPLEXITY = 15
MAX_MODULE_LINES = 450


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _blocks(path):
    for block in cc_visit(path.read_text()):
        yield block
        yield from getattr(block, "methods", ())


def test_no_function_in_the_package_is_above_its_complexity_ceiling():
    over = []
    for path in _modules():
        ceiling = MAX_APPLY_COMPLEXITY if path.name in APPLY_MODULES else MAX_COMPLEXITY
        for block in _blocks(path):
            if block.complexity > ceiling:
                over.append(f"{path.relative_to(PACKAGE)}:{block.lineno} {block.name} {block.complexity} > {ceiling}")
    assert not over, "\n".join(over)


def test_no_module_in_the_package_is_longer_than_450_lines():
    long = [
        f"{path.relative_to(PACKAGE)}: {n} lines"
        for path in _modules()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not long, "\n".join(long)
