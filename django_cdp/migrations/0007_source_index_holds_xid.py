"""One index for an object's messages and for the capture triggers' lookups.

The capture triggers find the rows their own transaction wrote for an object by
``(source_model, source_pk, xid)``. Until now that was a partial index of rows
whose ``xid`` was set, and delivery cleared ``xid`` when it claimed a row; but
clearing an indexed column makes the claim's update non-HOT, so every trigger-written
message cost a new entry in every index of the table when it was claimed, on top of
the entry the partial index cost when it was written. Now ``xid`` stays on the row
and trails the keys of the object index the admin and backfill already needed: one
index fewer per message written, and the claim writes no indexed column.

On PostgreSQL the new index is built ``CONCURRENTLY`` (the migration is not atomic)
so that the writes of a running application, which its capture triggers extend with
outbox rows, are not blocked while it is built on a large outbox.
"""

from django.db import migrations, models

TABLE = "django_cdp_message"
NEW = models.Index(fields=["source_model", "source_pk", "xid"], name="django_cdp_message_source_xid")
OLD = [
    models.Index(fields=["source_model", "source_pk"], name="django_cdp_message_source"),
    models.Index(
        fields=["xid", "source_model", "source_pk"],
        condition=models.Q(xid__isnull=False),
        name="django_cdp_message_open",
    ),
]


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        # A concurrent build that failed (cancelled, deadlocked) leaves an invalid index
        # behind, which writes still maintain and queries never use: build it again.
        with schema_editor.connection.cursor() as cursor:
            cursor.execute(
                "SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE c.relname = %s AND pg_table_is_visible(c.oid)",
                [NEW.name],
            )
            row = cursor.fetchone()
        if row and row[0]:
            schema_editor.execute(f"DROP INDEX CONCURRENTLY {NEW.name}")
        schema_editor.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {NEW.name} "
            f"ON {TABLE} (source_model, source_pk, xid)"
        )
        for index in OLD:
            schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {index.name}")
        return
    message = apps.get_model("django_cdp", "Message")
    schema_editor.add_index(message, NEW)
    for index in OLD:
        schema_editor.remove_index(message, index)


def backwards(apps, schema_editor):
    message = apps.get_model("django_cdp", "Message")
    for index in OLD:
        schema_editor.add_index(message, index)
    schema_editor.remove_index(message, NEW)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("django_cdp", "0006_hot_claims_counting_indexes"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(forwards, backwards)],
            state_operations=[
                *[migrations.RemoveIndex(model_name="message", name=i.name) for i in OLD],
                migrations.AddIndex(model_name="message", index=NEW),
            ],
        ),
        migrations.AlterField(
            model_name="message",
            name="capture",
            field=models.JSONField(
                blank=True,
                editable=False,
                help_text="What the capture triggers remember about the row within its "
                "transaction (the action, the reference values of an update, an identify's "
                "traits digest); delivery clears it when it claims the row.",
                null=True,
            ),
        ),
        migrations.AlterField(
            model_name="message",
            name="xid",
            field=models.BigIntegerField(
                blank=True,
                editable=False,
                help_text="The id of the database transaction whose capture triggers wrote "
                "the row (empty for the signal engine's rows).",
                null=True,
            ),
        ),
    ]
