"""For tests that interrupt a child process with SIGINT."""
import signal


def default_sigint() -> None:
    """``preexec_fn`` for such a child: SIGINT back to its default action.

    A shell without job control starts ``cmd &`` with SIGINT ignored, the
    ignore is inherited, and Python then installs no KeyboardInterrupt handler
    at all: the interrupt tests would test nothing (they fail instead). The
    child gets the disposition a terminal's Ctrl-C finds."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
