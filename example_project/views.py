"""The example's one view outside the admin: what the data plane receives for a request.

``POST /demo/payouts/`` (or GET, for a browser) creates a payout for the first shop and
answers with the messages that change wrote to the outbox, as they will be sent: the
payout's track with the request's context (IP, user agent, page, locale, request id) and,
when the browser SDK's cookie is there, its ``anonymousId`` next to the shop's userId.
"""

from __future__ import annotations

from decimal import Decimal

from django.db import transaction
from django.http import HttpRequest, HttpResponse

from django_cdp.capture import deferred
from django_cdp.models import Message
from example_project.payouts.models import Payout
from example_project.shops.models import Shop


def demo_payout(request: HttpRequest) -> HttpResponse:
    shop = Shop.objects.order_by("pk").first()
    if shop is None:
        return HttpResponse("No shop yet: run `manage.py seed_demo` first.", status=404)
    with transaction.atomic():
        last = Message.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
        Payout.objects.create(shop=shop, amount=Decimal("12.50"), currency="EUR")
        # The trigger engine stores the statement; its message is written when delivery
        # runs, or now, for this answer (the signal engine has written it already).
        deferred.expand_own()
        written = Message.objects.filter(pk__gt=last).order_by("pk")
        payloads = [m.payload for m in written]  # the JSON text exactly as it will be sent
    body = '{"messages": [' + ",\n".join(payloads) + "]}"
    return HttpResponse(body, content_type="application/json")
