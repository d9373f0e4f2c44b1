"""Progress bars redraw often on a terminal and rarely in a log file."""
import io

from mlvicx_fast.progress import LOG_INTERVAL_S, progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_file_gets_rare_updates_and_terminal_the_usual_ones():
    log, term = io.StringIO(), _Terminal()
    with progress(total=3, file=log) as a, progress(total=3, file=term) as b:
        assert a.mininterval == LOG_INTERVAL_S >= 10
        assert a.maxinterval >= a.mininterval  # tqdm's monitor thread redraws after maxinterval quiet
        assert b.mininterval < 1
    with progress(total=3, file=log, mininterval=0.5) as c:
        assert c.mininterval == 0.5  # an explicit interval wins


def test_iterates_and_writes_to_the_given_stream():
    log = io.StringIO()
    assert list(progress(range(4), file=log, desc="work")) == [0, 1, 2, 3]
    assert "work" in log.getvalue() and "4/4" in log.getvalue()
