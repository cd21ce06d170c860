"""Load and validate a run configuration.

The JSON schema in ``workflow/schemas/config.schema.yaml`` is the single source of truth for keys,
types and defaults: Snakemake validates the same file with ``validate(config, schema)``, and the CLI
calls :func:`load` here, so a wrong key fails the same way in both before any work starts.
"""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the key path."""


def _schema_text() -> str:
    if SCHEMA_PATH.is_file():  # editable install / source checkout
        return SCHEMA_PATH.read_text()
    return resources.files("moegate").joinpath("config.schema.yaml").read_text()  # wheel install


def schema() -> dict[str, Any]:
    return yaml.safe_load(_schema_text())


def _with_defaults(validator_class):
    """A validator that fills schema defaults in place (objects first, so nested defaults apply)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _key_path(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    return path or "<top level>"


def validate(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate ``config`` in place, filling defaults; raise ConfigError naming the key path."""
    sch = schema()
    cls = _with_defaults(jsonschema.validators.validator_for(sch))
    errors = sorted(cls(sch).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{source}: invalid configuration"]
        for e in errors:
            lines.append(f"  {_key_path(e)}: {e.message}")
        raise ConfigError("\n".join(lines))
    cfg = config
    ingest = cfg["ingest"]
    if ingest["chunk_overlap"] >= ingest["chunk_tokens"]:
        raise ConfigError(f"{source}: ingest.chunk_overlap must be smaller than ingest.chunk_tokens")
    ds = cfg["dataset"]
    if ds["val_fraction"] + ds["test_fraction"] >= 0.9:
        raise ConfigError(f"{source}: dataset.val_fraction + dataset.test_fraction must leave a training split")
    return cfg


def load(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML config file, apply ``overrides`` (dotted keys), validate and fill defaults."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(config).__name__}")
    for dotted, value in (overrides or {}).items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return validate(config, source=str(path))


def dump(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)
