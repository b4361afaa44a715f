"""``manage.py cdp_purge``: retention of the outbox, and erasure of one user.

``--older-than DAYS`` (default: the ``RETENTION_DAYS`` setting) deletes sent and
skipped messages older than that (0, as ``RETENTION_DAYS = 0``, keeps them all);
pending, failed and blocked ones are never deleted by age. ``--user-id ID``
deletes everything stored about one user. The periodic task
``django_cdp.tasks.purge`` does the former on a beat schedule.
"""

from __future__ import annotations

import datetime
from typing import Any

from django.core.management.base import CommandError, CommandParser

from django_cdp import retention
from django_cdp.management.base import CdpCommand, days, positive_int
from django_cdp.settings import cdp_settings


class Command(CdpCommand):
    help = (
        "Delete sent and skipped django-cdp messages older than --older-than DAYS (default "
        "RETENTION_DAYS), or with --user-id everything stored about one user."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            type=days,
            metavar="DAYS",
            help="Age in days (default: DJANGO_CDP['RETENTION_DAYS']); 0 keeps every message, "
            "as RETENTION_DAYS = 0 does.",
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
            type=positive_int,
            default=retention.BATCH_SIZE,
            help=f"Rows per DELETE (default {retention.BATCH_SIZE}).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        using: str = options["database"]
        dry_run: bool = options["dry_run"]
        if options["user_id"] is not None:
            if options["older_than"] is not None:
                raise CommandError("Give either --older-than or --user-id, not both.")
            self._erase(options["user_id"], using, dry_run)
            return
        age = options["older_than"]
        source = "--older-than"
        if age is None:
            age, source = cdp_settings.RETENTION_DAYS, "RETENTION_DAYS"
        if age <= 0:
            # 0 keeps everything, whichever says it (django_cdp.tasks.purge reads it so too):
            # "--older-than 0" must not delete every sent message.
            self.stdout.write(f"{source} is 0: messages are kept; nothing purged.")
            return
        result = retention.purge(
            datetime.timedelta(days=age),
            using=using,
            batch_size=options["batch_size"],
            dry_run=dry_run,
        )
        if dry_run:
            self.stdout.write(
                f"Dry run: {result.deleted} sent, skipped or superseded message(s) older than "
                f"{age} day(s) would be deleted."
            )
        else:
            self.stdout.write(
                f"Deleted {result.deleted} sent, skipped or superseded message(s) older than "
                f"{age} day(s) in {result.batches} batch(es). Pending, failed and blocked "
                "messages are kept."
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
