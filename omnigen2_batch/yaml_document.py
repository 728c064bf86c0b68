"""Reading a YAML document safely: one document, no custom tags, bounded size and depth,
every field's line recorded for messages, and --set overrides applied before validation.
typed_yaml.py then turns the plain values into dataclasses."""
from __future__ import annotations

from typing import Any

import yaml

from .typed_yaml import DocumentError, Loc, Source, field_name, json_kind, printable

MAX_YAML_NODES = 100_000  # after alias expansion: refuses "billion laughs" documents
MAX_YAML_DEPTH = 32  # no schema nests deeper; PyYAML and our walks recurse per level

def parse_yaml(text: str, source: Source,
               raises: type[DocumentError] = DocumentError) -> Any:
    """Safe-load one YAML document, recording every field's line in `source.lines`;
    `raises` reports syntax errors, duplicate keys, oversized documents and values Python
    cannot hold, never a traceback."""
    try:
        return load_document(text, source, raises)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        raise raises([f"{source.label}:{mark.line + 1}: YAML syntax error: "
                      f"{err.problem or err.context}"]) from err
    except yaml.reader.ReaderError as err:  # a character YAML does not allow in a file
        line = text.count("\n", 0, err.position) + 1
        raise raises([f"{source.label}:{line}: the character {printable(chr(err.character))} "
                      f"(U+{err.character:04X}) is not allowed in YAML; remove it (a NUL byte "
                      "means the file is not text)"]) from err
    except yaml.YAMLError as err:
        raise raises([f"{source.label}: YAML error: {err}"]) from err
    except RecursionError as err:  # PyYAML composes nested collections recursively
        raise raises([f"{source.label}:{too_deep_line(text)}: YAML nested too deeply; no "
                      f"recipe needs more than {MAX_YAML_DEPTH} levels"]) from err


def too_deep_line(text: str) -> int:
    """The line where `text` first nests deeper than MAX_YAML_DEPTH (events: no recursion)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        depth += isinstance(event, yaml.CollectionStartEvent)
        depth -= isinstance(event, yaml.CollectionEndEvent)
        if depth > MAX_YAML_DEPTH:
            return event.start_mark.line + 1
    return 1


def load_document(text: str, source: Source, raises: type[DocumentError]) -> Any:
    loader = yaml.SafeLoader(text)  # checks every character first (ReaderError)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        problems: list[tuple[int, str]] = []
        record_lines(node, (), source.lines, problems)
        if expanded_size(node, {}) > MAX_YAML_NODES:
            problems.append((1, f"more than {MAX_YAML_NODES} values after expanding aliases"))
        if problems:
            raise raises([f"{source.label}:{line}: {msg}" for line, msg in sorted(problems)])
        try:
            return loader.construct_document(node)
        except (ValueError, TypeError) as err:  # a 5000-digit integer, a date like 2024-13-45
            raise raises([f"{source.label}:{bad_scalar_line(node)}: a value Python "
                          f"cannot hold ({err}); quote it if it is meant as text"]) from err
    finally:
        loader.dispose()


def apply_overrides(data: Any, assignments, source: Source,
                    raises: type[DocumentError] = DocumentError) -> Any:
    """Set dotted KEY=VALUE assignments (values read as YAML: 4 is a number, [64, 64] a list)
    in parsed data, so they are typed and validated like the document itself; errors about
    them name the --set that gave them."""
    problems = []
    for text in assignments:
        key, equals, raw = text.partition("=")
        path = tuple(int(p) if p.isdigit() else p for p in key.strip().split("."))
        try:
            if not equals or not all(str(p).strip() for p in path):
                raise ValueError("expected KEY=VALUE with a dotted recipe key, e.g. defaults.steps=4")
            value = yaml.safe_load(raw) if raw.strip() else ""
            _assign(data, path, value)
        except (ValueError, yaml.YAMLError) as err:
            problems.append(f"{source.label}: --set {text}: {err}")
            continue
        source.overrides[path] = text
    if problems:
        raise raises(problems)
    return data


def _assign(data: Any, path: Loc, value: Any) -> None:
    node = data
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        if isinstance(node, dict) and not isinstance(part, int):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            if last:
                node[part] = value
            else:
                node = node[part]
        else:
            where = field_name(path[:depth]) if depth else "the recipe"
            raise ValueError(f"{where} has no place for {part!r} ({json_kind(node)})")


def bad_scalar_line(root) -> int:
    """The line of the first scalar under `root` that PyYAML cannot construct."""
    todo = [root]
    while todo:
        node = todo.pop(0)
        if isinstance(node, yaml.ScalarNode):
            try:  # a fresh loader: a failed construction leaves the old one's state dirty
                yaml.SafeLoader("").construct_object(node)
            except (ValueError, TypeError):
                return node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            todo += node.value
        elif isinstance(node, yaml.MappingNode):
            todo += [part for pair in node.value for part in pair]
    return 1


def record_lines(node, at: Loc, lines: dict, problems: list, seen=None) -> None:
    """Map field paths to 1-based lines; report duplicate keys (PyYAML keeps the last)."""
    seen = set() if seen is None else seen
    lines.setdefault(at, node.start_mark.line + 1)
    if len(at) > MAX_YAML_DEPTH:
        problems.append((node.start_mark.line + 1, f"{field_name(at)}: nested deeper than "
                                                   f"{MAX_YAML_DEPTH} levels"))
        return
    if id(node) in seen:  # an alias: its fields were recorded where the anchor is
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key, line = key_node.value, key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode) or key == "<<":
                continue
            if key in first:
                problems.append((line, f"{field_name(at + (key,))}: duplicate key "
                                       f"(first on line {first[key]})"))
            first.setdefault(key, line)
            lines[at + (key,)] = line
            record_lines(value_node, at + (key,), lines, problems, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            record_lines(item, at + (index,), lines, problems, seen)


def expanded_size(node, memo: dict) -> int:
    if id(node) not in memo:
        memo[id(node)] = 1  # guards recursive documents
        children = (node.value if isinstance(node, yaml.SequenceNode) else
                    [n for pair in node.value for n in pair]
                    if isinstance(node, yaml.MappingNode) else [])
        memo[id(node)] = 1 + sum(expanded_size(child, memo) for child in children)
    return memo[id(node)]


