"""Load and validate a run configuration.

The JSON schema ``config.schema.yaml`` (shipped inside the package; Snakemake validates with the same
file) is the single source of truth for keys,
types and defaults: Snakemake validates the same file with ``validate(config, schema)``, and the CLI
calls :func:`load` here, so a wrong key fails the same way in both before any work starts.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import warnings
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jsonschema
import yaml

from moegate.errors import MoegateError

SCHEMA_FILE = "config.schema.yaml"  # package data: one copy, for the CLI, a wheel install and the Snakefile
# renamed keys, old dotted key -> new: a config (or tuned params, a search space) that still says the old
# one is read as the new one with a FutureWarning; the schema knows only the new names
RENAMED = {
    "router.lambda_": "router.ponder_cost",
    "router.lambda_grid": "router.ponder_cost_grid",
}
# removed keys, old dotted key -> why: a config that still sets one is read without it, with a
# FutureWarning (an old run config keeps working); the schema no longer knows them
REMOVED = {
    "tuning.slurm": "moegate tune launch is gone: Snakemake's Slurm executor runs the tune_worker jobs "
                    "(resources in rules/tune.smk and slurm_profile/)",
}


class ConfigError(MoegateError, ValueError):
    """A configuration file or value is invalid; the message names the key path."""


def _schema_text() -> str:
    return resources.files("moegate").joinpath(SCHEMA_FILE).read_text()


def schema() -> dict[str, Any]:
    return yaml.safe_load(_schema_text())


@functools.cache
def _schema_cached() -> dict[str, Any]:
    return schema()


def defaults(section: str) -> dict[str, Any]:
    """The schema's defaults of one config section, e.g. ``defaults("router.head")``: key -> default, nested
    sections filled the way :func:`validate` fills them. Classes that take a section (HeadConfig,
    LoopSettings, OpenAISettings) read their defaults here, so they live once, in the schema."""
    node = _schema_cached()
    for key in section.split("."):
        props = node.get("properties") or {}
        if key not in props:
            raise KeyError(f"{SCHEMA_FILE}: no config section {section!r} (at {key!r})")
        node = props[key]
    return _fill(node, copy.deepcopy(node.get("default", {})))


def _fill(node: dict[str, Any], value: Any) -> Any:
    """``value`` with the defaults of ``node``'s properties filled in, recursively (objects only)."""
    if not isinstance(value, dict):
        return value
    for name, sub in (node.get("properties") or {}).items():
        if name not in value and "default" in sub:
            value[name] = copy.deepcopy(sub["default"])
        if name in value:
            value[name] = _fill(sub, value[name])
    return value


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


# -- dotted keys ("router.head.width"): overrides, trial parameters, tuned values ------------------------
_REQUIRED = object()  # get_dotted without a default: a missing key is an error


def get_dotted(config: dict[str, Any], dotted: str, default: Any = _REQUIRED) -> Any:
    """The value at ``dotted`` in ``config``; ``default`` when a part is missing (none given: ConfigError)."""
    node: Any = config
    for i, key in enumerate(dotted.split(".")):
        if not isinstance(node, dict) or key not in node:
            if default is not _REQUIRED:
                return default
            where = ".".join(dotted.split(".")[:i]) or "<top level>"
            raise ConfigError(f"{dotted}: the config has no key {key!r} in {where}")
        node = node[key]
    return node


def set_dotted(config: dict[str, Any], dotted: str, value: Any, create: bool = False) -> None:
    """Set ``dotted`` in ``config`` to ``value``, in place.

    ``create``: make missing sections (overrides of a config not yet filled with defaults); otherwise a
    missing section, or a value where a section should be, is a ConfigError naming the key.
    """
    node = config
    *parents, leaf = dotted.split(".")
    for i, key in enumerate(parents):
        if create and key not in node:
            node[key] = {}
        if not isinstance(node.get(key), dict):
            section = ".".join(parents[:i + 1])
            what = "no section" if key not in node else f"a value ({node[key]!r}), not a section, at"
            raise ConfigError(f"{dotted}: the config has {what} {section!r}")
        node = node[key]
    node[leaf] = value


def current_key(dotted: str, source: str = "config") -> str:
    """The key's current name: a renamed one (:data:`RENAMED`) gives its new name, with a FutureWarning."""
    new = RENAMED.get(dotted)
    if new is None:
        return dotted
    warnings.warn(f"{source}: {dotted} is deprecated, renamed {new}; read as {new} (rename it: the old name "
                  "will stop working)", FutureWarning, stacklevel=2)
    return new


