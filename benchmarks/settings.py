"""Settings for the benchmarks: the test suite's apps and tracking plan, on PostgreSQL.

The ``DJANGO_CDP`` dict and ``INSTALLED_APPS`` come from ``tests.settings`` (the
example project's tracking plan as the suite exercises it), plus ``auditlog``
for the comparison. The only database is PostgreSQL; each benchmark creates its
own database (``cdp_bench_*``) and drops it at the end. ``CDP_BENCH_PG_HOST``,
``_PORT``, ``_USER`` and ``_PASSWORD`` override the defaults (127.0.0.1:5432, postgres).
"""

import copy
import os

from tests import settings as _tests

SECRET_KEY = "django-cdp-benchmarks"
DEBUG = False  # no query log in the timed loops
USE_TZ = True
TIME_ZONE = _tests.TIME_ZONE
DEFAULT_AUTO_FIELD = _tests.DEFAULT_AUTO_FIELD
ROOT_URLCONF = _tests.ROOT_URLCONF
MIDDLEWARE = list(_tests.MIDDLEWARE)
TEMPLATES = copy.deepcopy(_tests.TEMPLATES)
STATIC_URL = "/static/"

INSTALLED_APPS = [*_tests.INSTALLED_APPS, "auditlog"]

DJANGO_CDP = copy.deepcopy(_tests.DJANGO_CDP)

_NAME = os.environ.get("CDP_BENCH_DB", "cdp_bench")
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _NAME,
        "USER": os.environ.get("CDP_BENCH_PG_USER", "postgres"),
        "PASSWORD": os.environ.get("CDP_BENCH_PG_PASSWORD", ""),
        "HOST": os.environ.get("CDP_BENCH_PG_HOST", "127.0.0.1"),
        "PORT": os.environ.get("CDP_BENCH_PG_PORT", "5432"),
        "TEST": {"NAME": _NAME},
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_cdp": {"handlers": ["console"], "level": "WARNING"}},
}
