from django.contrib import admin
from django.urls import path

from tests.context.views import create_payout, create_payout_async
from tests.trust.views import create_reading

urlpatterns = [
    path("admin/", admin.site.urls),
    path("trust/readings/", create_reading),
    path("context/shops/<int:shop_id>/payouts/", create_payout),
    path("context/shops/<int:shop_id>/payouts-async/", create_payout_async),
]
