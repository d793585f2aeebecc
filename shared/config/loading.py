"""SimpleTuner-style configuration: ``config.json`` + ``multidatabackend.json`` → typed, validated objects.

Parsed once at the edge (CLI, gRPC request) into the frozen dataclasses of ``shared.config.schema``; nothing
downstream sees a dict. All problems are collected and raised together as one ConfigError, each with its file and
JSON path. Keys EditTuner does not use are returned as warnings (reported once by the caller), never dropped
silently and never fatal.

Keys may be written with SimpleTuner's ``--`` prefix (``"--model_type": "lora"``). ``key=value`` overrides
(``learning_rate=1e-4``, ``model_kwargs.match_target_res=true``) are applied to the config file before parsing.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from shared.config import jsonc
from shared.config.checks import check_datasets
from shared.config.schema import DataConfig, DatasetConfig, ModelKwargs, RunConfig, TrainConfig
from shared.config.typed import build
from shared.errors import ConfigError, Problem


# ------------------------------------------------------------------------------------------------- loading
def _strip_dashes(raw: dict[str, Any]) -> dict[str, Any]:
    return {(k[2:] if isinstance(k, str) and k.startswith("--") else k): v for k, v in raw.items()}


def parse_override(arg: str) -> tuple[list[str], Any]:
    """'a.b=value' → (['a', 'b'], value); the value is JSON when it parses as JSON, else the raw string."""
    if "=" not in arg:
        raise ConfigError([Problem(arg, "overrides are written key=value, e.g. learning_rate=1e-4")])
    key, _, text = arg.partition("=")
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError([Problem(arg, "empty key in key=value override")])
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = json.loads(json.dumps(raw))
    for arg in overrides:
        path, value = parse_override(arg)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([Problem(arg, f"{part} is not an object; cannot set {'.'.join(path)}")])
        node[path[-1]] = value
    return out


def preset_names() -> list[str]:
    root = resources.files("shared.config") / "presets"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file())


def preset_dir(name: str) -> Path:
    """The bundled preset directory for ``example=NAME``."""
    names = preset_names()
    if name not in names:
        hint = difflib.get_close_matches(name, names, n=1)
        raise ConfigError([Problem(f"example={name}", "no such preset" + (f" (did you mean {hint[0]!r}?)" if hint
                                   else "") + "; available: " + ", ".join(names))])
    return Path(str(resources.files("shared.config") / "presets" / name))


def _parse_train(raw: Any, source: str, problems: list[Problem], ignored: list[str]) -> TrainConfig:
    if not isinstance(raw, dict):
        problems.append(Problem(source, "config.json must be a JSON object of option: value"))
        raw = {}
    raw = _strip_dashes(raw)
    mk_raw = raw.pop("model_kwargs", {}) or {}
    mk = ModelKwargs()
    if isinstance(mk_raw, dict):
        mk = build(ModelKwargs, mk_raw, f"{source}: $.model_kwargs", problems, ignored)
    else:
        problems.append(Problem(f"{source}: $.model_kwargs", "expected an object like {\"match_target_res\": true}"))
    cfg = build(TrainConfig, raw, f"{source}: $", problems, ignored)
    return dataclasses.replace(cfg, model_kwargs=mk)


def _parse_data(raw: Any, source: str, problems: list[Problem], ignored: list[str]) -> DataConfig:
    if not isinstance(raw, list):
        problems.append(Problem(source, "multidatabackend.json must be a JSON list of dataset objects"))
        return DataConfig(source, ())
    out = []
    for i, entry in enumerate(raw):
        where = f"{source}: $[{i}]"
        if not isinstance(entry, dict):
            problems.append(Problem(where, "each dataset must be a JSON object"))
            continue
        d = build(DatasetConfig, _strip_dashes(entry), where, problems, ignored)
        if not d.disabled:
            out.append(d)
    return DataConfig(source, tuple(out))


def _locate_data_config(train_raw: dict[str, Any], config_path: Path | None) -> str | None:
    value = train_raw.get("data_backend_config") or train_raw.get("--data_backend_config")
    if not isinstance(value, str):
        return None
    p = Path(value)
    if p.is_absolute() or p.exists() or config_path is None:
        return value
    here = config_path.resolve().parent
    for base in (here, *here.parents):  # 'config/…' relative to a project root
        if (base / p).exists():
            return str(base / p)
    return value


def load_run_config(config: str | Path | None = None, data: str | Path | None = None,
                    overrides: list[str] | tuple[str, ...] = (), example: str | None = None) -> RunConfig:
    """Read, override and validate both files; raises one ConfigError listing every problem."""
    overrides = list(overrides)
    for o in overrides:
        parse_override(o)  # syntax first: a typo in an override is reported before any file is read
    examples = [o.partition("=")[2] for o in overrides if o.startswith("example=")]
    overrides = [o for o in overrides if not o.startswith("example=")]
    example = example or (examples[-1] if examples else None)
    if example is not None:
        pdir = preset_dir(example)
        config = config or pdir / "config.json"
        data = data or pdir / "multidatabackend.json"
    if config is None:
        raise ConfigError([Problem("--config", "give --config path/to/config.json (or example=NAME for a "
                                   "bundled preset: " + ", ".join(preset_names()) + ")")])
    config_path = Path(config)
    cfg_label = str(config_path)
    train_raw = jsonc.load(config_path)
    if isinstance(train_raw, dict):
        train_raw = apply_overrides(_strip_dashes(train_raw), overrides)
    problems: list[Problem] = []
    ignored: list[str] = []
    train = _parse_train(train_raw, cfg_label, problems, ignored)

    data_label = str(data) if data is not None else (
        _locate_data_config(train_raw, config_path) if isinstance(train_raw, dict) else None)
    if data_label is None:
        problems.append(Problem(f"{cfg_label}: $.data_backend_config", "no dataset file: pass --data "
                                "multidatabackend.json or set data_backend_config"))
        raise ConfigError(problems)
    try:
        data_raw = jsonc.load(data_label)
    except ConfigError as e:
        raise ConfigError(problems + e.problems) from None
    return _finish(train, data_raw, cfg_label, data_label, problems, ignored)


def _finish(train: TrainConfig, data_raw: Any, cfg_label: str, data_label: str, problems: list[Problem],
            ignored: list[str]) -> RunConfig:
    dcfg = _parse_data(data_raw, data_label, problems, ignored)
    cross, warnings = check_datasets(train, dcfg, cfg_label)
    problems.extend(cross)
    if problems:
        raise ConfigError(problems)
    if ignored:
        warnings.insert(0, "ignoring keys EditTuner does not use: " + ", ".join(ignored))
    if train.data_backend_config != data_label:
        train = dataclasses.replace(train, data_backend_config=data_label)
    return RunConfig(train=train, data=dcfg, config_source=cfg_label, warnings=tuple(warnings))


@dataclass(frozen=True)
class ConfigFiles:
    """A run's two files as text, as a client sends them to a service."""

    config_text: str
    data_text: str
    overrides: tuple[str, ...]
    config_name: str
    data_name: str


