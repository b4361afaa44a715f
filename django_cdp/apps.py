from django.apps import AppConfig


class DjangoCdpConfig(AppConfig):
    name = "django_cdp"
    verbose_name = "Customer data (django-cdp)"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registering checks and wiring receivers never raises on a bad DJANGO_CDP
        # dict: broken entries are skipped here and reported by ``manage.py check``.
        from django.db.models.signals import post_migrate

        from django_cdp import checks, login
        from django_cdp.capture import context, signals, triggers

        checks.register()
        signals.connect()
        login.connect()
        post_migrate.connect(triggers.on_migrate, sender=self)
        del context  # imported for its connection_created receiver
