"""The outbox: every message django-cdp will send, and the last traits sent per user.

A :class:`Message` row is written in the same database transaction as the model
change it describes, so a change and its message commit or roll back together.
Delivery workers claim due rows, send them and record the outcome on the row,
which makes the table the delivery log too.
"""

from __future__ import annotations

import json
from datetime import datetime
from datetime import timezone as dt_timezone
from typing import Any

from django.db import connections, models
from django.db.models import Q
from django.db.models.functions import Now
from django.utils import timezone


class Message(models.Model):
    """One Segment/RudderStack message, from the moment it is written until it is sent."""

    class Type(models.TextChoices):
        TRACK = "track", "track"
        IDENTIFY = "identify", "identify"

    class Status(models.TextChoices):
        #: Waiting for delivery (due at ``next_attempt_at``), or leased by a worker.
        PENDING = "pending", "pending"
        #: Accepted by the data plane.
        SENT = "sent", "sent"
        #: Dead letter: refused by the data plane, out of attempts, or unsendable.
        FAILED = "failed", "failed"
        #: Kept back by tracking-plan validation; never sent.
        BLOCKED = "blocked", "blocked"
        #: Recorded while sending is switched off (``SEND = False``).
        SKIPPED = "skipped", "skipped"
        #: An identify never sent because a newer identify of the same user was: only the
        #: latest traits go out, and never after newer ones.
        SUPERSEDED = "superseded", "superseded"

    message_id = models.CharField(
        "messageId",
        max_length=64,
        help_text="Fixed when the row is written and reused on every retry, so the data plane "
        "can drop duplicates.",
    )
    type = models.CharField(max_length=16, choices=Type.choices)
    event = models.CharField(max_length=200, blank=True)
    user_id = models.CharField("userId", max_length=255, blank=True)
    payload = models.TextField(
        help_text="The message exactly as it is sent (compact JSON); delivery only adds sentAt."
    )
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(
        # The database's clock, like every comparison with it (the claim's ``<= NOW()``):
        # an application server whose clock runs ahead cannot write rows that are not due yet.
        db_default=Now(),
        help_text="When the message is next due. Every postponement (backoff, lease, "
        "configuration error) is recorded here.",
    )
    locked_until = models.DateTimeField(null=True, blank=True)
    locked_by = models.CharField(max_length=100, blank=True)
    last_error = models.TextField(blank=True)
    last_response_code = models.PositiveSmallIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    source_model = models.CharField(
        max_length=100, blank=True, help_text="app_label.model_name of the changed object."
    )
    source_pk = models.CharField(
        max_length=64,
        blank=True,
        help_text="Primary key of the changed object (for an identify, the owner).",
    )
    violations = models.JSONField(
        default=list,
        blank=True,
        help_text="Tracking-plan violations found when the message was written "
        "(RudderStack's names: Unplanned-Event, Required-Missing, ...); empty when it conforms.",
    )
    xid = models.BigIntegerField(
        null=True,
        blank=True,
        editable=False,
        help_text="The id of the database transaction whose capture triggers wrote the row "
        "(empty for the signal engine's rows).",
    )
    capture = models.JSONField(
        null=True,
        blank=True,
        editable=False,
        help_text="What the capture triggers remember about the row within its transaction "
        "(the action, the reference values of an update, an identify's traits digest); "
        "delivery clears it when it claims the row.",
    )

    class Meta:
        verbose_name = "message"
        verbose_name_plural = "messages"
        ordering = ["-id"]
        # Every index is paid for twice per message (when the row is written, and at its
        # outcome: a status change is never a HOT update), so there are only these, each
        # for a query that needs it, and no LIKE-pattern twins (no `unique=True` /
        # `db_index=True` on text columns). The claim writes only columns no index holds.
        constraints = [
            models.UniqueConstraint(fields=["message_id"], name="django_cdp_message_message_id"),
        ]
        indexes = [
            # The claim query: pending rows whose next_attempt_at has passed, in that order.
            # Partial, so it holds only unfinished rows however many sent rows pile up.
            # ``created_at`` and ``status`` trail the keys (``id`` is unique, so the order
            # is the same) so that the health page counts pending rows per hour from the
            # index alone (an index-only scan), without reading a heap page per row;
            # neither changes at a claim. Trailing keys rather than ``include``, which
            # SQLite would ignore with a warning at every ``migrate``.
            models.Index(
                fields=["next_attempt_at", "id", "created_at", "status"],
                condition=Q(status="pending"),
                name="django_cdp_message_due",
            ),
            # Dead letters and blocked messages, newest first in the delivery log, and
            # counted per hour by the health page from the index alone, like pending.
            models.Index(
                fields=["-id", "created_at", "status"],
                condition=Q(status__in=["failed", "blocked"]),
                name="django_cdp_message_attention",
            ),
            # Exact-match search and per-user erasure. There is no index on ``event``: it
            # would take a new entry at each message's outcome (a tenth of what one
            # delivery process drains per second), and the admin reads one event's
            # messages newest first along the primary key instead (see
            # ``django_cdp.admin.matching``).
            models.Index(fields=["user_id", "id"], name="django_cdp_message_user_id"),
            # One object's messages (the admin's object view, backfill's dedupe), and the
            # capture triggers' lookup of the rows their own transaction wrote for an
            # object (``xid`` last, an exact match). ``xid`` stays on a row once it is
            # written, so claiming a row changes no indexed column (a HOT update).
            models.Index(
                fields=["source_model", "source_pk", "xid"], name="django_cdp_message_source_xid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event or self.type} {self.message_id}"

    @property
    def data(self) -> dict[str, Any]:
        """The stored payload as a dict."""
        return json.loads(self.payload)


class TraitsDigestQuerySet(models.QuerySet["TraitsDigest"]):
    """The one place that records and forgets the traits last identified per user.

    Writers record a digest with the identify that carries it (:meth:`upsert`);
    delivery forgets it when that identify is dead-lettered, the writer when it
    is discarded in its transaction, and erasure with the user (:meth:`forget`),
    so that the next change sends the traits again. Use it through the
    database of the change: ``TraitsDigest.objects.using(alias).upsert(...)``.
    """

    def upsert(self, entries: list[tuple[str, str, str]]) -> None:
        """Record ``(user_id, digest, message_id)`` per user, replacing what was there."""
        if not entries:
            return
        now = timezone.now()
        rows = [
            TraitsDigest(user_id=u, digest=d, message_id=m, updated_at=now) for u, d, m in entries
        ]
        self.bulk_create(
            rows,  # type: ignore[arg-type]  # django-stubs leaves _Model unbound in QuerySet methods called on self
            update_conflicts=True,
            unique_fields=["user_id"],
            update_fields=["digest", "message_id", "updated_at"],
        )

    def forget(self, user_id: str, message_id: str | None = None) -> int:
        """Forget a user's digest; with ``message_id``, only while that identify carries it."""
        queryset = self.filter(user_id=user_id)
        if message_id is not None:
            queryset = queryset.filter(message_id=message_id)
        return queryset.delete()[0]

    def forget_identifies(self, identifies: list[tuple[str, str]]) -> int:
        """Forget the digests carried by these ``(user_id, message_id)`` identifies."""
        if not identifies:
            return 0
        match = Q()
        for user_id, message_id in identifies:
            match |= Q(user_id=user_id, message_id=message_id)
        return self.filter(match).delete()[0]


class TraitsDigest(models.Model):
    """The digest of the traits last identified for a user.

    It lets django-cdp skip an identify whose traits have not changed, across
    processes and restarts. It is written in the same transaction as the
    identify it describes, cleared when that identify is dead-lettered (so the
    traits are sent again), and never purged with old messages.
    """

    user_id = models.CharField("userId", max_length=255, primary_key=True)
    digest = models.CharField(max_length=64)
    message_id = models.CharField(
        "messageId", max_length=64, help_text="The identify message that carried these traits."
    )
    updated_at = models.DateTimeField(default=timezone.now)

    objects = TraitsDigestQuerySet.as_manager()

    class Meta:
        verbose_name = "traits digest"
        verbose_name_plural = "traits digests"

    def __str__(self) -> str:
        return f"{self.user_id}: {self.digest[:12]}"


class DeliveryAttempt(models.Model):
    """One failed delivery attempt of a message: what the data plane answered, or why nothing.

    Only failures are recorded. A success is already on the :class:`Message` row
    (``sent_at``, ``last_response_code``), and the success path is the one that
    runs tens of thousands of times a second, so it writes nothing here; a
    failed request costs one extra ``INSERT`` (a ``bulk_create`` for its rows) in
    the transaction that records its outcome. Rows go with their message
    (``CASCADE``): retention purges and per-user erasure remove them too.
    """

    class Outcome(models.TextChoices):
        #: 429, 5xx, other unexpected codes, timeouts, connection errors: due again later.
        RETRY = "retry", "retry"
        #: 401/403/404: write key, source or URL; the attempt was given back.
        CONFIG_ERROR = "config_error", "configuration error"
        #: 400/413 for this message alone (after bisection): the data plane refused it.
        REFUSED = "refused", "refused"
        #: The last allowed attempt failed too: the message is a dead letter now.
        DEAD_LETTER = "dead_letter", "dead letter"

    #: How much of a response body an attempt keeps.
    EXCERPT_CHARS = 500

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="delivery_attempts")
    number = models.PositiveIntegerField(help_text="The message's attempt number at the time.")
    at = models.DateTimeField(
        # The database clock, like every time delivery records.
        db_default=Now(),
        help_text="When the outcome was recorded (just after the response).",
    )
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    response_code = models.PositiveSmallIntegerField(null=True, blank=True)
    response_excerpt = models.TextField(
        blank=True, help_text="The start of the response body (write key masked)."
    )
    error = models.TextField(
        blank=True, help_text="Why no response arrived (timeout, connection error)."
    )
    duration_ms = models.PositiveIntegerField(
        null=True, blank=True, help_text="How long the HTTP request took."
    )
    worker = models.CharField(max_length=100, blank=True, help_text="The claim (locked_by).")

    class Meta:
        verbose_name = "delivery attempt"
        verbose_name_plural = "delivery attempts"
        # No extra index: the only reader is the detail page, which reads the attempts of
        # one message through the foreign key's index.

    def __str__(self) -> str:
        return f"attempt {self.number} of message {self.message_id}: {self.outcome}"


class DeliveryEndpoint(models.Model):
    """What delivery knows about one data plane: healthy, or failing since when and until when.

    5xx, 429, timeouts and connection errors say the data plane is unwell, not the
    messages: delivery as a whole backs off, recorded here in the database so that
    every worker (on every host) shares it, and one worker at a time probes with a
    small batch when ``next_try_at`` comes. A row with ``failures = 0`` (or no row)
    is a healthy data plane. Keyed by the data plane URL, in the outbox's database.
    """

    url = models.CharField("data plane URL", max_length=500, primary_key=True)
    failures = models.PositiveIntegerField(
        default=0, help_text="Failed requests in a row; 0 while the data plane answers."
    )
    next_try_at = models.DateTimeField(
        db_default=Now(),
        help_text="No request before this time (backoff, or the current probe's lease).",
    )
    failing_since = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    last_response_code = models.PositiveSmallIntegerField(null=True, blank=True)

    class Meta:
        verbose_name = "delivery endpoint"
        verbose_name_plural = "delivery endpoints"

    def __str__(self) -> str:
        return f"{self.url}: {'failing' if self.failures else 'healthy'}"


class DeliveryCountQuerySet(models.QuerySet):
    """The one place that adds to the hourly outcome counters."""

    def add(self, counts: dict[tuple[datetime, str], int]) -> None:
        """Add ``n`` to the counter of each ``(hour, status)``, in one upsert.

        An increment, not ``bulk_create(update_conflicts=...)`` (which overwrites):
        two workers recording outcomes of the same hour must add up. Call it inside
        the transaction that records the outcome, so the counters never drift from it.
        """
        counts = {key: n for key, n in counts.items() if n}
        if not counts:
            return
        table = self.model._meta.db_table
        connection = connections[self.db]
        quote = connection.ops.quote_name
        values = ", ".join(["(%s, %s, %s)"] * len(counts))
        params: list[Any] = []
        for (hour, status), n in sorted(counts.items()):
            params += [connection.ops.adapt_datetimefield_value(hour), status, n]
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {quote(table)} (hour, status, n) VALUES {values} "
                f"ON CONFLICT (hour, status) DO UPDATE SET n = {quote(table)}.n + excluded.n",
                params,
            )


