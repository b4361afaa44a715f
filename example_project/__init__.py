"""The example project: a Shopify-style payouts app tracked by django-cdp.

Loading the Celery app here (as Celery's Django guide does) makes
``@shared_task`` use it and lets ``celery -A example_project worker`` find it.
"""

from example_project.celery import app as celery_app

__all__ = ("celery_app",)