def read_config_files(config: str | Path | None = None, data: str | Path | None = None,
                      overrides: list[str] | tuple[str, ...] = ()) -> ConfigFiles:
    """Find and read the files as ``load_run_config`` would (presets, data_backend_config), validating them
    here first so that a client reports bad input before anything is sent."""
    run = load_run_config(config, data, overrides)
    rest = tuple(o for o in overrides if not o.startswith("example="))
    return ConfigFiles(Path(run.config_source).read_text(encoding="utf-8"),
                       Path(run.data.source).read_text(encoding="utf-8"), rest, run.config_source, run.data.source)


def load_run_config_text(config_text: str, data_text: str, overrides: list[str] | tuple[str, ...] = (), *,
                         config_name: str = "config.json", data_name: str = "multidatabackend.json") -> RunConfig:
    """The same as ``load_run_config`` for files that arrived as text (a gRPC request): the names are only
    used in messages, so a user still reads 'config.json:3:7' for their own file."""
    overrides = [o for o in overrides if not o.startswith("example=")]
    for o in overrides:
        parse_override(o)
    problems: list[Problem] = []
    ignored: list[str] = []
    train_raw: Any = None
    data_raw: Any = None
    for text, name in ((config_text, config_name), (data_text, data_name)):
        try:
            parsed = jsonc.loads(text, name)
        except ConfigError as e:
            problems.extend(e.problems)
            parsed = None
        if name == config_name:
            train_raw = parsed
        else:
            data_raw = parsed
    if problems:
        raise ConfigError(problems)
    if isinstance(train_raw, dict):
        train_raw = apply_overrides(_strip_dashes(train_raw), overrides)
    train = _parse_train(train_raw, config_name, problems, ignored)
    return _finish(train, data_raw, config_name, data_name, problems, ignored)
