"""Inert values the reader returns in place of objects it does not build.

``Placeholder`` stands for anything a file names that modelkeep will not construct (an unknown
class, a TorchScript object, a trusted class read without importing it): it only remembers what the
file said. ``Record`` is a plain record read as a dict whose keys also read as attributes, for
plain-data types the reader does not rebuild as themselves (``argparse.Namespace`` and
``types.SimpleNamespace`` are: classes with no code a state could reach). Neither can be called,
and neither runs anything when compared, hashed, printed or garbage collected.
"""

from __future__ import annotations

from typing import Any

KIND_GLOBAL = "global"  # the name itself (a class or function the file refers to)
KIND_OBJECT = "object"  # what calling or instantiating that name would have produced


class Placeholder:
    """What the file asked for, never built: ``module``/``name`` of the global, the byte
    ``position`` of its reference, the ``args`` of the call, the ``state`` given to BUILD and any
    items ``appended`` or ``pairs`` set on it. It reads like what it held (``[]``, ``keys()``,
    ``items()``, ``in``, attributes of its state), and no method of the named class ever runs."""

    __slots__ = (
        "module",
        "name",
        "position",
        "kind",
        "args",
        "kwargs",
        "state",
        "appended",
        "pairs",
        "trusted",
        "script",
    )

    def __init__(
        self,
        module: str,
        name: str,
        position: int,
        *,
        kind: str = KIND_GLOBAL,
        args: tuple = (),
        kwargs: dict | None = None,
        trusted: bool = False,
        script: bool = False,
    ) -> None:
        self.module = module
        self.name = name
        self.position = position
        self.kind = kind
        self.args = args
        self.kwargs = kwargs or {}
        self.state: Any = None
        self.appended: list[Any] = []
        self.pairs: list[tuple[Any, Any]] = []
        self.trusted = trusted
        self.script = script

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    @property
    def attributes(self) -> dict[Any, Any]:
        """The instance attributes the file gave (BUILD state), or an empty dict."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:
            merged: dict[Any, Any] = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            return merged
        return state if isinstance(state, dict) else {}

    # -- the contents the file gave it, as a mapping: inert data, no method of the class runs ----
    def contents(self) -> dict[Any, Any]:
        """What the object held: the pairs set on it (a dict subclass), else its attributes."""
        return dict(self.pairs) if self.pairs else self.attributes

    def __getitem__(self, key: Any) -> Any:
        return self.contents()[key]

    def __contains__(self, key: Any) -> bool:
        return key in self.contents()

    def keys(self) -> Any:
        return self.contents().keys()

    def items(self) -> Any:
        return self.contents().items()

    def values(self) -> Any:
        return self.contents().values()

    def get(self, key: Any, default: Any = None) -> Any:
        return self.contents().get(key, default)

    def __getattr__(self, name: str) -> Any:
        """An attribute the file gave the object (``ckpt.args.lr`` style); never a dunder."""
        if name.startswith("__"):
            raise AttributeError(name)
        attributes = Placeholder.attributes.fget(self)  # type: ignore[attr-defined]
        if name in attributes:
            return attributes[name]
        raise AttributeError(f"{name!r}: the file gave this {self.qualname} placeholder no such attribute")

    def __repr__(self) -> str:
        what = "object" if self.kind == KIND_OBJECT else "reference"
        return f"<modelkeep placeholder: {what} {self.qualname}>"

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("a modelkeep placeholder cannot be pickled; it stands for an unbuilt object")


class Record(dict):
    """A plain record read as a dict: ``record["lr"]`` and ``record.lr`` both work;
    ``type_name`` says what the file called it."""

    def __init__(self, type_name: str, values: dict[str, Any] | None = None) -> None:
        super().__init__(values or {})
        self.__dict__["type_name"] = type_name

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"{self.type_name}({dict.__repr__(self)})"
