"""Capture: how a change of a registered model becomes rows in the outbox.

* :mod:`~django_cdp.capture.signals`: the signal engine (Django's model signals).
* :mod:`~django_cdp.capture.state`: the per-transaction state of the signal engine.
* :mod:`~django_cdp.capture.owners`: owners, their traits and identifies.
* :mod:`~django_cdp.capture.rows`: building an outbox row, for every writer.
"""
