"""Declaring kernel families and specializing them to configurations.

A family is declared once (sources, parameters with their allowed values, how each parameter
reaches the source, entry points). ``KernelFamily.specialize(config)`` checks a configuration
against the declaration, before anything is compiled, and returns the ``Specialization`` the
compiler and the cache key are built from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from . import sources

# "tmap": a CUtensorMap (128 bytes, 64-byte aligned), passed as 128 bytes or None (zeros)
SIGNATURE_TYPES = ("ptr", "i32", "u32", "i64", "u64", "f32", "f64", "u8", "tmap")


@dataclass(frozen=True)
class IntRange:
    """Allowed integers ``lo <= v <= hi`` with ``v % multiple_of == 0``."""

    lo: int
    hi: int
    multiple_of: int = 1

    def __contains__(self, v: object) -> bool:
        return (type(v) is int and self.lo <= v <= self.hi and v % self.multiple_of == 0)

    def __str__(self) -> str:
        step = f"multiples of {self.multiple_of} " if self.multiple_of > 1 else "integers "
        return f"{step}from {self.lo} to {self.hi}"


@dataclass(frozen=True)
class Param:
    """One specialization parameter.

    ``values``: a tuple of allowed values or an ``IntRange``. ``via``: ``"define"`` (a ``-D``
    macro, named ``macro`` or ``JK_<NAME>``) or ``"template"`` (the rendered value is substituted
    for ``{name}`` in the entries' name expressions). ``render`` maps a value to its C text
    (a dict or a callable); ints render as decimal, bools as 0/1, strings as themselves.
    """

    name: str
    values: Any
    via: str = "define"
    macro: str | None = None
    render: Mapping[Any, str] | Callable[[Any], str] | None = None
    default: Any = None

    def __post_init__(self):
        if self.via not in ("define", "template"):
            raise ValueError(f"Param {self.name}: via must be 'define' or 'template', got {self.via!r}")

    def allowed(self) -> str:
        if isinstance(self.values, IntRange):
            return str(self.values)
        return ", ".join(repr(v) for v in self.values)

    def accepts(self, v: Any) -> bool:
        if isinstance(self.values, IntRange):
            return v in self.values
        # bool is an int subclass: True must not pass as 1, nor 1 as True
        return any(type(v) is type(a) and v == a for a in self.values)

    def c_text(self, v: Any) -> str:
        if self.render is not None:
            return self.render[v] if isinstance(self.render, Mapping) else self.render(v)
        if isinstance(v, bool):
            return "1" if v else "0"
        return str(v)

    @property
    def macro_name(self) -> str:
        return self.macro or "JK_" + re.sub(r"\W", "_", self.name).upper()


@dataclass(frozen=True)
class Entry:
    """A kernel entry point: its NVRTC name expression and the exact C types of its parameters.

    ``signature``: ``((field_name, type), ...)`` with types from ``SIGNATURE_TYPES``.
    ``packed=True``: the kernel takes one struct by value with exactly these fields, in order.
    """

    name_expression: str
    signature: tuple = ()
    packed: bool = False

    def __post_init__(self):
        for f in self.signature:
            if len(f) != 2 or f[1] not in SIGNATURE_TYPES:
                raise ValueError(f"Entry {self.name_expression}: signature field {f!r} must be "
                                 f"(name, type) with type in {SIGNATURE_TYPES}")


@dataclass(frozen=True)
class Specialization:
    """A family at one configuration: everything the compiler and the key need."""

    family: "KernelFamily"
    config: tuple                    # ((param, value), ...) sorted by name: the canonical form
    defines: tuple                   # ("-DJK_N=128", ...)
    name_expressions: tuple          # ((entry, expression), ...)
    name: str                        # readable: family/param=value,...

    @property
    def config_dict(self) -> dict:
        return dict(self.config)


@dataclass(eq=False)
class KernelFamily:
    """A declared kernel family. See docs/families.md."""

    name: str
    source: str
    params: tuple
    entries: Mapping[str, Entry]
    options: tuple = ("-std=c++17",)
    arch_specific: bool = False
    warmup: tuple = ()
    validate: Callable[[dict], None] | None = None
    source_dir: Path | None = None          # default: the project's kernels_src/
    description: str = ""
    _specs: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.params = tuple(self.params)
        self.warmup = tuple(self.warmup)
        self.options = tuple(self.options)
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"family {self.name}: duplicate parameter names in {names}")
        self._by_name = {p.name: p for p in self.params}

    @property
    def root(self) -> Path:
        return Path(self.source_dir) if self.source_dir is not None else sources.kernels_root()

    def canonical(self, config: Mapping[str, Any]) -> tuple:
        """Check ``config`` and return its canonical form ((name, value), ...) sorted by name.

        Raises ValueError naming the parameter and its allowed values."""
        unknown = sorted(set(config) - set(self._by_name))
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter {unknown[0]!r}; parameters are "
                             f"{', '.join(self._by_name)}")
        out = {}
        for p in self.params:
            if p.name in config:
                v = config[p.name]
            elif p.default is not None:
                v = p.default
            else:
                raise ValueError(f"{self.name}: parameter {p.name!r} is missing; allowed values: "
                                 f"{p.allowed()}")
            if not p.accepts(v):
                raise ValueError(f"{self.name}: parameter {p.name!r} = {v!r} is not allowed; "
                                 f"allowed values: {p.allowed()}")
            out[p.name] = v
        if self.validate is not None:
            self.validate(dict(out))
        return tuple(sorted(out.items()))

    def specialize(self, config: Mapping[str, Any]) -> Specialization:
        """Validated ``Specialization`` of ``config`` (memoized per canonical configuration)."""
        canon = self.canonical(config)
        spec = self._specs.get(canon)
        if spec is None:
            values = dict(canon)
            defines = tuple(f"-D{p.macro_name}={p.c_text(values[p.name])}"
                            for p in self.params if p.via == "define")
            # name expressions may name any parameter; template ones are there by definition
            tmpl = {p.name: p.c_text(values[p.name]) for p in self.params}
            exprs = tuple((k, e.name_expression.format(**tmpl)) for k, e in self.entries.items())
            readable = ",".join(f"{p.name}={_short(values[p.name])}" for p in self.params)
            spec = Specialization(self, canon, defines, exprs, f"{self.name}/{readable}")
            self._specs[canon] = spec
        return spec

    def warmup_configs(self) -> list[dict]:
        return [dict(c) for c in self.warmup]


def _short(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


_REGISTRY: dict[str, KernelFamily] = {}


def register_family(family: KernelFamily) -> KernelFamily:
    """Add ``family`` to the registry (the CLI's warm-up set and ``get_family`` read it)."""
    old = _REGISTRY.get(family.name)
    if old is not None and old is not family:
        raise ValueError(f"a kernel family named {family.name!r} is already registered")
    _REGISTRY[family.name] = family
    return family


def get_family(name: str) -> KernelFamily:
    from . import families  # noqa: F401  (registers the built-in families)

    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown kernel family {name!r}; registered: "
                         f"{', '.join(sorted(_REGISTRY)) or 'none'}") from None


def registered() -> list[KernelFamily]:
    from . import families  # noqa: F401

    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def iter_configs(grid: Mapping[str, Iterable]) -> list[dict]:
    """Product of a parameter grid {name: [values]} as a list of configurations."""
    import itertools

    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(list(grid[k]) for k in keys))]
