from django.contrib import admin

from example_project.accounting.models import Mapping, ShopSettings


@admin.register(Mapping)
class MappingAdmin(admin.ModelAdmin):
    list_display = ["shop", "source", "account_code"]
    list_filter = ["source"]
    list_select_related = ["shop"]
    search_fields = ["shop__domain", "account_code"]


@admin.register(ShopSettings)
class ShopSettingsAdmin(admin.ModelAdmin):
    list_display = ["shop", "sync_enabled", "payout_schedule"]
    list_filter = ["sync_enabled", "payout_schedule"]
    list_select_related = ["shop"]
