"""URLconfs for the admin dictionary page: mounted by the project, and taken in by MessageAdmin."""

from django.contrib import admin
from django.urls import include, path

from django_cdp import admin_dictionary
from django_cdp.admin import MessageAdmin
from django_cdp.models import Message


class PlanMessageAdmin(MessageAdmin):
    """MessageAdmin with the two one-line hooks admin_dictionary offers."""

    list_filter = (*MessageAdmin.list_filter, admin_dictionary.FlaggedFilter)

    def get_urls(self) -> list:
        return [*admin_dictionary.get_urls(self.admin_site), *super().get_urls()]


site = admin.AdminSite(name="planadmin")
site.register(Message, PlanMessageAdmin)

urlpatterns = [
    path("admin/django_cdp/", include("django_cdp.admin_dictionary")),
    path("admin/", admin.site.urls),
    path("plan-admin/", site.urls),
]
