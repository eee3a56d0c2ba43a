"""Reading the config: defaults <- YAML file <- overlay YAMLs <- ``--set a.b=value`` overrides.

Unknown keys and wrong types are errors naming the key (:mod:`.fields`); cross-field checks are
:func:`.schema.validate`. ``dump_config`` writes the resolved tree every run directory keeps.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .fields import ConfigError, build, deep_merge, set_dotted, to_dict
from .schema import Config, validate


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader read as YAML 1.2 reads, where 1.1 surprises a config:
    - only true/false are booleans, so ``amp: off`` or ``--set amp=off`` stays the string "off";
    - no base-60 numbers, so ``walltime: 12:00:00`` stays a time, not the integer 43200;
    - ``1e-3`` is a number, as ``1.0e-3`` is;
    - a key given twice in one mapping is an error naming it, not its last value silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"the key {key!r} is given twice (first at line {seen[key] + 1}): keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_INT_1_2 = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$")
# YAML 1.2's floats: an exponent needs no dot and its sign is optional, so ``lr: 1e-3`` or ``--set
# export.tolerance=1e-12`` is a number (1.1 read both as strings, and the typed check refused them)
_FLOAT_1_2 = re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
    r"|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?)|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_REPLACED = {
    "tag:yaml.org,2002:bool": re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    "tag:yaml.org,2002:int": _INT_1_2,
    "tag:yaml.org,2002:float": _FLOAT_1_2,
}
_YamlLoader.yaml_implicit_resolvers = {
    first: [
        (tag, _REPLACED.get(tag, rx)) for tag, rx in resolvers if not (tag.endswith(":bool") and first not in "tTfF")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key!r}: cannot parse value {raw!r}: {exc}") from exc
    return key.strip().split("."), value


def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = yaml_load(p.read_text()) or {}
    except yaml.MarkedYAMLError as exc:  # one line: where, and what is wrong there
        where = f", line {exc.problem_mark.line + 1}" if exc.problem_mark else ""
        raise ConfigError(f"config file {p}{where} is not valid YAML: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return loaded


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, overlays: list[str | Path] | None = None
) -> Config:
    """Defaults <- YAML file <- overlay YAMLs (e.g. configs/cluster/slurm.yaml) <- ``--set`` overrides."""
    raw: dict = _read_yaml(path) if path else {}
    for overlay in overlays or []:
        raw = deep_merge(raw, _read_yaml(overlay))
    for item in overrides or []:
        raw = set_dotted(raw, *parse_override(item))
    cfg = build(Config, raw)
    validate(cfg)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
