"""The YAML reader of every config-like file (configs, ``--set`` values, series rules): ``yaml.SafeLoader`` that
refuses, while composing and before any value is built or expanded, what PyYAML would accept silently or expand
without bound: a key given twice in one mapping, more than ``MAX_ALIASES`` aliases, a document that aliases expand
beyond ``MAX_NODES`` values (an "alias bomb"), a recursive alias, nesting deeper than ``MAX_DEPTH``.

A bottom-layer module (it imports only PyYAML) so that ``config`` and ``data`` read YAML the same way.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_ALIASES = 100  # alias references (*name) in one YAML document
MAX_NODES = 100_000  # values in one document with every alias expanded (base.yaml has about 200)
MAX_DEPTH = 50  # nesting levels


class ConfigYAMLError(yaml.YAMLError):
    """YAML that ``ConfigLoader`` refuses: ``key`` (the key path where it was found) and ``problem``."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"key '{key}': {problem}" if key else problem)


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses, while composing (before any value is built or expanded): a key given twice
    in one mapping (PyYAML keeps the last silently), more than ``MAX_ALIASES`` aliases, aliases that expand the
    document beyond ``MAX_NODES`` values, a recursive alias, and nesting deeper than ``MAX_DEPTH``. Raises
    ``ConfigYAMLError`` naming the key path; ``key_prefix`` is prepended to it (the key of a ``--set`` value).
    Usable as ``yaml.load(text, Loader=ConfigLoader)`` by any reader of a YAML config."""

    def __init__(self, stream, key_prefix: str = ""):
        super().__init__(stream)
        self._path: list[str] = [key_prefix] if key_prefix else []
        self._sizes: dict[int, int] = {}  # id(node) -> its values with every alias expanded
        self._keys: dict[int, dict[tuple[str, str], yaml.Node]] = {}  # id(mapping node) -> its scalar keys
        self._aliases = 0
        self._one_line = bool(key_prefix)  # a --set value: no line numbers to give

    def key_path(self, most: int = 12) -> str:
        """The key path being composed (``train.lr``, ``data.roi_size[2]``), its first ``most`` parts."""
        parts = self._path[:most]
        text = "".join(p if p.startswith("[") or i == 0 else f".{p}" for i, p in enumerate(parts))
        return text + ("..." if len(self._path) > most else "")

    def compose_node(self, parent, index):
        segment = None
        if isinstance(parent, yaml.MappingNode) and index is not None:  # a value: its key
            segment = str(index.value) if isinstance(index, yaml.ScalarNode) else "?"
            self._check_duplicate(parent, index)
        elif isinstance(parent, yaml.SequenceNode):
            segment = f"[{index}]"
        if segment is not None:
            self._path.append(segment)
        try:
            return self._compose(parent, index)
        finally:
            if segment is not None:
                self._path.pop()

    def _compose(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            anchor = self.peek_event().anchor
            node = super().compose_node(parent, index)  # the anchored node (undefined: a ComposerError)
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise ConfigYAMLError(self.key_path(), f"uses more than {MAX_ALIASES} YAML aliases (*{anchor}); a "
                                                       "config needs few, if any")
            if id(node) not in self._sizes:
                raise ConfigYAMLError(self.key_path(), f"alias *{anchor} refers to a value that contains it "
                                                       "(a recursive structure)")
            return node
        if len(self._path) > MAX_DEPTH:
            raise ConfigYAMLError(self.key_path(), f"nested more than {MAX_DEPTH} levels deep")
        node = super().compose_node(parent, index)
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
            self._keys.pop(id(node), None)
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        size = 1 + sum(self._sizes[id(child)] for child in children)
        if size > MAX_NODES:
            raise ConfigYAMLError(self.key_path(), f"expands to more than {MAX_NODES} values once its YAML aliases "
                                                   "are expanded (an alias bomb?)")
        self._sizes[id(node)] = size
        return node

    def _check_duplicate(self, mapping, key) -> None:
        if not isinstance(key, yaml.ScalarNode):
            return
        seen = self._keys.setdefault(id(mapping), {})
        first = seen.setdefault((key.tag, key.value), key)
        if first is key:
            return
        a, b = first.start_mark, key.start_mark
        if self._one_line:
            where = "in the value"
        elif a.line == b.line:
            where = f"(line {a.line + 1}, columns {a.column + 1} and {b.column + 1})"
        else:
            where = f"(lines {a.line + 1} and {b.line + 1})"
        self._path.append(str(key.value))
        try:
            raise ConfigYAMLError(self.key_path(), f"appears twice {where}; YAML would keep only the last")
        finally:
            self._path.pop()


def load_yaml(text: str, key_prefix: str = "") -> Any:
    """``text`` read by ``ConfigLoader``: ``ConfigYAMLError`` for what it refuses (with the key path), PyYAML's own
    errors for bad syntax, ``RecursionError`` for nesting Python cannot follow."""
    loader = ConfigLoader(text, key_prefix)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
