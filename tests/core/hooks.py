"""ENRICH_MESSAGE hooks used by the tests."""


def add_app(message, instance):
    message["context"]["app"] = {"name": "example"}
    return message


def broken(message, instance):
    raise RuntimeError("enrichment failed")
