"""Terminal output that anyone's strings cannot take over: control characters escaped."""

from __future__ import annotations

import re
from collections.abc import Iterable

from rich.console import Console
from rich.segment import Segment

__all__ = ["SafeConsole"]

# Terminal control characters (ESC, CSI, ...) but newline and tab: what a user string must
# not send to the terminal, where ESC sequences retitle, clear or rewrite the screen.
_TERMINAL_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _visible(text: str) -> str:
    """Return `text` with terminal control characters shown as escapes (\\x1b), not sent."""
    return _TERMINAL_CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class SafeConsole(Console):
    """A Console that never sends a control character of the text it prints to the terminal.

    Batch names, metadata, task names and handlers' errors are anyone's strings: an ESC in
    one would otherwise reach the operator's terminal as a command. Rich's own control
    segments (cursor moves of a live progress bar) are kept.
    """

    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        return super()._render_buffer(
            segment if segment.control else Segment(_visible(segment.text), segment.style)
            for segment in buffer
        )
