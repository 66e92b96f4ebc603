"""The one exception type for mistakes a user can fix; the CLI prints it and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, with the fix in the message.

    `path` names the file at fault (if any), `hint` says how to fix it.
    """

    def __init__(self, message: str, *, path: object | None = None, hint: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.hint:
            text += f"\n  fix: {self.hint}"
        return text
