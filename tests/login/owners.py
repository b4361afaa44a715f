"""LOGIN owner functions used by the tests."""

from example_project.shops.models import Shop


def by_email(user):
    return Shop.objects.filter(email=user.email).first()


def broken(user):
    raise RuntimeError("owner lookup failed")


def wrong_type(user):
    return user


NOT_CALLABLE = 3
