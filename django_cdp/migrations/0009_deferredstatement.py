"""Large statements captured by triggers wait here until delivery turns them into messages
(``DeferredStatement``, issue 9)."""

import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("django_cdp", "0008_no_event_index"),
    ]

    operations = [
        migrations.CreateModel(
            name="DeferredStatement",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "xid",
                    models.BigIntegerField(
                        help_text="The id of the transaction that wrote the statement."
                    ),
                ),
                (
                    "source_model",
                    models.CharField(
                        help_text="app_label.model_name of the changed objects.", max_length=100
                    ),
                ),
                (
                    "operation",
                    models.CharField(
                        choices=[("insert", "insert"), ("update", "update"), ("delete", "delete")],
                        max_length=10,
                    ),
                ),
                (
                    "expander",
                    models.CharField(
                        help_text="The generated function that turns the rows into messages.",
                        max_length=63,
                    ),
                ),
                (
                    "rows",
                    models.JSONField(
                        help_text="The changed rows as the database held them (an update's: new and old)."
                    ),
                ),
                ("row_count", models.PositiveIntegerField()),
                (
                    "stamp",
                    models.CharField(help_text="originalTimestamp of the messages.", max_length=40),
                ),
                ("message_id_prefix", models.CharField(max_length=20)),
                (
                    "ambient",
                    models.JSONField(
                        blank=True,
                        help_text="The django_cdp.context() of the statement.",
                        null=True,
                    ),
                ),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
            ],
            options={
                "verbose_name": "deferred statement",
                "verbose_name_plural": "deferred statements",
                "ordering": ["id"],
                "indexes": [models.Index(fields=["xid"], name="django_cdp_deferred_xid")],
            },
        ),
    ]
