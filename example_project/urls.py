"""URLs of the example project: the admin is its UI (shops, payouts and the delivery log),
and one demo view shows the request context on the messages a change writes."""

from django.contrib import admin
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from django.views.generic import RedirectView

from example_project.views import demo_payout

urlpatterns = [
    path("admin/", admin.site.urls),
    # A demo, without authentication: never copy it into a real project.
    path("demo/payouts/", csrf_exempt(demo_payout)),
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
]
