"""The device side: a Flower ClientApp and the ``fedrec-client`` command. Never imports ``server``."""
