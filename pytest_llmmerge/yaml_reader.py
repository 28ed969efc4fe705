"""YAML read with bounds a hostile file cannot get past: alias expansion ("billion laughs"),
nesting, integers past Python's digit limit, non-finite numbers and duplicate keys all end as
a message naming the spot, never as a hang or a traceback.  The node tree is kept for line
numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import yaml
from yaml.reader import ReaderError

# Aliases let a few lines of YAML stand for billions of values ("billion laughs"); a suite of a
# thousand cases is a few tens of thousands of nodes.
MAX_EXPANDED_NODES = 200_000
_NON_FINITE = re.compile(r"^[-+]?\.(inf|Inf|INF|nan|NaN|NAN)$")


class YamlRefused(ValueError):
    """The text is not YAML this reader accepts; the message starts with the spot."""


def read_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """yaml.safe_load split in its two halves, to keep the node tree for line numbers; raises
    YamlRefused naming the spot."""
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # its reader already rejects control characters
        node = loader.get_single_node()
        expanded = _expanded_size(node) if node is not None else 0
        if expanded > MAX_EXPANDED_NODES:
            raise YamlRefused(f"<root>: the document holds more than {MAX_EXPANDED_NODES} values (YAML aliases "
                              "expanded); it is refused before it is built")
        data = None if node is None else loader.construct_document(node)
    except RecursionError:
        raise YamlRefused("<root>: invalid YAML: nested deeper than the parser allows") from None
    except ValueError as exc:  # an integer past Python's digit limit, a date out of range, ...
        raise YamlRefused(f"<root>: invalid YAML: a value cannot be read ({exc})") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        spot = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<root>"
        problem = ": ".join(p for p in (exc.context, exc.problem) if p)
        raise YamlRefused(f"{spot}: invalid YAML: {problem}") from None
    except ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise YamlRefused(f"line {line}: invalid YAML: {exc.reason} "
                         f"(character #x{exc.character:04x})") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, node


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes the document has once aliases are expanded, counted without expanding
    them (each node once, its size memoised), stopping past the limit; a recursive alias counts
    as over it."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        children = _child_nodes(node)
        if finished:
            on_path.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_EXPANDED_NODES + 1)
            continue
        if id(node) in sizes:
            continue
        on_path.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                return MAX_EXPANDED_NODES + 1
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _child_nodes(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def node_problems(root: yaml.Node | None) -> list[str]:
    """Duplicate mapping keys, which the YAML loader silently resolves to the last one."""
    problems: list[str] = []

    def walk(node: yaml.Node, path: tuple[str | int, ...], stack: frozenset[int]) -> None:
        if id(node) in stack:  # a recursive alias would make validation recurse forever
            problems.append(f"{json_path(path)}: recursive YAML alias")
            return
        stack = stack | {id(node)}
        if isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key, value in node.value:
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else ""
                if name and name != "<<":
                    line = key.start_mark.line + 1
                    if name in first_line:
                        problems.append(f"{json_path(path)}: duplicate key {name!r} "
                                        f"(lines {first_line[name]} and {line})")
                    first_line.setdefault(name, line)
                walk(value, path + (name,), stack)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,), stack)
        elif node.tag == "tag:yaml.org,2002:float" and not _finite(str(node.value)):
            # JSON Schema's number accepts nan and inf; no option of a case means anything then.
            problems.append(f"{json_path(path)}: {node.value} is not a finite number "
                            f"(line {node.start_mark.line + 1})")

    if root is not None:
        walk(root, (), frozenset())
    return problems


def _finite(text: str) -> bool:
    """Whether a YAML float is finite: .inf and .nan, and also 1.0e+400, which overflows to inf."""
    if _NON_FINITE.match(text):
        return False
    try:
        return math.isfinite(float(text.replace("_", "")))
    except ValueError:
        return True  # a float the loader itself will refuse, with its own message


def json_path(parts: Iterable[str | int]) -> str:
    """('cases', 3, 'expect', 'regex') -> 'cases[3].expect.regex'; () -> '<root>'."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"
