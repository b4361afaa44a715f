from django.contrib import admin
from django.urls import path

from tests.trust.views import create_reading

urlpatterns = [
    path("admin/", admin.site.urls),
    path("trust/readings/", create_reading),
]
