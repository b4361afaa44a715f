"""The outbox drops its ``(event, id)`` index.

Every delivered message's outcome is an update that cannot be HOT (its status
leaves the claim index), so it adds an entry to every index of the table; the
event index was one of six, and dropping it raised one delivery process's rate by
about a tenth. The admin reads one event's messages newest first along the
primary key, and searches an event name on its own (``django_cdp.admin.matching``).
Dropped ``CONCURRENTLY`` on PostgreSQL, so that writes are not blocked meanwhile.
"""

from django.db import migrations, models

INDEX = models.Index(fields=["event", "id"], name="django_cdp_message_event")


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX.name}")
    else:
        schema_editor.remove_index(apps.get_model("django_cdp", "Message"), INDEX)


def backwards(apps, schema_editor):
    schema_editor.add_index(apps.get_model("django_cdp", "Message"), INDEX)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("django_cdp", "0007_source_index_holds_xid"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(forwards, backwards)],
            state_operations=[
                migrations.RemoveIndex(model_name="message", name=INDEX.name),
            ],
        ),
    ]
