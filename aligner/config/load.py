"""Compose a job config from ``conf/`` with Hydra, type it with the schema, and write it back out.

``load_config("dpo", ["dpo.beta=0.2"])`` composes ``conf/dpo.yaml`` (its defaults list names the
schema and the model size), applies the overrides with Hydra's grammar (``key=value``,
``model=llama3_8b`` to switch a group, ``+key=value``), and returns the typed dataclass
(``DPOJobConfig``). Any failure is a :class:`ConfigError` naming the key, the file or override it came
from, and the nearest valid key or the expected type.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from aligner.config.errors import (
    ConfigError,
    display_path,
    explain,
    find_override,
    nearest,
    unknown_key_error,
    valid_keys_at,
    where_from_hydra,
)
from aligner.config.jobs import JOB_SCHEMAS, register_job_schemas

_REPO_CONF = Path(__file__).resolve().parents[2] / "conf"


def conf_dir() -> Path:
    """The directory of the shipped YAML configs: ``$ALIGNER_CONF_DIR`` or the repository's ``conf/``."""
    return Path(os.environ.get("ALIGNER_CONF_DIR", _REPO_CONF)).resolve()


def available_configs() -> list[str]:
    """Config names under ``conf/`` that ``load_config`` accepts (``dpo``, ``examples/llama3_70b_dpo``)."""
    root = conf_dir()
    names = [str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")]
    return sorted(n for n in names if not n.startswith("model/"))


def _locate(algorithm_or_yaml: str) -> tuple[Path, str]:
    """(directory to search first, config name in it) for a name under conf/ or a YAML path."""
    root = conf_dir()
    if algorithm_or_yaml.endswith(".yml"):
        raise ConfigError(f"{algorithm_or_yaml}: Hydra reads '.yaml' files; rename it to end in .yaml")
    if algorithm_or_yaml.endswith(".yaml") or Path(algorithm_or_yaml).is_file():
        path = Path(algorithm_or_yaml).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"config file {algorithm_or_yaml} does not exist")
        try:
            return root, str(path.relative_to(root).with_suffix(""))
        except ValueError:
            return path.parent, path.stem
    name = algorithm_or_yaml.removesuffix("/")
    if not (root / f"{name}.yaml").is_file():
        options = available_configs()
        best = nearest(name, options)
        hint = f"did you mean '{best}'? " if best else ""
        raise ConfigError(f"no config '{name}' in {display_path(root)}; {hint}available: {', '.join(options)} "
                          f"(or pass the path of a YAML file)")
    return root, name


def _config_file(search_dirs: list[Path]):
    def find(name: str) -> str:
        for d in search_dirs:
            if (d / f"{name}.yaml").is_file():
                return display_path(d / f"{name}.yaml")
        return "a structured schema" if name.endswith("_schema") else name

    return find


def _guess_schema(search_dirs: list[Path], name: str, depth: int = 0) -> Optional[type]:
    """The job schema a config file builds on, from its defaults list or its algorithm section."""
    path = next((d / f"{name}.yaml" for d in search_dirs if (d / f"{name}.yaml").is_file()), None)
    if path is None or depth > 8:
        return None
    try:
        raw = OmegaConf.load(path)
    except Exception:  # not YAML: Hydra reports it with the file name when it composes
        return None
    if not isinstance(raw, DictConfig):
        return None
    for entry in raw.get("defaults", []) or []:
        if isinstance(entry, str):
            entry = entry.strip()
            if entry.endswith("_schema") and entry.removesuffix("_schema") in JOB_SCHEMAS:
                return JOB_SCHEMAS[entry.removesuffix("_schema")]
            found = _guess_schema(search_dirs, entry.lstrip("/"), depth + 1)
            if found is not None:
                return found
    sections = [k for k in raw.keys() if k in JOB_SCHEMAS]
    return JOB_SCHEMAS[sections[0]] if len(sections) == 1 else None


