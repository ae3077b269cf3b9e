"""``derper --workers N``: a supervisor and N worker processes on one port.

Modules: :mod:`derp.workers.link` (sans-I/O link framing),
:mod:`derp.workers.stats` (counters across workers), :mod:`derp.workers.node`
(one worker's sibling links, asyncio), :mod:`derp.workers.supervisor` (starts,
watches and restarts the workers; forwards signals), :mod:`derp.workers.shared`
(``--max-connections`` and the accept limit as host totals: a file every worker maps).
"""

from __future__ import annotations

__all__: list[str] = []
