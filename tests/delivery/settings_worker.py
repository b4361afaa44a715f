"""Settings for the Celery worker processes started by the delivery tests.

The worker must use the very database the test process uses (pytest-django's
test database, a file for SQLite) and the data plane, write key and short
delays the test chose; the test passes them in the environment.
"""

import json
import os

from tests.settings import *  # noqa: F403
from tests.settings import DATABASES, DJANGO_CDP

_name = os.environ.get("CDP_WORKER_DB_NAME")
if _name:
    DATABASES["default"] = {**DATABASES["default"], "NAME": _name}
    if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
        DATABASES["default"]["OPTIONS"] = {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL",
        }

DJANGO_CDP = {**DJANGO_CDP, **json.loads(os.environ.get("CDP_WORKER_CDP", "{}"))}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_cdp": {"handlers": ["console"], "level": "INFO"}},
}
