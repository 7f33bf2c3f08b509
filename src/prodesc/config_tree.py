"""The dict trees behind config resolution: YAML files read, dotted keys set and flattened, trees deep-merged,
unknown keys found with the closest valid one. Plain mappings in, plain mappings out (config.py validates)."""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from prodesc.errors import ProdescError


def is_text(annotation: Any) -> bool:
    """str, Literal of str, or either | None."""
    if annotation is str:
        return True
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in args)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return bool(rest) and all(is_text(a) for a in rest)
    return False


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ProdescError(f"config file not found: {path}: pass an existing YAML file (see configs/)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ProdescError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ProdescError(
            f"config file {path}: top level must be a mapping of stages (data:, model:, train:...)"
        )
    return raw


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            node = {}
    node[leaf] = value


def unknown_keys(raw: dict[str, Any], model: type[BaseModel], prefix: str = "", where: str = "") -> list[str]:
    problems = []
    fields = model.model_fields
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid: {', '.join(fields)}"
            problems.append(f"{where}{prefix}{key}: unknown key{hint}")
            continue
        sub = fields[key].annotation
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            problems += unknown_keys(value, sub, f"{prefix}{key}.", where)
    return problems
