"""Help a person reads: metavars instead of Python types, no type on flags, paragraphs that wrap.

Typer renders ``<list[Path]>``, ``<bool>`` on flags and ``{PLATE}...`` in usage lines; these
small overrides of its parameter classes show ``PLATE...``, ``INT``, ``FILE`` and ``a|b|c`` instead.
"""

from __future__ import annotations

import inspect
import re

from typer import core

_TYPE_NAMES = {"int": "INT", "float": "NUMBER", "str": "TEXT", "Path": "PATH", "bool": "BOOLEAN"}


def readable_type(param) -> str | None:
    """What goes in the help's type column: the metavar, the choices, or a plain upper-case kind."""
    if getattr(param, "is_flag", False) or isinstance(param, core.TyperArgument):
        return None  # a flag takes no value; an argument's name column already says it
    if param.metavar is not None:
        return param.metavar
    desc = param.type_descriptor
    if desc.is_choice:
        label = "|".join(str(getattr(c, "value", c)) for c in desc.choices or ())
    else:
        annotation = desc.annotation
        args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
        base = args[0] if args else annotation
        label = _TYPE_NAMES.get(getattr(base, "__name__", str(base)), "VALUE")
    return label + ("..." if desc.is_list else "")


def _usage_name(self) -> str:
    """``PLATE...`` (required) or ``[PLATE]`` (optional): no braces, no doubled dots."""
    name = self.display_name_raw
    if self.nargs != 1 and not name.endswith("..."):
        name += "..."
    return name if self.required else f"[{name}]"


def install() -> None:
    core.TyperOption.display_type_rich = lambda self, ctx: readable_type(self)
    core.TyperArgument.display_type_rich = lambda self, ctx: readable_type(self)
    core.TyperArgument._usage_display_name = _usage_name


def unwrap_docstring(fn) -> None:
    """Join a docstring's hard-wrapped lines into paragraphs so the help wraps to the terminal."""
    if fn.__doc__:
        text = inspect.cleandoc(fn.__doc__)
        fn.__doc__ = "\n\n".join(re.sub(r"\s*\n\s*", " ", p) for p in text.split("\n\n"))
