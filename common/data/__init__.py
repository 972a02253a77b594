"""Data: loading and validating interaction files, splits and client partitions."""

from common.data.dataset import Interactions, ItemInfo
from common.data.errors import DataError, DataUnavailableError
from common.data.readers import load_interactions

__all__ = ["DataError", "DataUnavailableError", "Interactions", "ItemInfo", "load_interactions"]
