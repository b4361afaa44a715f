"""An ENRICH_MESSAGE hook that fails for some rows (tests of per-row error reporting)."""


def fail_for_odd(message, instance):
    if instance is not None and instance.pk % 2:
        raise RuntimeError("enrichment failed")
    return message
