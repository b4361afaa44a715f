"""The merchant's accounting set-up: where each kind of payout line is booked."""

from django.db import models

from example_project.shops.models import Shop


class Mapping(models.Model):
    """Which ledger account a kind of payout line is booked to."""

    class Source(models.TextChoices):
        SALES = "sales", "Sales"
        FEES = "fees", "Fees"
        REFUNDS = "refunds", "Refunds"
        ADJUSTMENTS = "adjustments", "Adjustments"

    shop = models.ForeignKey(Shop, on_delete=models.CASCADE, related_name="mappings")
    source = models.CharField(max_length=20, choices=Source.choices)
    account_code = models.CharField(max_length=20, help_text="Ledger account code.")

    class Meta:
        verbose_name = "account mapping"
        constraints = [
            models.UniqueConstraint(fields=["shop", "source"], name="one_mapping_per_source")
        ]

    def __str__(self) -> str:
        return f"{self.source} -> {self.account_code}"


class ShopSettings(models.Model):
    """Per-merchant options of the app."""

    class Schedule(models.TextChoices):
        DAILY = "daily", "Daily"
        WEEKLY = "weekly", "Weekly"

    shop = models.OneToOneField(Shop, on_delete=models.CASCADE, related_name="settings")
    sync_enabled = models.BooleanField(default=True, help_text="Sync payouts to accounting.")
    payout_schedule = models.CharField(max_length=10, choices=Schedule.choices, default="daily")

    class Meta:
        verbose_name = "shop settings"
        verbose_name_plural = "shop settings"

    def __str__(self) -> str:
        return f"settings of {self.shop_id}"
