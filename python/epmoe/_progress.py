"""Progress output of the `epmoe` command (CLI code, never used by the library).

On a terminal: a tqdm bar on stderr. Piped or redirected: one plain line per step ("desc [3/11] label"), no
carriage returns, so logs stay readable. Disabled (`-q`): nothing.
"""

from __future__ import annotations

import sys


class Progress:
    """`total` steps; `step(label)` after each, `write(line)` for other output, `close()` at the end."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, stream=None):
        self.total, self.desc, self.done, self.enabled = total, desc, 0, enabled
        self.stream = stream if stream is not None else sys.stderr
        self._bar = None
        if enabled and _isatty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=self.stream, leave=True, dynamic_ncols=True,
                             bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}] {postfix}")

    def step(self, label: str = "") -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
        elif self.enabled:
            print(f"{self.desc} [{self.done}/{self.total}] {label}".rstrip(), file=self.stream, flush=True)

    def set_label(self, label: str) -> None:
        """Shows what is running now (the bar's postfix; on plain output a line)."""
        if self._bar is not None:
            self._bar.set_postfix_str(label)
        elif self.enabled:
            print(f"{self.desc} [{self.done}/{self.total}] {label}".rstrip(), file=self.stream, flush=True)

    def write(self, line: str, file=None) -> None:
        """Prints a line without breaking the bar (to stdout unless `file` is given)."""
        out = file if file is not None else sys.stdout
        if self._bar is not None:
            self._bar.write(line, file=out)
        else:
            print(line, file=out, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def format_seconds(seconds: float) -> str:
    """'1m05s' / '42s'."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
