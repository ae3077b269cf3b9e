"""Shared pytest configuration.

Tests import the installed packages ``derp`` and ``tailnet``; the test tree uses
``--import-mode=importlib`` so ``tests/derp`` does not shadow the ``derp`` package.
Async tests run on asyncio (``asyncio_mode = auto``); servers under test use uvloop
where the production code does.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
settings.load_profile("ci")
