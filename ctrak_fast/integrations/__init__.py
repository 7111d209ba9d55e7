"""Adapters that let other tools run ctrak_fast. Each module imports its tool on import:

- ``ctrak_fast.integrations.dattri``: :class:`CTRAKAttributor`, a dattri attributor
  (``pip install dattri``).
"""
