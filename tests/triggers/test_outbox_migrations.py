"""The outbox's index migrations on PostgreSQL (0007, 0008): built and dropped
``CONCURRENTLY``, so that a running application's writes are not blocked, and
correct after a concurrent build that failed half way."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.db import connection

pytestmark = pytest.mark.postgres


def index(name: str) -> tuple[bool, str] | None:
    """Whether the index ``name`` is valid, and its definition; None when there is none."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = %s",
            [name],
        )
        row = cursor.fetchone()
    return (row[0], row[1]) if row else None


@pytest.fixture
def at_0006(transactional_db):
    call_command("migrate", "django_cdp", "0006", verbosity=0)
    yield
    call_command("migrate", "django_cdp", verbosity=0)


def test_the_migrations_replace_three_indexes_with_one(at_0006):
    assert index("django_cdp_message_open") is not None
    assert index("django_cdp_message_event") is not None
    call_command("migrate", "django_cdp", verbosity=0)
    valid, definition = index("django_cdp_message_source_xid")
    assert valid
    assert definition.endswith("(source_model, source_pk, xid)")
    for gone in ("open", "source", "event"):
        assert index(f"django_cdp_message_{gone}") is None


def test_an_index_a_failed_concurrent_build_left_invalid_is_built_again(at_0006):
    with connection.cursor() as cursor:  # what a cancelled CREATE INDEX CONCURRENTLY leaves
        cursor.execute(
            "CREATE INDEX django_cdp_message_source_xid ON django_cdp_message (source_model)"
        )
        cursor.execute(
            "UPDATE pg_index SET indisvalid = false "
            "WHERE indexrelid = 'django_cdp_message_source_xid'::regclass"
        )
    call_command("migrate", "django_cdp", "0007", verbosity=0)
    valid, definition = index("django_cdp_message_source_xid")
    assert valid
    assert definition.endswith("(source_model, source_pk, xid)")
