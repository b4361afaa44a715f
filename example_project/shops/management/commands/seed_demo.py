"""Create demo data for the example project, one transaction per step.

Each step is what the app does in real life (a merchant installs the app, a
payout is sent, the Xero link breaks...). django-cdp turns every change of a
registered model into outbox messages written in the same transaction. Running
the command again reuses the shops, plans and mappings it made and adds payouts.
"""

from __future__ import annotations

from decimal import Decimal

from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from example_project.accounting.models import Mapping, ShopSettings
from example_project.payouts.models import Payout
from example_project.shops.models import Plan, Shop

PLANS = [("Starter", Decimal("19.00")), ("Growth", Decimal("49.00"))]

# Reserved ".example" names: demo data never names a real host.
SHOPS = [
    ("north-coffee.example", "owner@north-coffee.example", "Starter"),
    ("tidal-surf.example", "payouts@tidal-surf.example", "Starter"),
    ("maple-books.example", "hello@maple-books.example", "Growth"),
]

MAPPINGS = [(Mapping.Source.SALES, "200"), (Mapping.Source.FEES, "404")]

PAYOUTS = {
    "north-coffee.example": [(Decimal("1250.40"), "EUR"), (Decimal("310.00"), "EUR")],
    "tidal-surf.example": [(Decimal("980.15"), "AUD")],
    "maple-books.example": [(Decimal("4410.00"), "GBP")],
}


class _Rollback(Exception):
    pass


class Command(BaseCommand):
    help = "Create demo shops, payouts and account mappings (django-cdp writes the outbox)."

    def handle(self, *args, **options) -> None:
        from django_cdp.models import Message

        before = Message.objects.count()

        with transaction.atomic():
            plans = {}
            for name, price in PLANS:
                plans[name], created = Plan.objects.get_or_create(
                    name=name, defaults={"monthly_price": price}
                )
                self._say(f"plan {name}", created)

        shops = {}
        for domain, email, plan in SHOPS:
            with transaction.atomic():
                shops[domain], created = Shop.objects.get_or_create(
                    domain=domain, defaults={"email": email, "plan": plans[plan]}
                )
                ShopSettings.objects.get_or_create(shop=shops[domain])
            self._say(f"shop {domain} (plan {plan}) and its settings", created)

        for shop in shops.values():
            with transaction.atomic():
                made = [
                    Mapping.objects.get_or_create(
                        shop=shop, source=source, defaults={"account_code": code}
                    )[1]
                    for source, code in MAPPINGS
                ]
            self._say(f"account mappings of {shop.domain}", any(made))

        for domain, payouts in PAYOUTS.items():
            shop = shops[domain]
            for amount, currency in payouts:
                with transaction.atomic():
                    payout = Payout.objects.create(shop=shop, amount=amount, currency=currency)
                    # A payout that is paid in the same transaction: one "Created" event
                    # carrying the final status.
                    payout.status = Payout.Status.PAID
                    payout.save()
                    shop.last_payout_at = timezone.now()
                    shop.save(update_fields=["last_payout_at"])
                self.stdout.write(f"created payout {amount} {currency} for {domain} (paid)")

        with transaction.atomic():
            shop = Shop.objects.select_for_update().get(domain="north-coffee.example")
            if shop.xero_connection_ok:
                shop.xero_connection_ok = False
                shop.save()
                self.stdout.write(f"{shop.domain}: Xero connection lost (xero_connection_ok=False)")
            else:
                self.stdout.write(f"{shop.domain}: Xero connection already marked lost")

        with transaction.atomic():
            shop = Shop.objects.select_for_update().get(domain="tidal-surf.example")
            if shop.plan_id != plans["Growth"].pk:
                shop.plan = plans["Growth"]
                shop.save()
                self.stdout.write(f"{shop.domain}: upgraded to the Growth plan")
            else:
                self.stdout.write(f"{shop.domain}: already on the Growth plan")

        with transaction.atomic():
            mapping = Mapping.objects.select_for_update().get(
                shop=shops["maple-books.example"], source=Mapping.Source.FEES
            )
            mapping.account_code = "405" if mapping.account_code == "404" else "404"
            mapping.save()
        self.stdout.write(f"maple-books.example: fees now booked to {mapping.account_code}")

        try:
            with transaction.atomic():
                Shop.objects.create(domain="never-committed.example", email="x@never.example")
                raise _Rollback
        except _Rollback:
            self.stdout.write("rolled back the creation of never-committed.example (no message)")

        written = Message.objects.count() - before
        self.stdout.write(self.style.SUCCESS(f"done: {written} outbox message(s) written"))

    def _say(self, what: str, created: bool) -> None:
        self.stdout.write(f"{'created' if created else 'kept existing'} {what}")
