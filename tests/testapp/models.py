"""Models for the cases the example project does not cover."""

import uuid

from django.db import models

from example_project.shops.models import Shop


class Customer(models.Model):
    """A shop's customer: orders reach their shop through it (a two-hop owner path)."""

    shop = models.ForeignKey(Shop, null=True, on_delete=models.CASCADE, related_name="customers")
    name = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.name


class Order(models.Model):
    class Channel(models.IntegerChoices):
        WEB = 1, "Web"
        POS = 2, "Point of sale"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="orders")
    total = models.DecimalField(max_digits=12, decimal_places=2)
    placed_at = models.DateTimeField(help_text="When the customer placed the order.")
    ship_by = models.DateField(null=True, blank=True)
    reference = models.UUIDField(default=uuid.uuid4)
    channel = models.IntegerField(choices=Channel.choices, default=Channel.WEB)
    extra = models.JSONField(default=dict, blank=True)
    note = models.TextField(blank=True)

    def __str__(self) -> str:
        return f"order {self.pk}"

    @property
    def total_with_tax(self):
        return self.total * 2

    def is_large(self):
        return self.total > 1000


class WorkspaceProject(models.Model):
    shop = models.ForeignKey(Shop, on_delete=models.CASCADE)
    title = models.CharField(max_length=100)
    secret = models.CharField(max_length=100, blank=True)

    class Meta:
        verbose_name = "workspace project"

    def __str__(self) -> str:
        return self.title


class Member(models.Model):
    """A user working for a shop: the login identify finds the shop through it."""

    user = models.OneToOneField("auth.User", on_delete=models.CASCADE, related_name="member")
    shop = models.ForeignKey(Shop, null=True, on_delete=models.CASCADE, related_name="members")

    def __str__(self) -> str:
        return f"{self.user_id} of {self.shop_id}"


class Reading(models.Model):
    """A shop's sensor reading: the trust suite's values that cannot always be sent.

    ``score`` may hold ``inf`` (not a JSON number), ``blob`` holds bytes (no JSON
    form), and the ``checked_label`` property raises when ``label`` says so.
    """

    shop = models.ForeignKey(Shop, null=True, on_delete=models.CASCADE, related_name="readings")
    score = models.FloatField(default=0.0)
    ratio = models.DecimalField(max_digits=8, decimal_places=2, default=0)
    label = models.CharField(max_length=50, default="ok")
    blob = models.BinaryField(default=b"", blank=True)

    def __str__(self) -> str:
        return f"reading {self.pk}"

    @property
    def checked_label(self) -> str:
        if self.label == "raise":
            raise ValueError("the label says raise")
        return self.label


class Gauge(models.Model):
    """A tracked column that a migration renames (``0005``): the triggers must not break writes
    while the installed triggers and the table disagree about it."""

    shop = models.ForeignKey(Shop, on_delete=models.CASCADE, related_name="gauges")
    level = models.IntegerField(default=0, db_column="level_v2")

    def __str__(self) -> str:
        return f"gauge {self.pk}"
