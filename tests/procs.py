"""Helpers for tests that run a server subprocess: its output read as it runs, a free port, and waiting on a
condition with a deadline."""
import os
import signal
import socket
import threading
import time


class Pumped:
    """The stdout and stderr lines of ``subprocess.Popen(..., stdout=PIPE, stderr=PIPE, text=True)``, collected as
    they come on two threads (an unread pipe would block the child once it fills). ``said()``: what it printed
    (stderr's last 3,000 characters); once the process has exited, it first waits for both pipes to end, so the
    last line printed is in ``lines``."""

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

    def stop(self, group=False):
        """Kill the process (its whole process group with ``group``) if it still runs (a check failed before it
        exited), wait for it, and read its last lines."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL) if group else self.proc.kill()
            self.proc.wait(30)
        self.said()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, cond, timeout, every=0.2):
    """Poll ``cond()`` until it returns something true (returned), failing after ``timeout`` seconds."""
    t0 = time.monotonic()
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() - t0 < timeout, f"timed out after {timeout} s waiting for {what}"
        time.sleep(every)
