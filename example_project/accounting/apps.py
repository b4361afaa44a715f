from django.apps import AppConfig


class AccountingConfig(AppConfig):
    name = "example_project.accounting"
    label = "accounting"
    default_auto_field = "django.db.models.BigAutoField"
