"""Progress bars for the package's long work: tqdm on stderr.

On a terminal tqdm redraws up to ten times a second. In a log file (a cluster job's output, a
redirected run) every redraw is appended, so there the bar updates every ``LOG_INTERVAL_S``
seconds instead: an hour of training adds a few kilobytes to the log, not megabytes. Callers
give ``set_postfix`` ``refresh=False`` (it otherwise redraws at once, whatever the interval); the
next ``update`` shows it, and tqdm's monitor thread waits as long before it forces a redraw.
"""
from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


def progress(iterable=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)`` writing to stderr, slowed to LOG_INTERVAL_S when that is not a
    terminal (an explicit ``mininterval`` wins)."""
    stream = kwargs.setdefault("file", sys.stderr)
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        # tqdm's monitor thread redraws a bar that has been quiet for maxinterval (10 s): with its
        # default a log still got a line every 10-20 s, with maxinterval = mininterval an extra
        # line now and then (the monitor and the next update both drawing); at twice it only
        # draws a bar whose steps take longer than that
        kwargs.setdefault("maxinterval", max(2 * kwargs["mininterval"], 10.0))
    return tqdm(iterable, **kwargs)
