"""ENRICH_MESSAGE hooks that make otherwise planned messages break the plan."""


def big_payouts_get_a_flag(message, instance):
    """An unplanned property on Payout events over 1000 (and nothing else)."""
    props = message.get("properties", {})
    if message.get("event", "").startswith("Payout") and props.get("amount", 0) > 1000:
        props["big"] = True
    return message


def nickname_trait(message, instance):
    if message["type"] == "identify":
        message["traits"]["nickname"] = "acme"
    return message


def amount_as_text(message, instance):
    props = message.get("properties", {})
    if "amount" in props:
        props["amount"] = str(props["amount"])
    return message
