"""The example project's Celery app.

Run a worker from the repository root with ``celery -A example_project worker``
(and ``celery -A example_project beat`` for the periodic delivery sweep), with
``CELERY_BROKER_URL`` set in the environment or in ``example_project/.env``.
"""

import os

from celery import Celery

from django_cdp.tasks import WORKER_SETTINGS as CDP_WORKER_SETTINGS

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")

app = Celery("example_project")

# Every setting whose name starts with CELERY_ in Django's settings configures Celery.
app.config_from_object("django.conf:settings", namespace="CELERY")
# django-cdp's worker settings: after a broker outage, reconnect within 2 s (never give up) and
# sweep the outbox at once, so delivery resumes within seconds (docs/delivery.md).
app.conf.update(CDP_WORKER_SETTINGS)

# Finds the tasks.py of every installed app, django_cdp.tasks (the delivery task) included.
app.autodiscover_tasks()
