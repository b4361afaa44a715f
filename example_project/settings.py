"""Settings of the example project, read from the environment with django-environ.

Every variable is optional and documented in ``example_project/.env.example``;
copy it to ``example_project/.env`` (which is read if present) or export the
variables. The defaults run on a fresh machine: SQLite, no Celery broker
(delivery then runs through ``manage.py cdp_deliver``), and no data plane
(messages wait in the outbox as ``pending``).
"""

from pathlib import Path

import environ

from django_cdp.tasks import BEAT_SCHEDULE as CDP_BEAT_SCHEDULE
from example_project.tracking_plan import IDENTITY, MODELS

BASE_DIR = Path(__file__).resolve().parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env")  # optional: missing file is fine

SECRET_KEY = env("SECRET_KEY", default="django-cdp-example-insecure-key")
DEBUG = env.bool("DEBUG", default=True)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_cdp",
    "example_project.shops",
    "example_project.payouts",
    "example_project.accounting",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # The request's IP, user agent, page, locale, request id and the browser SDK's
    # anonymousId, in the context of every message written while it is handled.
    "django_cdp.middleware.RequestContextMiddleware",
]

ROOT_URLCONF = "example_project.urls"
WSGI_APPLICATION = "example_project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
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

# SQLite by default; PostgreSQL with DATABASE_URL=postgres://user:password@host:5432/name.
DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
}
# Each request is one transaction: a change and its outbox message commit together.
DATABASES["default"]["ATOMIC_REQUESTS"] = True
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # A worker draining the outbox writes while commands and requests write: with SQLite's
    # default (deferred) transactions, one that reads and then writes fails at once with
    # "database is locked" instead of waiting for the other writer. IMMEDIATE takes the write
    # lock at BEGIN, where the busy timeout applies.
    DATABASES["default"]["OPTIONS"] = {"transaction_mode": "IMMEDIATE", "timeout": 20}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"
USE_I18N = True
STATIC_URL = "/static/"

# --- Celery -----------------------------------------------------------------------------------
# Empty: no broker. Delivery then runs in the foreground with ``manage.py cdp_deliver``
# (``--loop`` to keep running). With a broker (e.g. Redis on this machine:
# redis://127.0.0.1:6379/0), commits kick the ``django_cdp.tasks.deliver`` task and a
# worker (``celery -A example_project worker``) sends the messages.
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="")
CELERY_TASK_IGNORE_RESULT = True
# The periodic sweep (the ``django_cdp.tasks.deliver`` task every 30 s): delivers whatever a
# kick missed (broker down at commit time, retries whose backoff has passed).
# Run it with ``celery -A example_project beat``.
CELERY_BEAT_SCHEDULE = {**CDP_BEAT_SCHEDULE}

# --- django-cdp -------------------------------------------------------------------------------
DJANGO_CDP = {
    # Where messages go: RudderStack's data plane, Segment's HTTP API, or the local
    # ``manage.py cdp_devserver``. Empty: messages wait in the outbox as pending.
    "WRITE_KEY": env("RUDDERSTACK_WRITE_KEY", default=""),
    "DATA_PLANE_URL": env("RUDDERSTACK_DATA_PLANE_URL", default=""),
    # Without a broker nothing could run the Celery task: deliver with ``cdp_deliver``.
    "DELIVERY": "celery" if CELERY_BROKER_URL else "manual",
    # Who is identified, and which changes become events: see tracking_plan.py.
    "IDENTITY": IDENTITY,
    "MODELS": MODELS,
    # The tracking plan: every message is validated against the event dictionary generated
    # from the settings (`manage.py cdp_dictionary`); violations are flagged on the message.
    "VALIDATION": "flag",
    # Events that are not model changes, sent with django_cdp.track(...).
    "EVENTS": {
        "Payout Report Sent": {
            "description": "The payout report e-mail went out to the merchant.",
            "properties": {
                "payout_id": {"type": "integer", "required": True},
                "recipients": {"type": "integer", "description": "How many addresses."},
            },
        },
    },
    # Identify the merchant's shop when one of its users logs in (daily actives).
    "LOGIN": {"owner": "example_project.shops.login.shop_of", "track_sign_in": True},
    # The browser source: the JavaScript SDK on every admin page, same userId as the backend.
    "FRONTEND": {
        "WRITE_KEY": env("CDP_FRONTEND_WRITE_KEY", default=""),
        "DATA_PLANE_URL": env("RUDDERSTACK_DATA_PLANE_URL", default=""),
        "SDK": "rudderstack",
        "SDK_URL": env("CDP_SDK_URL", default=""),
        "TRAITS": ["domain"],
    },
    # Behind one reverse proxy (nginx) set "trusted_proxies": 1 to read X-Forwarded-For.
    "REQUEST_CONTEXT": {"trusted_proxies": env.int("CDP_TRUSTED_PROXIES", default=0)},
    # A merchant who opted out of product analytics is not tracked at all.
    "CONSENT": "analytics_opt_in",
}

# django-cdp's lines reach the console through the root logger's handler, the only one they
# pass: a Celery worker replaces that handler with its own (worker_hijack_root_logger), so
# each line is printed once there too, in the worker's format. A handler on the "django_cdp"
# logger itself would print every line a second time in a worker.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "django_cdp": {"level": env("CDP_LOG_LEVEL", default="INFO")},
    },
}
