"""Fixtures shared by every test package."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def kit() -> object:
    """The guest kit (built once, cached across runs)."""
    from sanvisor.guestkit import build_kit

    return build_kit()
