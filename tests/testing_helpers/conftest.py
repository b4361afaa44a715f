"""The ``cdp_messages`` fixture, imported as a project would (or ``pytest_plugins`` at the root)."""

from django_cdp.testing import cdp_messages  # noqa: F401
