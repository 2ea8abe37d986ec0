"""A test's subprocess read as it runs: both pipes pumped on threads, so neither fills and blocks the child."""
import threading


class Pumped:
    """The stdout and stderr lines of ``subprocess.Popen(..., stdout=PIPE, stderr=PIPE, text=True)``, collected as
    they come. ``said()``: what it printed (stderr's last 3,000 characters); once the process has exited, it first
    waits for both pipes to end, so the last line printed is in ``lines``."""

    def __init__(self, proc):
        self.proc, self.lines, self.errs = proc, [], []
        self._pumps = [threading.Thread(target=lambda s=stream, o=out: o.extend(iter(s.readline, "")), daemon=True)
                       for stream, out in ((proc.stdout, self.lines), (proc.stderr, self.errs))]
        for t in self._pumps:
            t.start()

    def said(self):
        if self.proc.poll() is not None:
            for t in self._pumps:
                t.join(10)
        return "".join(self.lines) + "".join(self.errs)[-3000:]
