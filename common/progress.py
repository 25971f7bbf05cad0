"""The one progress protocol of the pack's long jobs.

A core function that runs for a while takes a ``progress`` object and calls ``progress.update(done, total)``
as it goes (``preview`` is an optional image to show) and ``progress.check_interrupt()`` between units of
work. In ComfyUI the node passes the host's implementation (a ProgressBar, and the user's interrupt raised
there); the command-line tools pass :class:`TqdmProgress`; tests and library callers get the no-op
:class:`Progress`. Ctrl-C in a CLI raises KeyboardInterrupt by itself, so the CLI's ``check_interrupt`` does
nothing.
"""


class Progress:
    """The no-op implementation and the interface: subclass and override both methods."""

    def update(self, done, total, preview=None):
        """``done`` of ``total`` units finished; ``preview``: an optional image (H, W, 3 uint8 or PIL)."""

    def check_interrupt(self):
        """Raise if the user asked to stop (the host's exception); return otherwise."""

    def close(self):
        """Called once when the job ends (tqdm closes its bar)."""


NO_PROGRESS = Progress()


class TqdmProgress(Progress):
    """A tqdm bar for the command-line tools (on stderr; silent when ``enabled`` is False)."""

    def __init__(self, desc, unit="it", enabled=True):
        self.desc, self.unit, self.enabled = desc, unit, enabled
        self._bar = None

    def update(self, done, total, preview=None):
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, dynamic_ncols=True)
        if total != self._bar.total:
            self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
