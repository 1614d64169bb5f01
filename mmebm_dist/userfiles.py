"""The one place that opens files a user named: bounded, UTF-8 checked, kept inside the root the user gave.

Every error is a :class:`UserFileError` (a ValueError): one line naming the file and what to do, never the
file's bytes (a ``base: /etc/shadow`` or a shard linked to ``/etc/passwd`` must not print them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

MAX_TEXT_BYTES = 64 * 2**20
"""Largest config, manifest or table read whole (64 MiB; the shipped ones are a few KiB)."""
MAX_YAML_NODES = 100_000
"""Most nodes a YAML document may expand to, aliases counted at every use (a 400-byte alias bomb expands
to billions; the largest shipped config has a few hundred)."""
MAX_MESSAGE = 300
"""Longest piece of a third-party error message quoted in ours."""


class UserFileError(ValueError):
    """A user-named file that cannot be read as asked (missing, outside its root, too big, not UTF-8,...)."""


def clip(text: object, limit: int = MAX_MESSAGE) -> str:
    """``str(text)`` on one line, cut to ``limit`` characters (errors quote other libraries' messages)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def inside(root: str | os.PathLike, name: str | os.PathLike, what: str) -> Path:
    """``root / name`` with symlinks resolved, refused unless it lies inside ``root`` (resolved too): an
    absolute path, a ``..`` or a symlink may not lead a file named by data or config out of its folder."""
    base = Path(root).resolve()
    target = (base / name).resolve()
    if not target.is_relative_to(base):
        raise UserFileError(f"{what} '{name}' resolves to {target}, outside {base}; files it names must lie "
                            "in that folder (copy or move them there)")
    return target


def read_bytes(path: str | os.PathLike, what: str, *, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise UserFileError(f"{what} {path} is not a regular file")
        if size > limit:
            raise UserFileError(f"{what} {path} has {size:,} bytes, more than the {limit:,} allowed; is it "
                                "the right file?")
        with open(path, "rb") as f:
            return f.read(limit + 1)[:limit]
    except FileNotFoundError:
        raise UserFileError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise UserFileError(f"{what} {path} cannot be read: {exc.strerror or clip(exc)}") from None


def read_text(path: str | os.PathLike, what: str, *, limit: int = MAX_TEXT_BYTES) -> str:
    """:func:`read_bytes` decoded as UTF-8, or an error naming the first offending byte's offset."""
    data = read_bytes(path, what, limit=limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserFileError(f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                            f"{exc.start}); save it as UTF-8") from None


def load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` refusing documents that expand to more than :data:`MAX_YAML_NODES` nodes or
    hold a recursive alias; errors give the problem and its line, never a snippet of the text."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses control characters right here
        node = loader.get_single_node()
        if node is None:
            return None
        count = _expanded_size(node, source)
        if count > MAX_YAML_NODES:
            raise UserFileError(f"{source} expands to more than {MAX_YAML_NODES:,} YAML nodes (anchors and "
                                "aliases repeated); write the values out or simplify the file")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        if isinstance(exc, yaml.reader.ReaderError):
            where = f" at character {exc.position}"
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or type(exc).__name__
        raise UserFileError(f"{source} is not valid YAML: {clip(problem, 120)}{where}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _expanded_size(root: yaml.Node, source: str) -> int:
    """Nodes of the document with every alias expanded, counted without expanding (memoised per node);
    stops as soon as the count passes the bound."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            active.discard(key)
            children = _children(node)
            sizes[key] = min(MAX_YAML_NODES + 1, 1 + sum(sizes[id(c)] for c in children))
            continue
        if key in sizes:
            continue
        if key in active:
            raise UserFileError(f"{source} holds a recursive YAML alias; write the values out")
        active.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []
