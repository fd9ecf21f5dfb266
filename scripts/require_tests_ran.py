"""Fail when every test of a module was skipped: real-parts tests (Orthanc, Chromium) may skip where a
component cannot start, but CI must not go green without any of them having run.

    python scripts/require_tests_ran.py junit.xml tests/test_dicomweb.py [more test files]
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path


def ran_per_module(junit: Path) -> dict[str, int]:
    """Count test cases that were not skipped, per test module (``tests.test_x`` classnames)."""
    counts: dict[str, int] = {}
    for case in ElementTree.parse(junit).iter("testcase"):
        module = case.get("classname", "").split("[")[0]
        ran = case.find("skipped") is None
        counts[module] = counts.get(module, 0) + int(ran)
    return counts


def main(argv: list[str]) -> int:
    junit, files = Path(argv[0]), argv[1:]
    counts = ran_per_module(junit)
    missing = []
    for file in files:
        module = file.removesuffix(".py").replace("/", ".")
        if not any(counts[m] for m in counts if m == module or m.startswith(module + ".")):
            missing.append(file)
    if missing:
        print(f"require_tests_ran: no test ran in {', '.join(missing)} (all skipped or absent)", file=sys.stderr)
        return 1
    print(f"require_tests_ran: real-parts tests ran in {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
