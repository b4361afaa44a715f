"""``manage.py cdp_purge``: retention of the outbox, and erasure of one user.

``--older-than DAYS`` (default: the ``RETENTION_DAYS`` setting) deletes sent and
skipped messages older than that; pending, failed and blocked ones are never
deleted by age. ``--user-id ID`` deletes everything stored about one user. The
periodic task ``django_cdp.tasks.purge`` does the former on a beat schedule.
"""

from __future__ import annotations

import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS

from django_cdp import retention
from django_cdp.settings import cdp_settings


class Command(BaseCommand):
    help = (
        "Delete sent and skipped django-cdp messages older than --older-than DAYS (default "
        "RETENTION_DAYS), or with --user-id everything stored about one user."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            type=int,
            metavar="DAYS",
            help="Age in days (default: DJANGO_CDP['RETENTION_DAYS']).",
        )
        parser.add_argument(
            "--user-id",
            metavar="ID",
            help="Erasure request: delete every message and the traits digest of this userId.",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Count what would be deleted; delete nothing."
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=retention.BATCH_SIZE,
            help=f"Rows per DELETE (default {retention.BATCH_SIZE}).",
        )
        parser.add_argument(
            "--database", default=DEFAULT_DB_ALIAS, help="Database alias of the outbox."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        using: str = options["database"]
        dry_run: bool = options["dry_run"]
        if options["user_id"] is not None:
            if options["older_than"] is not None:
                raise CommandError("Give either --older-than or --user-id, not both.")
            self._erase(options["user_id"], using, dry_run)
            return
        days = options["older_than"]
        if days is None:
            days = cdp_settings.RETENTION_DAYS
            if days <= 0:
                self.stdout.write("RETENTION_DAYS is 0: messages are kept; nothing purged.")
                return
        if days < 0:
            raise CommandError("--older-than must be 0 or more days.")
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1.")
        result = retention.purge(
            datetime.timedelta(days=days),
            using=using,
            batch_size=options["batch_size"],
            dry_run=dry_run,
        )
        if dry_run:
            self.stdout.write(
                f"Dry run: {result.deleted} sent or skipped message(s) older than {days} day(s) "
                "would be deleted."
            )
        else:
            self.stdout.write(
                f"Deleted {result.deleted} sent or skipped message(s) older than {days} day(s) "
                f"in {result.batches} batch(es). Pending, failed and blocked messages are kept."
            )

    def _erase(self, user_id: str, using: str, dry_run: bool) -> None:
        if not user_id:
            raise CommandError("--user-id needs a non-empty userId.")
        result = retention.erase_user(user_id, using=using, dry_run=dry_run)
        verb = "would delete" if dry_run else "deleted"
        self.stdout.write(
            f"userId {user_id!r}: {verb} {result.messages} message(s) and "
            f"{result.digests} traits digest(s)."
        )
        self.stdout.write(self.style.WARNING(retention.ERASURE_NOTICE))
