"""Puts tests/ on sys.path for both suites (tests/shim, tests/e2e) and for any single test run:
the harness modules here (shim_harness, envoy_harness, http_client, ngx_wasm_harness) are shared
by the suites, bench/ and tests/soak.py. Fixtures live in each suite's own conftest.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
