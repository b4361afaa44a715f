"""Views that write a tracked change, as a project's views would (sync and async)."""

from decimal import Decimal

from asgiref.sync import sync_to_async
from django.http import HttpResponse, JsonResponse

from django_cdp import scope
from example_project.payouts.models import Payout


def create_payout(request, shop_id: int) -> HttpResponse:
    payout = Payout.objects.create(shop_id=shop_id, amount=Decimal("10.00"), currency="EUR")
    return HttpResponse(str(payout.pk))


async def create_payout_async(request, shop_id: int) -> JsonResponse:
    """An async view: the context it sees, and a change written from it through the ORM."""
    seen = dict(scope.current().context)
    payout = await sync_to_async(Payout.objects.create)(
        shop_id=shop_id, amount=Decimal("10.00"), currency="EUR"
    )
    return JsonResponse({"pk": payout.pk, "context": seen})
