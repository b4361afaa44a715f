"""Render times of the admin's delivery log and health page over 1,000,000 messages.

    .venv/bin/python benchmarks/admin_render.py [--rows 1000000] [--repeat 20] [--no-vacuum]

Needs PostgreSQL on 127.0.0.1:5432 (user postgres; ``CDP_BENCH_PG_*`` override).
Creates the database ``cdp_bench_admin``, fills it with ``generate_series`` (80%
sent, 10% failed, 5% pending, 5% skipped, spread over 8 days, 11 event names and
a rare twelfth (one message in 10,000: ``Shop Deleted``), 50,000 users;
``next_attempt_at`` is the write time, as the column's default makes it) and the
hourly counters delivery would have kept for them, vacuums it (as autovacuum soon
does to a table that received that many rows: it sets the visibility map, which
index-only scans rely on; ``--no-vacuum`` measures the table before that), renders
each page ``--repeat`` times through Django's test client as a superuser and
prints the median and p95 wall time, then drops the database.
Self-contained (tests.settings on PostgreSQL), so it runs without the others.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
os.environ["CDP_TEST_DATABASE"] = "postgres"
for name in ("HOST", "PORT", "USER", "PASSWORD"):
    if f"CDP_BENCH_PG_{name}" in os.environ:
        os.environ[f"CDP_TEST_PG_{name}"] = os.environ[f"CDP_BENCH_PG_{name}"]

FILL_SQL = """
INSERT INTO django_cdp_message (message_id, type, event, user_id, payload, status, attempts,
    next_attempt_at, locked_by, last_error, last_response_code, created_at, last_attempt_at,
    sent_at, source_model, source_pk, violations)
SELECT 'bench-' || g,
       'track',
       CASE WHEN g %% 10000 = 0 THEN 'Shop Deleted'
            ELSE (ARRAY['Payout Created','Payout Updated','Payout Deleted','Shop Created',
                        'Shop Updated','Account Mapping Created','Account Mapping Updated',
                        'Account Mapping Deleted','Shop Settings Created',
                        'Shop Settings Updated','Shop Settings Deleted'])[1 + g %% 11] END,
       (g %% 50000)::text,
       '{"type":"track","event":"Payout Created","userId":"' || (g %% 50000) ||
           '","properties":{"amount":"12.50","currency":"EUR"}}',
       CASE WHEN g %% 20 < 16 THEN 'sent' WHEN g %% 20 < 18 THEN 'failed'
            WHEN g %% 20 = 18 THEN 'pending' ELSE 'skipped' END,
       1,
       now() - (%(rows)s - g) * interval '1 second' * (691200.0 / %(rows)s),
       '',
       CASE WHEN g %% 20 IN (16, 17) THEN '400 Bad Request: error ' || (g %% 7) ELSE '' END,
       CASE WHEN g %% 20 < 16 THEN 200 WHEN g %% 20 < 18 THEN 400 ELSE NULL END,
       now() - (%(rows)s - g) * interval '1 second' * (691200.0 / %(rows)s),
       now() - (%(rows)s - g) * interval '1 second' * (691200.0 / %(rows)s),
       CASE WHEN g %% 20 < 16
            THEN now() - (%(rows)s - g) * interval '1 second' * (691200.0 / %(rows)s)
                 + interval '1.5 seconds' END,
       'payouts.payout',
       (g %% 100000)::text,
       '[]'::jsonb
FROM generate_series(1, %(rows)s) AS g
"""

# What delivery's outcomes would have added to the hourly counters for these rows.
COUNT_SQL = """
INSERT INTO django_cdp_deliverycount (hour, status, n)
SELECT date_trunc('hour', created_at), status, count(*)
FROM django_cdp_message WHERE status IN ('sent', 'skipped', 'superseded')
GROUP BY 1, 2
"""

PAGES = [
    ("changelist", "/admin/django_cdp/message/"),
    ("changelist, status=failed", "/admin/django_cdp/message/?status__exact=failed"),
    ("changelist, search userId", "/admin/django_cdp/message/?q=4242"),
    ("changelist, event + 24h", "/admin/django_cdp/message/?event=Shop+Updated&created=24h"),
    ("changelist, common event", "/admin/django_cdp/message/?event=Payout+Created"),
    ("changelist, rare event", "/admin/django_cdp/message/?event=Shop+Deleted"),
    ("changelist, search event name", "/admin/django_cdp/message/?q=Payout+Created"),
    ("event dictionary", "/admin/django_cdp/message/dictionary/"),
    ("live data (JSON)", "/admin/django_cdp/message/live/data/"),
    ("health page", "/admin/django_cdp/message/health/"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument(
        "--no-vacuum",
        action="store_true",
        help="only ANALYZE the fill: the table as a burst of writes leaves it, before autovacuum",
    )
    args = parser.parse_args()

    import django

    django.setup()
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import setup_test_environment, teardown_test_environment

    setup_test_environment(debug=False)
    connection.settings_dict["TEST"]["NAME"] = "cdp_bench_admin"
    old_name = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    try:
        start = time.monotonic()
        with connection.cursor() as cursor:
            cursor.execute(FILL_SQL, {"rows": args.rows})
            cursor.execute(COUNT_SQL)
            cursor.execute(f"{'' if args.no_vacuum else 'VACUUM '}ANALYZE django_cdp_message")
        print(f"filled {args.rows:,} messages in {time.monotonic() - start:.1f} s")
        user = User.objects.create_superuser("bench", password="pw")
        client = Client()
        client.force_login(user)
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            pg = cursor.fetchone()[0]
        print(f"PostgreSQL {pg}, Django {django.get_version()}, {os.cpu_count()} cores")
        print(f"| page | median ms | p95 ms | ({args.repeat} renders, {args.rows:,} rows) |")
        print("| --- | ---: | ---: | |")
        for label, url in PAGES:
            assert client.get(url).status_code == 200, url  # warm up
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                response = client.get(url)
                times.append((time.perf_counter() - t0) * 1000)
                assert response.status_code == 200
            times.sort()
            p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
            print(f"| {label} | {statistics.median(times):.1f} | {p95:.1f} | |")
    finally:
        connection.close()
        connection.creation.destroy_test_db(old_name, verbosity=0)
        teardown_test_environment()


if __name__ == "__main__":
    main()
