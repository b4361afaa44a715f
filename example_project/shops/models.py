"""Merchants: the customers the SaaS identifies in its CDP."""

from django.db import models


class Plan(models.Model):
    name = models.CharField(max_length=50, unique=True)
    monthly_price = models.DecimalField(max_digits=8, decimal_places=2)

    def __str__(self) -> str:
        return self.name


class Shop(models.Model):
    """A merchant's store, connected to the app (the identified user)."""

    domain = models.CharField(max_length=255, unique=True, help_text="The shop's domain.")
    email = models.EmailField(help_text="Where the merchant receives payout reports.")
    plan = models.ForeignKey(Plan, null=True, blank=True, on_delete=models.SET_NULL)
    active = models.BooleanField(default=True, help_text="Whether the app is installed.")
    xero_connection_ok = models.BooleanField(
        default=True, help_text="Whether the link to the merchant's Xero organisation works."
    )
    analytics_opt_in = models.BooleanField(
        default=True,
        help_text="Whether the merchant agreed to product analytics (DJANGO_CDP['CONSENT']).",
    )
    last_payout_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.domain

    def payout_count(self) -> int:
        """How many payouts the shop has had (usable as a computed trait)."""
        return self.payouts.count()
