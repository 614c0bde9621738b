"""Show the package's real code on a page: highlighted, taken from the package at run time, never a copy.

A chapter ends a cell with ``show_source(FedIT.aggregate)``; the notebook displays the current
source of that function, syntax-highlighted, in Jupyter, in Colab and on the rendered website
alike. Several objects give one block, in order; ``first`` and ``last`` cut one object's source
to the lines from the one containing ``first`` to the next one containing ``last``.
"""

from __future__ import annotations

import inspect
import textwrap


def source_text(*objects: object, first: str | None = None, last: str | None = None) -> str:
    """The dedented source of each function, method, class or module in ``objects``, one after another."""
    if not objects:
        raise ValueError("show_source needs at least one function, method, class or module")
    if (first is not None or last is not None) and len(objects) != 1:
        raise ValueError("first and last cut the source of one object; pass exactly one")
    blocks = []
    for obj in objects:
        try:
            text = inspect.getsource(obj)  # type: ignore[arg-type]
        except TypeError as error:
            raise TypeError(f"show_source needs a function, method, class or module, got {type(obj).__name__}: "
                            f"{error}") from error
        lines = text.splitlines()
        if first is not None or last is not None:
            start = _find(lines, first, 0, obj) if first is not None else 0
            end = _find(lines, last, start, obj) if last is not None else len(lines) - 1
            lines = lines[start:end + 1]
        blocks.append(textwrap.dedent("\n".join(lines)).rstrip())
    return "\n\n\n".join(blocks) + "\n"


def _find(lines: list[str], text: str, start: int, obj: object) -> int:
    for index in range(start, len(lines)):
        if text in lines[index]:
            return index
    name = getattr(obj, "__qualname__", repr(obj))
    raise ValueError(f"no line of the source of {name} (from line {start + 1} on) contains {text!r}")


def show_source(*objects: object, first: str | None = None, last: str | None = None) -> object:
    """The source of ``objects`` as IPython's highlighted :class:`~IPython.display.Code` (Python lexer).

    Returned, not printed: the last expression of a cell displays it. Raises a TypeError for
    objects without Python source (a built-in, an instance) and a ValueError when ``first`` or
    ``last`` is not found.
    """
    from IPython.display import Code  # IPython comes with Jupyter and Colab; the package itself does not need it

    return Code(source_text(*objects, first=first, last=last), language="python")
