"""The example project's Celery app.

Run a worker from the repository root with ``celery -A example_project worker``
(and ``celery -A example_project beat`` for the periodic delivery sweep), with
``CELERY_BROKER_URL`` set in the environment or in ``example_project/.env``.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")

app = Celery("example_project")

# Every setting whose name starts with CELERY_ in Django's settings configures Celery.
app.config_from_object("django.conf:settings", namespace="CELERY")

# Finds the tasks.py of every installed app, django_cdp.tasks (the delivery task) included.
app.autodiscover_tasks()
