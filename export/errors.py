"""The one error type of the export stage: its message is the single line the CLI prints before exiting."""

from __future__ import annotations


class ExportError(Exception):
    """A problem the user can fix (bad name, bad weights, unwritable folder, failed validation)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # always one line
        self.message = str(self)
