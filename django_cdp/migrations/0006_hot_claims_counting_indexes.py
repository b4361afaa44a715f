"""The outbox's layout for delivery and the health page, on PostgreSQL.

* Room on each page for the claim's in-place (HOT) update. Delivery's claim writes
  only columns that no index holds (the lease, the attempt count), so PostgreSQL can
  write the row's new version on the same page without touching any index, if the
  page has room for it. With the default ``fillfactor`` (100) inserts fill every
  page, and each claim then costs a new entry in every index of the table. Existing
  pages keep their layout; rows written from now on leave room.
* The partial indexes of pending and of failed/blocked rows carry ``created_at`` and
  ``status`` (as trailing keys), so the health page counts them per hour from the indexes alone.
"""

from django.db import migrations, models

FILLFACTOR = 50


def set_fillfactor(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"ALTER TABLE django_cdp_message SET (fillfactor = {FILLFACTOR})")


def reset_fillfactor(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("ALTER TABLE django_cdp_message RESET (fillfactor)")


class Migration(migrations.Migration):
    dependencies = [
        ("django_cdp", "0005_withheldcount"),
    ]

    operations = [
        migrations.RunPython(set_fillfactor, reset_fillfactor, elidable=False),
        migrations.RemoveIndex(model_name="message", name="django_cdp_message_due"),
        migrations.RemoveIndex(model_name="message", name="django_cdp_message_attention"),
        migrations.AddIndex(
            model_name="message",
            index=models.Index(
                condition=models.Q(("status", "pending")),
                fields=["next_attempt_at", "id", "created_at", "status"],
                name="django_cdp_message_due",
            ),
        ),
        migrations.AddIndex(
            model_name="message",
            index=models.Index(
                condition=models.Q(("status__in", ["failed", "blocked"])),
                fields=["-id", "created_at", "status"],
                name="django_cdp_message_attention",
            ),
        ),
    ]
