"""The example's tracking plan: who is identified, and which model changes become events.

Kept apart from ``settings.py`` (which reads the environment) so that django-cdp's own
test suite runs against exactly this plan, as a user would write it.
"""

#: The merchant is the identified customer: one userId per shop.
IDENTITY = {
    "model": "shops.Shop",
    "user_id": "id",
    "traits": {
        "domain": "domain",
        "email": "email",
        "xero_connection_ok": "xero_connection_ok",
        "plan": "plan__name",
    },
}

#: Each registered model emits "<Verbose Name> Created|Updated|Deleted" tracks.
MODELS = {
    "shops.Shop": {"properties": ["domain", "active", "xero_connection_ok"]},
    "payouts.Payout": {
        "owner": "shop",
        "properties": {"amount": "amount", "currency": "currency", "status": "status"},
    },
    "accounting.Mapping": {"owner": "shop", "properties": ["source", "account_code"]},
    "accounting.ShopSettings": {
        "owner": "shop",
        "properties": ["sync_enabled", "payout_schedule"],
        # Settings are not traits: a change need not re-identify the merchant.
        "identify": False,
    },
}
