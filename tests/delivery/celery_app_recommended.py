"""The delivery tests' Celery app with django-cdp's recommended worker settings.

``celery -A tests.delivery.celery_app_recommended worker`` runs a worker as a
project following docs/delivery.md would: ``django_cdp.tasks.WORKER_SETTINGS``
applied. Only worker processes import this module.
"""

from django_cdp.tasks import WORKER_SETTINGS
from tests.delivery.celery_app import app

app.conf.update(WORKER_SETTINGS)
