"""How simulator output is recognised: the simulator (a test double) serves every model under
this prefix, and a release refuses rows made by it unless simulated output is allowed. Kept
apart from the simulator so the release code does not import the server."""

from __future__ import annotations

MODEL_PREFIX = "lgt-simulator:"
