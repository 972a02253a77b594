"""The one exception of the deployment package."""

from __future__ import annotations


class DeployError(RuntimeError):
    """A process did not start, a port never opened, or a run did not finish well."""
