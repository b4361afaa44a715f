"""Room on each page of the outbox for the claim's in-place (HOT) update, on PostgreSQL.

Delivery's claim writes only columns that no index holds (the lease, the attempt
count), so PostgreSQL can write the row's new version on the same page without
touching any index, if the page has room for it. With the default ``fillfactor``
(100) inserts fill every page, and each claim then costs a new entry in every index
of the table. Existing pages keep their layout; rows written from now on leave room.
"""

from django.db import migrations

FILLFACTOR = 50


def set_fillfactor(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"ALTER TABLE django_cdp_message SET (fillfactor = {FILLFACTOR})")


def reset_fillfactor(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("ALTER TABLE django_cdp_message RESET (fillfactor)")


class Migration(migrations.Migration):
    dependencies = [
        ("django_cdp", "0004_superseded_endpoint_counts"),
    ]

    operations = [
        migrations.RunPython(set_fillfactor, reset_fillfactor, elidable=False),
    ]
