"""How the example finds the shop of a user who logs in (``DJANGO_CDP["LOGIN"]``).

The example has no user-to-shop relation: a merchant's staff account shares the shop's
e-mail address. A real app would use a field path such as ``"profile__shop"`` instead.
"""

from __future__ import annotations

from example_project.shops.models import Shop


def shop_of(user) -> Shop | None:
    if not user.email:
        return None
    return Shop.objects.filter(email__iexact=user.email).first()
