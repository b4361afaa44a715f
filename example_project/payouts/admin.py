from django.contrib import admin

from example_project.payouts.models import Payout


@admin.register(Payout)
class PayoutAdmin(admin.ModelAdmin):
    list_display = ["id", "shop", "amount", "currency", "status", "created_at"]
    list_filter = ["status", "currency"]
    list_select_related = ["shop"]
    search_fields = ["shop__domain"]
