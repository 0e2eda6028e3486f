"""Reading recipes and ``key=value`` values: YAML with the YAML 1.2 core schema, no aliases, bounded size.

PyYAML reads YAML 1.1, whose implicit types surprise in a config: ``no``/``off`` become False, ``1e-5`` a
string, ``017`` octal 15, ``2024-01-02`` a date. Here a plain scalar is null (``null``, ``~``, empty),
a bool (``true``/``false`` only), a decimal int, a float (``1e-5``, ``.5``, ``.inf``, ``.nan``) or else a
string. Aliases are refused (a "billion laughs" recipe expands nothing), and the text and the nesting
depth are bounded, so a hostile recipe fails fast in little memory. Files must be UTF-8 text.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

#: A recipe is a page of settings; 1 MiB leaves room for thousands of inline prompts (put more in a file).
MAX_RECIPE_BYTES = 1 << 20
#: Nesting depth of mappings and lists: recipes use 3 (a list inside a dict inside the top mapping).
MAX_DEPTH = 32


class YamlError(ValueError):
    """Text that is not an accepted recipe or value; the message is one line."""


_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$")
_INT = re.compile(r"^[-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema's implicit types, no aliases and a depth bound."""

    yaml_implicit_resolvers: dict = {}

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise YamlError(f"aliases (*name) are not accepted (line {mark.line + 1}); write the value out")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise YamlError(f"nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node):
        return int(self.construct_scalar(node), 10)  # "017" is 17, never octal


_Loader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def loads(text: str):
    """Parse YAML text with the rules above; raises :class:`YamlError` (one line)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise YamlError(f"longer than {MAX_RECIPE_BYTES} bytes")
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except YamlError:
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise YamlError(f"not valid YAML: {problem}{where}") from None
    except RecursionError:
        raise YamlError(f"nested deeper than {MAX_DEPTH} levels") from None


def read_text(path: str | os.PathLike, *, max_bytes: int | None = None) -> str:
    """A UTF-8 text file's content; raises :class:`YamlError` naming what is wrong (missing, a folder,
    too large, binary: not UTF-8 or holding NUL bytes)."""
    p = Path(path)
    if not p.exists():
        raise YamlError(f"file not found: {p}")
    if not p.is_file():
        raise YamlError(f"{p} is not a file")
    if max_bytes is not None and p.stat().st_size > max_bytes:
        raise YamlError(f"{p} is larger than {max_bytes} bytes")
    data = p.read_bytes()
    if b"\x00" in data:
        raise YamlError(f"{p} is a binary file (it holds NUL bytes), expected UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlError(f"{p} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
