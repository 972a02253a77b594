"""Pure core of fedrec: data, models, metrics, privacy accounting, serialisation.

Nothing here imports ``server`` or ``client``; the edge package depends on it.
"""
