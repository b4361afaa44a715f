"""Settings for django-cdp's own test suite.

``CDP_TEST_DATABASE=postgres`` runs the suite against the PostgreSQL server
named by ``CDP_TEST_PG_*`` (default: 127.0.0.1:5432, user postgres, trust
auth); anything else runs it on SQLite. A second alias, ``other``, checks that
messages follow the ``using`` of the change.
"""

import os

from example_project.tracking_plan import IDENTITY, MODELS

SECRET_KEY = "django-cdp-tests"
DEBUG = False
USE_TZ = True
TIME_ZONE = "Europe/Berlin"  # not UTC, so that conversions to UTC are exercised

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",  # the browser test's live server serves the admin's CSS
    "django_cdp",
    "example_project.shops",
    "example_project.payouts",
    "example_project.accounting",
    "tests.testapp",
]

if os.environ.get("CDP_TEST_DATABASE") == "postgres":
    default_db = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("CDP_TEST_PG_NAME", "test"),
        "USER": os.environ.get("CDP_TEST_PG_USER", "postgres"),
        "PASSWORD": os.environ.get("CDP_TEST_PG_PASSWORD", ""),
        "HOST": os.environ.get("CDP_TEST_PG_HOST", "127.0.0.1"),
        "PORT": os.environ.get("CDP_TEST_PG_PORT", "5432"),
    }
else:
    default_db = {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}

DATABASES = {
    "default": default_db,
    "other": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
}

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "/static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# The example project's tracking plan: the suite exercises it as users would write it.
DJANGO_CDP = {
    "WRITE_KEY": "",
    "DATA_PLANE_URL": "",
    "DELIVERY": "manual",
    # The suite's default engine; tests/core runs its behaviour tests under both engines on
    # PostgreSQL (the ``engine`` fixture), and tests/triggers tests the trigger engine.
    "CAPTURE": "signals",
    "IDENTITY": IDENTITY,
    "MODELS": MODELS,
}