def _check_choices(obj: Any, prefix: str, overrides: list[str], origin: str) -> None:
    """Raise ConfigError for a ``choice`` field whose value is not one of its choices."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            override = find_override(overrides, key)
            where = f"command-line override '{override}'" if override else origin
            best = nearest(str(value), list(choices))
            hint = f"; did you mean '{best}'?" if best else ""
            raise ConfigError(f"{where}: '{key}' is '{value}', which is not one of {', '.join(choices)}{hint}")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _check_choices(value, f"{key}.", overrides, origin)


def _missing_group_option(exc: Exception, overrides: list[str], search_dirs: list[Path], config_file) -> ConfigError:
    """ConfigError for ``model=llama3_7b`` (an option of a config group that does not exist)."""
    m = re.search(r"Could not find '(?:/)?([^']+)/([^'/]+)'", str(exc))
    if m is None:
        return explain(exc, where_from_hydra(exc, overrides, config_file), None)
    group, option = m.groups()
    options = sorted({p.stem for d in search_dirs for p in (d / group).glob("*.yaml")})
    override = next((o for o in overrides if o.split("=", 1)[0].lstrip("+~").split("@")[0] == group
                     and o.endswith(f"={option}")), None)
    where = f"command-line override '{override}'" if override else where_from_hydra(exc, overrides, config_file)
    best = nearest(option, options)
    hint = f"did you mean '{best}'? " if best else ""
    return ConfigError(f"{where}: no config '{option}' in group '{group}'; {hint}options: {', '.join(options)}")


def _check_no_extra_keys(node: DictConfig, schema: type, prefix: str, overrides: list[str], origin: str) -> None:
    """Raise ConfigError for a key the schema does not have (Hydra's ``+key=value`` can add one)."""
    options = valid_keys_at(schema, prefix.rstrip("."))
    for key in node.keys():
        dotted = f"{prefix}{key}"
        if key not in options:
            override = find_override(overrides, dotted)
            raise unknown_key_error(f"command-line override '{override}'" if override else origin, dotted, schema)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and valid_keys_at(schema, dotted):
            _check_no_extra_keys(child, schema, f"{dotted}.", overrides, origin)


def load_config(algorithm_or_yaml: str, overrides: Sequence[str] = ()) -> Any:
    """Compose a config name under ``conf/`` (``"dpo"``, ``"examples/llama3_70b_dpo"``) or a YAML path
    with command-line ``overrides`` and return the typed job config (e.g. ``DPOJobConfig``).

    A YAML file outside ``conf/`` may use ``conf/``'s groups in its defaults list (``- /dpo``,
    ``- override /model: llama3_8b``). A file without a schema in its defaults (such as a saved
    ``config.yaml``) is typed by its algorithm section (``dpo:`` -> ``DPOJobConfig``).
    Clears an already initialised Hydra (``GlobalHydra``) first.
    """
    register_job_schemas()
    overrides = list(overrides)
    search_dir, name = _locate(algorithm_or_yaml)
    search_dirs = [search_dir] if search_dir == conf_dir() else [search_dir, conf_dir()]
    hydra_overrides = list(overrides)
    if len(search_dirs) > 1:
        hydra_overrides.append(f"hydra.searchpath=[file://{conf_dir()}]")
    schema = _guess_schema(search_dirs, name)
    config_file = _config_file(search_dirs)
    origin = f"config '{name}' ({config_file(name)}, or a file it includes)"
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(search_dir), version_base="1.3", job_name="aligner"):
        try:
            composed = compose(config_name=name, overrides=hydra_overrides)
        except MissingConfigException as e:
            raise _missing_group_option(e, overrides, search_dirs, config_file) from None
        except Exception as e:  # Hydra, OmegaConf, and OmegaConf's own bugs: all reported the same way
            raise explain(e, where_from_hydra(e, overrides, config_file), schema) from None
    if OmegaConf.get_type(composed) is dict:
        # No schema in the defaults list: type it here (keys Hydra accepted untyped are checked now).
        if schema is None:
            raise ConfigError(f"{origin}: cannot tell which job this is; start its defaults list with one of "
                              f"{', '.join(k + '_schema' for k in JOB_SCHEMAS)}, or give it a top-level section "
                              f"named after its algorithm ({', '.join(JOB_SCHEMAS)})")
        try:
            composed = OmegaConf.merge(OmegaConf.structured(schema), composed)
        except OmegaConfBaseException as e:
            raise explain(e, origin, schema) from None
    schema = OmegaConf.get_type(composed)
    try:
        cfg = OmegaConf.to_object(composed)
    except OmegaConfBaseException as e:
        raise explain(e, origin, schema) from None
    _check_no_extra_keys(composed, schema, "", overrides, origin)
    _check_choices(cfg, "", overrides, origin)
    return cfg


def config_to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text (every key, defaults included)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_resolved_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config to ``path`` (written to a temporary name, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(config_to_yaml(cfg))
    tmp.replace(path)
    return path
