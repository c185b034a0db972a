"""The one mark of an error that the person running a tool can fix.

A ``UserError`` says in one sentence which file, URL, flag, config key or package to fix; the
tools print that sentence alone (``tools/cli.py``). Every other exception is a bug, and keeps
its traceback. The package's own error classes derive from it and from the built-in class that
fits (``ValueError``, ``RuntimeError``...), so code catching the built-in class still works.
"""


def short_text(text, limit=60):
    """``text`` (or str of a value) cut to ``limit`` characters and '...', to quote in a message."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + '...'


class UserError(Exception):
    """An error the user can fix; its message names the file, URL, flag or key at fault.

    Its text is one line whatever it quotes: a name taken from a hostile file (an archive member, a
    _base_ file, a key) may hold line breaks or terminal control characters, shown escaped.
    """

    def __str__(self):
        return ''.join(c if c.isprintable() else c.encode('unicode_escape').decode('ascii')
                       for c in super().__str__())


class InvalidInput(UserError, ValueError):
    """A value given by the user (a flag, an argument, a file's content) that cannot be used."""


class Unsupported(UserError, RuntimeError):
    """What was asked needs something this machine or installation does not have (a GPU, a package)."""


class MissingFile(UserError, FileNotFoundError):
    """A file the user named, or that a file they named names, does not exist."""
