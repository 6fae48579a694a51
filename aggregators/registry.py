"""Name -> rule registry, and ``build`` which turns a name plus parameters into a rule.

Rules and pre-aggregation steps live in two registries (``available()`` and ``available_pre()``).
``build`` passes ``num_byzantine`` and the other parameters only to constructors that accept them,
so ``build("mean", num_byzantine=2)`` works while a misspelt parameter is an error.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Dict, Iterable, List, Optional, TypeVar, Union

T = TypeVar("T")

_RULES: Dict[str, Callable[..., Any]] = {}
_PRE: Dict[str, Callable[..., Any]] = {}


def _register_into(table: Dict[str, Callable[..., Any]], kind: str, name: str) -> Callable[[T], T]:
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"{kind} name must be a non-empty string without ':', got {name!r}")

    def decorator(factory: T) -> T:
        if not callable(factory):
            raise ValueError(f"cannot register {kind} {name!r}: {factory!r} is not callable")
        existing = table.get(name)
        if existing is not None and existing is not factory:
            raise ValueError(f"{kind} {name!r} is already registered to {existing!r}")
        table[name] = factory
        if inspect.isclass(factory) and "name" not in vars(factory):
            # Let a rule report its registered name (logs, audit records).
            setattr(factory, "name", name)
        return factory

    return decorator


def register(name: str) -> Callable[[T], T]:
    """Class/factory decorator that makes a rule available as ``build(name)``.

    Parameters
    ----------
    name : str
        Registry name (no ``:``, which separates import paths and parameters).

    Raises
    ------
    ValueError
        If ``name`` is already registered to a different object.

    Examples
    --------
    >>> @register("first-row")                      # doctest: +SKIP
    ... class FirstRow:
    ...     def __call__(self, updates, weights=None): ...
    """
    return _register_into(_RULES, "rule", name)


def register_pre(name: str) -> Callable[[T], T]:
    """Decorator that makes a pre-aggregation step available in ``build(..., pre=[name])``."""
    return _register_into(_PRE, "pre-aggregation", name)


def unregister(name: str) -> None:
    """Remove a rule or pre-aggregation step registered under ``name`` (e.g. after a test).

    Raises
    ------
    ValueError
        If nothing is registered under ``name``.
    """
    for table in (_RULES, _PRE):
        if name in table:
            del table[name]
            return
    raise ValueError(f"nothing is registered under {name!r}")


def available() -> List[str]:
    """Sorted names of the registered aggregation rules."""
    return sorted(_RULES)


def available_pre() -> List[str]:
    """Sorted names of the registered pre-aggregation steps."""
    return sorted(_PRE)


def _accepts(factory: Callable[..., Any]) -> tuple[set[str], bool]:
    """Keyword parameters a factory accepts, and whether it takes ``**kwargs``."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: pass nothing optional
        return set(), False
    names: set[str] = set()
    var_keyword = False
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.add(parameter.name)
    return names, var_keyword


def instantiate(label: str, factory: Callable[..., Any], num_byzantine: Optional[int], params: Dict[str, Any]) -> Any:
    """Call ``factory`` with the parameters it accepts.

    ``num_byzantine`` is dropped silently when the factory does not take it (a rule that needs no
    f); any other parameter the factory does not take raises ValueError naming ``label``.
    """
    accepted, var_keyword = _accepts(factory)
    kwargs = dict(params)
    unknown = sorted(key for key in kwargs if key not in accepted and not var_keyword)
    if unknown:
        known = sorted(accepted - {"self"})
        raise ValueError(f"{label}: unknown parameter(s) {unknown}; it accepts {known}")
    if num_byzantine is not None and ("num_byzantine" in accepted or var_keyword):
        kwargs["num_byzantine"] = num_byzantine
    try:
        return factory(**kwargs)
    except TypeError as error:  # e.g. a required parameter is missing
        raise ValueError(f"{label}: cannot construct with {sorted(kwargs)}: {error}") from error


