"""Tears a cluster down when the process that made it dies without closing it (even SIGKILL).

    python -m heddle.cluster.reaper TAG OWNER_PID     (started by Cluster.start, own session)
"""

from __future__ import annotations

import sys
import time

from heddle.cluster import netns


def main(argv: list[str]) -> int:
    tag, owner = argv[0], int(argv[1])
    while netns.pid_alive(owner):
        if netns.read_state(tag) is None and not netns.leftovers(tag):
            return 0   # closed normally
        time.sleep(0.5)
    netns.destroy(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
