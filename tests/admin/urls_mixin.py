"""An admin site whose Payout admin uses :class:`AnalyticsEventsMixin` (for test_mixin)."""

from django.contrib import admin
from django.urls import path

from django_cdp.admin import AnalyticsEventsMixin, MessageAdmin
from django_cdp.models import Message
from example_project.payouts.admin import PayoutAdmin
from example_project.payouts.models import Payout


class EventsPayoutAdmin(AnalyticsEventsMixin, PayoutAdmin):
    pass


site = admin.AdminSite(name="mixinadmin")
site.register(Message, MessageAdmin)
site.register(Payout, EventsPayoutAdmin)

urlpatterns = [path("admin/", site.urls)]
