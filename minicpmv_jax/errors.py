"""Errors about a named setting, worded for whoever set it.

A library function names its Python arguments (``max_new_tokens must be an int ≥ 1``); the command line
names its flags (``--max-new-tokens must be an int ≥ 1``). :class:`ArgumentError` keeps the names of the
settings apart from the sentence, so each front end can word the same error its own way
(:meth:`ArgumentError.worded`), and nothing has to parse messages.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["ArgumentError"]


class ArgumentError(ValueError):
    """A bad value of one or more named settings.

    ``template`` is a constant ``str.format`` template: ``{}`` where each of ``settings`` goes, and
    ``{name}`` fields for ``values`` (a value's text is never read as a template). Each setting is
    spelled as in Python: an argument name (``"max_new_tokens"``) or an argument with its value
    (``"on_bad='skip'"``, ``"resume=True"``). ``str(e)`` is the message in Python's words.

    Example::

        raise ArgumentError("{} must be an int ≥ 1, got {value!r}", "max_new_tokens", value=0)
    """

    def __init__(self, template: str, *settings: str, **values: Any) -> None:
        self.template = template
        self.settings = settings
        self.values = values
        super().__init__(self.worded(str))

    def worded(self, name: Callable[[str], str]) -> str:
        """The message with every setting renamed by ``name`` (e.g. to a command-line flag)."""
        return self.template.format(*(name(s) for s in self.settings), **self.values)
