"""Named failure points for fault-injection tests; inert unless BATCHINFER_FAULT names one.

    BATCHINFER_FAULT="<point>[#<n>][:<action>]"

fires on the n-th time (default 1st) this process reaches `<point>`. Actions: `kill`
(default: SIGKILL this process, as a crash or `kill -9` would at that instant),
`pause=<seconds>` (hold still, e.g. for a test to kill something else meanwhile) and
`oserror=<errno>` (raise that OSError from then on, e.g. 28 for a full disk where a test
cannot mount a small filesystem).

Points: `planning` (driver, before the plan is recorded), `first-shard` (driver, after
the first shard is handed out), `committed` (driver, after a shard's commit is seen),
`manifest` (driver, before the manifest is written), `commit` (worker, before a part is
written), `part-committed` (worker, between a part appearing and its commit record).
"""

from __future__ import annotations

import errno
import os
import signal
import time

ENV = "BATCHINFER_FAULT"
_hits: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, action = spec.partition(":")
    target, _, nth = target.partition("#")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if action.startswith("oserror="):
        if _hits[name] >= int(nth or 1):
            code = int(action.removeprefix("oserror="))
            raise OSError(code, f"{os.strerror(code)} [{errno.errorcode[code]}] (fault point {name})")
        return
    if _hits[name] != int(nth or 1):
        return
    if action.startswith("pause="):
        time.sleep(float(action.removeprefix("pause=")))
    else:
        os.kill(os.getpid(), signal.SIGKILL)
