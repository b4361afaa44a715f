"""A view that writes a tracked change, as a project's view would."""

from decimal import Decimal

from django.http import HttpResponse

from example_project.payouts.models import Payout


def create_payout(request, shop_id: int) -> HttpResponse:
    payout = Payout.objects.create(shop_id=shop_id, amount=Decimal("10.00"), currency="EUR")
    return HttpResponse(str(payout.pk))
