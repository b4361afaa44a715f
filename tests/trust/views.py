"""A view that writes a tracked row, for the ``ATOMIC_REQUESTS`` path of the trust suite."""

from __future__ import annotations

import json

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from example_project.shops.models import Shop
from tests.testapp.models import Reading


@csrf_exempt
def create_reading(request: HttpRequest) -> JsonResponse:
    values = json.loads(request.body)
    reading = Reading.objects.create(**values)
    # A query after the tracked write: it fails if the transaction was broken.
    return JsonResponse({"pk": reading.pk, "shops": Shop.objects.count()})
