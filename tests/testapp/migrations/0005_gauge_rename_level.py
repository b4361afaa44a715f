from django.db import migrations, models


class Migration(migrations.Migration):
    """Renames a tracked column (``level`` to ``level_v2``): the trigger engine's migration test."""

    dependencies = [
        ("testapp", "0004_gauge"),
    ]

    operations = [
        migrations.AlterField(
            model_name="gauge",
            name="level",
            field=models.IntegerField(db_column="level_v2", default=0),
        ),
    ]
