from django.contrib import admin

from example_project.shops.models import Plan, Shop


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = ["name", "monthly_price"]


@admin.register(Shop)
class ShopAdmin(admin.ModelAdmin):
    list_display = ["domain", "email", "plan", "active", "xero_connection_ok", "last_payout_at"]
    list_filter = ["plan", "active", "xero_connection_ok"]
    search_fields = ["domain", "email"]
