"""Chart tests need Helm 4 from scripts/bootstrap.sh; fail early with the fix when it is missing."""

from __future__ import annotations

import pytest
from tests.tools import helm_binary


@pytest.fixture(autouse=True, scope="session")
def _helm_available() -> None:
    helm_binary()  # raises MissingToolError naming `make bootstrap`