def count_hour(moment: datetime) -> datetime:
    """The counter bucket of a message: the UTC hour it was written in."""
    return moment.astimezone(dt_timezone.utc).replace(minute=0, second=0, microsecond=0)


class DeliveryCount(models.Model):
    """How many messages written in an hour were sent, skipped or superseded.

    Delivery adds to it in the transaction that records those outcomes, so the
    health page reads a week of them from at most 168 x 3 small rows instead of
    counting a week of messages (a million rows took 670 ms). The other statuses
    are counted from the messages themselves, from their partial indexes alone
    (index-only scans; both carry ``created_at`` and ``status``): ``pending`` (the
    due index), ``failed`` and ``blocked`` (the attention index), which also the
    writers set in the user's transaction (where a shared counter row would make
    concurrent saves wait for each other) and the admin's requeue changes.
    """

    #: The statuses counted here; only delivery sets them.
    STATUSES = ("sent", "skipped", "superseded")

    hour = models.DateTimeField(help_text="The UTC hour the messages were written in.")
    status = models.CharField(max_length=10)
    n = models.PositiveBigIntegerField(default=0)

    objects = DeliveryCountQuerySet.as_manager()

    class Meta:
        verbose_name = "delivery count"
        verbose_name_plural = "delivery counts"
        constraints = [
            models.UniqueConstraint(fields=["hour", "status"], name="django_cdp_count_hour_status")
        ]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H}:00 {self.status}: {self.n}"


