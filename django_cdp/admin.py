"""The delivery log: the outbox, read-only, in the Django admin."""

from __future__ import annotations

from django.contrib import admin

from django_cdp.models import Message


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "type",
        "event",
        "user_id",
        "status",
        "attempts",
        "last_response_code",
        "sent_at",
    )
    list_filter = ("status", "type")
    search_fields = ("=user_id", "=message_id", "event")
    ordering = ("-id",)
    show_full_result_count = False

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return request.user.is_superuser
