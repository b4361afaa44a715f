from django.apps import AppConfig


class ShopsConfig(AppConfig):
    name = "example_project.shops"
    label = "shops"
    default_auto_field = "django.db.models.BigAutoField"