def import_object(path: str) -> Callable[..., Any]:
    """Import ``"package.module:Name"`` (``Name`` may be dotted: ``Outer.Inner``)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"import path must look like 'package.module:Name', got {path!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import module {module_name!r} from {path!r}: {error}") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{path!r} is not a class or factory")
    return target


def _parse_value(text: str) -> Any:
    """Parse a run-config style value: bool, None, int, float, else the string itself."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text.strip())
        except ValueError:
            pass
    return text.strip()


def parse_params(text: str, label: str) -> Dict[str, Any]:
    """Parse ``"key=value,key=value"`` (dashes in keys become underscores)."""
    params: Dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{label}: parameter {item!r} is not key=value")
        params[key.strip().replace("-", "_")] = _parse_value(value)
    return params


def build_pre_step(spec: Union[str, Callable[..., Any]], num_byzantine: int) -> Any:
    """Build one pre-aggregation step from ``"name"``, ``"name:key=value,..."``, an import path
    ``"pkg.module:Name"``, or return an already-built callable unchanged."""
    if not isinstance(spec, str):
        if callable(spec):
            return spec
        raise ValueError(f"pre-aggregation step must be a name or a callable, got {spec!r}")
    head, _, tail = spec.partition(":")
    head = head.strip()
    if head in _PRE:
        return instantiate(f"pre-aggregation {head!r}", _PRE[head], num_byzantine, parse_params(tail, head))
    if tail and "=" not in tail.partition(":")[0]:
        # "pkg.module:Name" or "pkg.module:Name:key=value"
        name_part, _, param_text = tail.partition(":")
        factory = import_object(f"{head}:{name_part}")
        return instantiate(f"pre-aggregation {head}:{name_part}", factory, num_byzantine, parse_params(param_text, spec))
    raise ValueError(f"unknown pre-aggregation {head!r}; available: {available_pre()}")


def build(name: str, num_byzantine: int = 0, pre: Optional[Iterable[Union[str, Callable[..., Any]]]] = None, **params: Any) -> Any:
    """Build an aggregation rule by registry name or import path.

    Parameters
    ----------
    name : str
        A name from :func:`available` or an import path ``"package.module:Name"`` of a class or
        factory.
    num_byzantine : int
        The number f of Byzantine clients the rule should tolerate; passed only to constructors
        (rules and pre-aggregation steps) that accept ``num_byzantine``.
    pre : iterable of str or callable, optional
        Pre-aggregation chain applied before the rule, in order: registry names, optionally with
        parameters (``"clip:norm=1.0"``, ``"bucketing:size=2,seed=3"``), import paths, or built
        steps. When given, the returned object is a :class:`aggregators.pre.PreAggregatedRule`.
    **params
        Rule parameters (e.g. ``max_iter=50``); each must be accepted by the rule's constructor.

    Returns
    -------
    callable
        ``rule(updates, weights=None) -> AggregationResult``.

    Raises
    ------
    ValueError
        Unknown name (the message lists the available ones), unknown parameter (naming the rule
        and the parameter), or invalid parameter values.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"rule name must be a non-empty string, got {name!r}; available: {available()}")
    name = name.strip()
    if name in _RULES:
        rule = instantiate(f"rule {name!r}", _RULES[name], num_byzantine, params)
    elif ":" in name:
        rule = instantiate(f"rule {name!r}", import_object(name), num_byzantine, params)
    else:
        raise ValueError(f"unknown aggregation rule {name!r}; available: {available()}")
    if isinstance(pre, str):  # one step given bare; a comma list is ambiguous with "k=v,k=v"
        pre = [pre]
    steps = [build_pre_step(spec, num_byzantine) for spec in (pre or [])]
    if not steps:
        return rule
    from aggregators.pre import PreAggregatedRule  # local: pre imports this module

    return PreAggregatedRule(rule, steps)
