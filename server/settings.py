"""The run configuration (``RunSettings``), re-exported for the server side.

It lives in :mod:`client.config` because both apps read it and client/ imports nothing from
server/; this module keeps ``server.settings.RunSettings`` working.
"""

from client.config import (  # noqa: F401 - re-exports
    DATA_AUDIT_POLICIES,
    DP_MODES,
    PARTITIONERS,
    POLICIES,
    SERVER_OPTIMIZERS,
    RunSettings,
)
