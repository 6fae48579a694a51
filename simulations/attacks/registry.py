"""Name -> attack registry, ``build``, and the ``key=value`` parameter parser of run configs.

A run config names its attack as a string (``attack = "alie"``) and its parameters as one string
(``attack-params = "z=1.5"``); :func:`parse_params` turns the latter into keyword arguments and
:func:`build` checks them against the attack's constructor, so a misspelt parameter is an error
naming the attack and the parameter rather than a silently ignored setting.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable, TypeVar

from simulations.attacks.base import Attack

A = TypeVar("A", bound=type)

_ATTACKS: dict[str, type[Attack]] = {}

#: A parameter name: letters, digits, ``_`` and ``-`` (dash-case as in run configs).
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def register(name: str) -> Callable[[A], A]:
    """Class decorator that makes an :class:`Attack` subclass available as ``build(name)``.

    Raises
    ------
    ValueError
        If ``name`` is empty or already registered to another class.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"attack name must be a non-empty string, got {name!r}")

    def decorator(cls: A) -> A:
        if not (inspect.isclass(cls) and issubclass(cls, Attack)):
            raise ValueError(f"cannot register attack {name!r}: {cls!r} is not an Attack subclass")
        existing = _ATTACKS.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"attack {name!r} is already registered to {existing!r}")
        _ATTACKS[name] = cls
        cls.name = name
        return cls

    return decorator


def available() -> list[str]:
    """Sorted names of the registered attacks."""
    return sorted(_ATTACKS)


def parameters(name: str) -> list[str]:
    """Sorted parameter names that ``build(name, ...)`` accepts."""
    return sorted(_accepted(_lookup(name))[0])


def build(name: str, **params: Any) -> Attack:
    """Build an attack by registry name.

    Parameters
    ----------
    name : str
        One of :func:`available`.
    **params
        The attack's parameters (see each attack's docstring); dashes in names become underscores,
        so ``build("backdoor", **parse_params("target=0"))`` and run-config style dash-case work.

    Returns
    -------
    Attack

    Raises
    ------
    ValueError
        For an unknown name (the message lists the available ones), a parameter the attack does not
        take (naming the attack and the parameter), or a bad value.
    """
    cls = _lookup(name)
    accepted, var_keyword = _accepted(cls)
    kwargs = {key.replace("-", "_"): value for key, value in params.items()}
    unknown = sorted(key for key in kwargs if key not in accepted)
    if unknown and not var_keyword:
        raise ValueError(f"attack {name!r} has no parameter(s) {unknown}; it accepts {sorted(accepted)}")
    return cls(**kwargs)


def parse_params(text: str) -> dict[str, Any]:
    """Parse ``"key=value,key=value"`` into keyword arguments.

    Values that read as Python ints become ``int``, other numbers ``float`` (``"1e-3"``, ``"0.5"``,
    ``"inf"``), anything else stays a ``str``. Whitespace around items, keys and values is ignored.

    Parameters
    ----------
    text : str
        The run config's ``attack-params``; ``""`` means no parameters.

    Returns
    -------
    dict
        ``{"scale": 10, "target": 0}`` for ``"scale=10,target=0"``.

    Raises
    ------
    ValueError
        For an item that is not ``key=value``, an empty key or value, a key that is not a name, or
        a key given twice.
    """
    if not isinstance(text, str):
        raise ValueError(f"attack parameters must be a string like 'scale=10,target=0', got {text!r}")
    params: dict[str, Any] = {}
    if not text.strip():
        return params
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise ValueError(f"attack parameter {item.strip()!r} in {text!r} is not key=value")
        if not _KEY.match(key):
            raise ValueError(f"attack parameter name {key!r} in {text!r} is not a name (letters, digits, _ or -)")
        if key in params:
            raise ValueError(f"attack parameter {key!r} is given twice in {text!r}")
        params[key] = _parse_value(value)
    return params


def _parse_value(text: str) -> int | float | str:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _lookup(name: str) -> type[Attack]:
    if name not in _ATTACKS:
        raise ValueError(f"unknown attack {name!r}; available: {available()}")
    return _ATTACKS[name]


def _accepted(cls: type[Attack]) -> tuple[set[str], bool]:
    """Keyword parameters the attack's constructor accepts, and whether it takes ``**kwargs``."""
    names: set[str] = set()
    var_keyword = False
    for parameter in inspect.signature(cls).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.add(parameter.name)
    return names, var_keyword
