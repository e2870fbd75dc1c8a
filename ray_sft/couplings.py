"""The library internals ray_sft relies on, checked where it uses them.

Each is a private name or an undocumented attribute of a dependency. A release that renames one would otherwise
make ray_sft train wrongly without a word (a guarded attribute write that stops applying, say). `require` fails
loudly instead, naming the library, its installed version and what ray_sft needs; the versions ray_sft is tested
with are pinned in constraints-cpu.txt, and tests/test_couplings.py checks every name against the installed ones.
"""

from __future__ import annotations

import inspect
from importlib import metadata


class LibraryDrift(RuntimeError):
    """An installed dependency no longer has an internal ray_sft relies on."""


def require(library: str, owner, name: str, params: tuple[str, ...] = ()):
    """`owner.name`, after checking it exists and, for a callable, that it takes `params`."""
    value = getattr(owner, name, None)
    if value is None and not hasattr(owner, name):
        raise drift(library, f"{_name(owner)}.{name} is gone")
    if params:
        missing = [p for p in params if p not in inspect.signature(value).parameters]
        if missing:
            raise drift(library, f"{_name(owner)}.{name} no longer takes {', '.join(missing)}")
    return value


def drift(library: str, what: str) -> LibraryDrift:
    return LibraryDrift(f"{library} {_version(library)}: {what}; ray_sft relies on it (tested versions: "
                        "constraints-cpu.txt). Install a tested version or update ray_sft.")


def _version(library: str) -> str:
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _name(owner) -> str:
    return getattr(owner, "__name__", None) or type(owner).__name__
