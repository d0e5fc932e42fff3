"""A small progress line on stderr: requests done and generated tokens/s (\r updates on a terminal, each
clearing what a longer line before it left, a plain line every few seconds otherwise)."""
from __future__ import annotations

import sys
import time

CLEAR_TO_EOL = "\x1b[K"


class Progress:
    def __init__(self, total: int, enabled: bool = True, every_s: float = 5.0, stream=None):
        self.total, self.enabled, self.every_s = total, enabled, every_s
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self.last = time.perf_counter()
        self.done = self.tokens = 0

    def line(self) -> str:
        dt = max(time.perf_counter() - self.start, 1e-9)
        return f"generate: {self.done}/{self.total} done, {self.tokens} tokens, {self.tokens / dt:.1f} tok/s"

    def update(self, done: int, new_tokens: int):
        self.done, self.tokens = done, self.tokens + new_tokens
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty and now - self.last >= 0.2:
            self.stream.write("\r" + self.line() + CLEAR_TO_EOL)
            self.stream.flush()
            self.last = now
        elif not self.tty and now - self.last >= self.every_s:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self.last = now

    def close(self):
        if self.enabled:
            self.stream.write(("\r" + self.line() + CLEAR_TO_EOL if self.tty else self.line()) + "\n")
            self.stream.flush()
