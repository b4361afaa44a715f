"""Payouts: the money the platform sends to a merchant's bank, synced to accounting."""

from django.db import models

from example_project.shops.models import Shop


class Payout(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        IN_TRANSIT = "in_transit", "In transit"
        PAID = "paid", "Paid"
        FAILED = "failed", "Failed"

    shop = models.ForeignKey(Shop, on_delete=models.CASCADE, related_name="payouts")
    amount = models.DecimalField(max_digits=12, decimal_places=2, help_text="Net amount paid out.")
    currency = models.CharField(max_length=3, help_text="ISO 4217 currency code.")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.amount} {self.currency} to {self.shop_id}"