def rename_deprecated(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Move renamed keys (:data:`RENAMED`) to their new names and drop removed ones (:data:`REMOVED`), in
    place, before schema validation.

    The config's own keys and the keys of every ``tuning.<study>.search_space``. Each old key found
    gives a FutureWarning naming the old and the new key (or why it was removed); both an old and its
    new key set at once is a ConfigError.
    """
    spaces = [(f"tuning.{study}.search_space", section["search_space"])
              for study, section in (config.get("tuning") or {}).items()
              if isinstance(section, dict) and isinstance(section.get("search_space"), dict)]
    absent = object()
    for old, new in RENAMED.items():
        value = get_dotted(config, old, absent)
        if value is not absent:
            if get_dotted(config, new, absent) is not absent:
                raise ConfigError(f"{source}: both {old} (deprecated) and {new} are set; keep only {new} (a "
                                  "config merged from two files, as snakemake --configfile over config.yaml, "
                                  "holds both when one file still says the old key)")
            parent, leaf = old.rsplit(".", 1)
            del get_dotted(config, parent)[leaf]
            set_dotted(config, current_key(old, source), value)
        for where, space in spaces:
            if old in space:
                if new in space:
                    raise ConfigError(f"{source}: {where} has both {old} (deprecated) and {new}; keep only {new}")
                space[current_key(old, f"{source}: {where}")] = space.pop(old)
    for old, why in REMOVED.items():
        if get_dotted(config, old, absent) is not absent:
            parent, leaf = old.rsplit(".", 1)
            del get_dotted(config, parent)[leaf]
            warnings.warn(f"{source}: {old} is no longer read and was ignored ({why}); remove it",
                          FutureWarning, stacklevel=2)
    return config


def validate(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate ``config`` in place, filling defaults; raise ConfigError naming the key path.

    Renamed keys are read under their new names first (:func:`rename_deprecated`)."""
    check_secrets(config, source)  # first: a schema error may quote the section that holds the secret
    rename_deprecated(config, source)
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
    router = cfg["router"]
    if not router["label_weight"] and not (router["teacher_weight"] and ds["teacher"]["enabled"]):
        raise ConfigError(f"{source}: router.label_weight is 0, so the router learns from the retrieval teacher "
                          f"alone: it needs router.teacher_weight > 0 and dataset.teacher.enabled")
    return cfg


# -- secrets: they live in the environment, never in a config (which is copied to results/) -----------
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# prefixes of common API keys and tokens (OpenAI/Anthropic sk-, Google AIza, GitHub, Slack, Hugging Face)
KEY_PREFIXES = ("sk-", "sk_", "AIza", "ghp_", "github_pat_", "xox", "hf_")
# query parameters that carry a secret in a URL (libpq reads ?password=, some APIs take ?key=)
SECRET_PARAMS = {"password", "pass", "pwd", "key", "api_key", "apikey", "api-key", "token", "access_token",
                 "secret"}
# keys that name an environment variable, with an example name
ENV_KEYS = {
    ("synthesize", "openai", "api_key_env"): "OPENAI_API_KEY",
    ("tuning", "password_env"): "MOEGATE_DB_PASSWORD",
}


def looks_like_secret(name: str) -> bool:
    """Whether ``name``, meant to name an environment variable, is no such name or looks like a key."""
    if not ENV_NAME.fullmatch(name) or name.startswith(KEY_PREFIXES):
        return True
    # variable names are short words; a key is a long run of mixed-case letters and digits
    return len(name) >= 32 and any(c.islower() for c in name) and any(c.isupper() for c in name) \
        and any(c.isdigit() for c in name)


def _url_secret(url: str, user_is_secret: bool) -> str | None:
    """What secret ``url`` carries (a password, user info when ``user_is_secret``, a ?key= parameter), or None."""
    try:
        parts = urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:  # a malformed port or netloc: let the stage that opens it say so
        return None
    if user_is_secret and (user or password):  # an HTTP API takes its key in a header, never in the URL
        return "credentials (user:key@ before the host)"
    if password:
        return "a password (user:password@ before the host)"
    for name, _ in parse_qsl(parts.query, keep_blank_values=True):
        if name.lower() in SECRET_PARAMS:
            return f"a ?{name}= parameter"
    return None


def _value(config: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    """The string at ``keys`` of a config that may not be validated yet (None when absent or not a string)."""
    node: Any = config
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, str) else None


def check_secrets(config: dict[str, Any], source: str = "config") -> None:
    """Raise ConfigError when a config value holds a secret, without echoing it.

    A database password in ``tuning.storage``, credentials in ``synthesize.openai.base_url``, or a key
    pasted where the name of an environment variable belongs: the resolved config is written to
    results/, so a secret in it would sit in a world-readable file. Works on a config before schema
    validation (whose error messages may quote whole sections), so it runs first.
    """
    storage = _value(config, ("tuning", "storage"))
    if storage and (what := _url_secret(storage, user_is_secret=False)):
        raise ConfigError(
            f"{source}: tuning.storage holds {what}; remove it from the URL "
            f"(postgresql+psycopg://user@host:5432/db) and export the password in the environment variable "
            f"named by tuning.password_env (default MOEGATE_DB_PASSWORD), or use PGPASSWORD / ~/.pgpass")
    base_url = _value(config, ("synthesize", "openai", "base_url"))
    if base_url and (what := _url_secret(base_url, user_is_secret=True)):
        raise ConfigError(
            f"{source}: synthesize.openai.base_url holds {what}; remove it from the URL and export the "
            f"key in the environment variable named by synthesize.openai.api_key_env")
    for keys, example in ENV_KEYS.items():
        name = _value(config, keys)
        if name is not None and looks_like_secret(name):
            raise ConfigError(
                f"{source}: {'.'.join(keys)}: expected the name of an environment variable (letters, digits "
                f"and _, not starting with a digit, e.g. {example}); the value given is not one, or looks "
                f"like a key itself (not shown): put the key in that variable, never in the config")


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
        set_dotted(config, current_key(dotted, f"{path}: override"), value, create=True)
    return validate(config, source=str(path))


def dump(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)
