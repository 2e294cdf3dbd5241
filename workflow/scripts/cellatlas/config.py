"""Configuration: validation against the JSON schema (YAML), defaults, one-line errors."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from cellatlas.errors import ConfigError


def _with_defaults(validator_class):
    """A validator that fills ``default`` values in while it validates (jsonschema FAQ recipe)."""
    from jsonschema import validators

    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


def _path(error) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def _message(error) -> str:
    if error.validator == "additionalProperties":
        return error.message.replace("Additional properties are not allowed", "unknown key(s)")
    if error.validator == "required":
        return error.message.replace("is a required property", "is required")
    return error.message


def validate(config: dict[str, Any], schema: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """Validate ``config`` in place, filling in the schema's defaults.

    Raises
    ------
    ConfigError
        One line: ``config key 'qc.mode': 'fancy' is not one of ['fixed', 'mad']``.
    """
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    if not isinstance(schema, Mapping):
        schema = yaml.safe_load(Path(schema).read_text())
    validator = _with_defaults(Draft202012Validator)(schema)
    error = best_match(validator.iter_errors(config))
    if error is not None:
        raise ConfigError(f"config key '{_path(error)}': {_message(error)}")
    _check_cross_fields(config)
    return config


def _check_cross_fields(config: dict[str, Any]) -> None:
    """Rules a JSON schema cannot express."""
    cl = config.get("cluster", {})
    if "marker_resolution" in cl and cl["marker_resolution"] not in cl.get("resolutions", []):
        raise ConfigError(
            f"config key 'cluster.marker_resolution': {cl['marker_resolution']} is not one of "
            f"cluster.resolutions {cl.get('resolutions')}"
        )
    if len(set(cl.get("resolutions", []))) != len(cl.get("resolutions", [])):
        raise ConfigError(f"config key 'cluster.resolutions': duplicate values in {cl['resolutions']}")