class WithheldCount(models.Model):
    """How many track events were not written in an hour because their owner has no consent
    (``DJANGO_CDP["CONSENT"]``): the health page shows them, the messages are never stored.

    Writers only insert (a row per withholding statement or save, summed when read): an
    upsert of one counter row per hour and event would make concurrent transactions of
    different owners wait for each other's commit, and could deadlock them.
    """

    hour = models.DateTimeField(help_text="The UTC hour the events were withheld in.")
    event = models.CharField(max_length=200)
    n = models.PositiveIntegerField(default=1)

    class Meta:
        verbose_name = "withheld count"
        verbose_name_plural = "withheld counts"
        indexes = [models.Index(fields=["hour"], name="django_cdp_withheld_hour")]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H}:00 {self.event}: {self.n}"


class DeferredStatement(models.Model):
    """The rows of one statement (or a part of it: at most 10,000 rows), written by a capture
    trigger, not yet messages.

    A statement (a ``save()``, ``QuerySet.update()``, ``bulk_create``, ``DELETE``) that
    changes at least ``DEFER_STATEMENT_ROWS`` rows (by default 1: every statement) of a
    model whose messages say only what is on the row itself (see
    :func:`django_cdp.capture.triggers.deferrable`) is not turned into messages inside the
    user's statement: the trigger stores the statement's rows here, in the same
    transaction, and delivery turns them into messages
    (:func:`django_cdp.capture.deferred.expand`) before it claims the next batch. A later
    statement of the same transaction that cannot be deferred turns them into messages
    first, so the rules of one transaction (one event per object, changes that cancel out)
    hold as for any other write. Nothing here is sent; a row goes when its messages are
    written. ``created_at`` is when its transaction began: its messages are due from then.
    """

    class Operation(models.TextChoices):
        INSERT = "insert", "insert"
        UPDATE = "update", "update"
        DELETE = "delete", "delete"

    xid = models.BigIntegerField(help_text="The id of the transaction that wrote the statement.")
    source_model = models.CharField(
        max_length=100, help_text="app_label.model_name of the changed objects."
    )
    operation = models.CharField(max_length=10, choices=Operation.choices)
    expander = models.CharField(
        max_length=63, help_text="The generated function that turns the rows into messages."
    )
    rows = models.JSONField(
        help_text="The changed rows as the database held them (an update's: new and old)."
    )
    row_count = models.PositiveIntegerField()
    stamp = models.CharField(max_length=40, help_text="originalTimestamp of the messages.")
    message_id_prefix = models.CharField(max_length=20)
    ambient = models.JSONField(
        null=True, blank=True, help_text="The django_cdp.context() of the statement."
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "deferred statement"
        verbose_name_plural = "deferred statements"
        ordering = ["id"]
        # A later statement of the same transaction finds its own rows by xid.
        indexes = [models.Index(fields=["xid"], name="django_cdp_deferred_xid")]

    def __str__(self) -> str:
        return f"{self.source_model} {self.operation} of {self.row_count} rows"
