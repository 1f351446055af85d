"""Session set-up of the test suite.

With ``RECNORM_REQUIRE_FUSED=1`` (the README's test command, ``./run test``, and so CI set it) the fused C++
kernels are built before any test is collected, and the session fails at once, naming the reason, when one
cannot be built: their tests would otherwise skip, and the suite would pass without testing them.
"""

from __future__ import annotations

import os
import sys
import time

# Tests live in folders that mirror the source (nn/, kernels/, experiments/, tools/); the shared helpers
# (registry_cases.py) sit here, beside this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("RECNORM_REQUIRE_FUSED") != "1":
        return
    from recnorm import kernels

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    built = kernels.extensions_built()
    if not built and reporter is not None:
        reporter.write_line("building recnorm's fused C++ kernels first (once per torch installation, about a "
                            "minute each)...")
    start = time.perf_counter()
    status = kernels.build_extensions()
    failed = {name: reason for name, reason in status.items() if reason}
    if failed:
        reasons = "; ".join(f"{name}: {reason if len(reason) < 240 else reason[:240] + ' ...'}"
                            for name, reason in failed.items())
        pytest.exit(
            "RECNORM_REQUIRE_FUSED=1, but the fused C++ kernels could not be built, so their tests would only be "
            "skipped. They need a C++ compiler and the Python headers (Debian: apt-get install g++ python3-dev); "
            f"to run the tests without them, set RECNORM_REQUIRE_FUSED=0. Reasons: {reasons}",
            returncode=3,
        )
    if not built and reporter is not None:
        reporter.write_line(f"built in {time.perf_counter() - start:.0f} s")
