"""SimpleTuner-style configuration: ``config.json`` + ``multidatabackend.json`` → typed, validated objects.

Parsed once at the edge (CLI, gRPC request) into the frozen dataclasses of ``shared.config.schema``; nothing
downstream sees a dict. A process parses a given pair of files once: ``load_run_config_text`` is a pure function of
its arguments and remembers its last results, so a service's job, or the client's upload step, gets the
``RunConfig`` its request was validated with (``config_parses`` counts the real parses, for the logs and tests).
All problems are collected and raised together as one ConfigError, each with its file and JSON path. Keys
EditTuner does not use are returned as warnings (reported once by the caller), never dropped silently and never
fatal.

Keys may be written with SimpleTuner's ``--`` prefix (``"--model_type": "lora"``). ``key=value`` overrides
(``learning_rate=1e-4``, ``model_kwargs.match_target_res=true``) are applied to the config file before parsing.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import logging
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from shared.config import jsonc
from shared.config.checks import check_datasets, check_processes, check_rollout, check_schedule
from shared.config.schema import DataConfig, DatasetConfig, ModelKwargs, RunConfig, TrainConfig
from shared.config.simpletuner import DATASET_RULES, TRAIN_RULES, Rule, translate, value_alias, value_problem
from shared.config.typed import build, names
from shared.errors import ConfigError, Problem

log = logging.getLogger(__name__)
REMEMBERED = 16  # the distinct file sets a process keeps parsed (a service sees a few runs at a time)
_parsed: collections.OrderedDict[tuple[object, ...], RunConfig] = collections.OrderedDict()
_parsed_lock = threading.Lock()
_parses = 0


def config_parses() -> int:
    """How many times this process has parsed a config (not counting the answers ``load_run_config_text`` gave
    from what it remembered)."""
    return _parses


def _count_parse(config_name: str) -> None:
    global _parses
    with _parsed_lock:
        _parses += 1
        n = _parses
    log.info("parsed the run config %s (parse %d of this process)", config_name, n)


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
    out: dict[str, Any] = json.loads(json.dumps(raw))
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
        raise ConfigError(
            [
                Problem(
                    f"example={name}",
                    "no such preset"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + "; available: "
                    + ", ".join(names),
                )
            ]
        )
    return Path(str(resources.files("shared.config") / "presets" / name))


def _sorted_keys(
    raw: dict[str, Any],
    cls: type,
    rules: dict[str, Rule],
    where: str,
    problems: list[Problem],
    ignored: list[str],
    *,
    simpletuner_level: bool,
) -> dict[str, Any]:
    """SimpleTuner's names → ours (``shared.config.simpletuner``); values EditTuner refuses are problems."""
    t = translate(raw, where, names(cls), rules, simpletuner_level=simpletuner_level)
    problems.extend(t.problems)
    ignored.extend(t.ignored)
    ignored.extend(f"{u} [unknown key]" for u in t.unknown)
    for key, value in list(t.raw.items()):
        t.raw[key] = value = value_alias(key, value)
        if (msg := value_problem(key, value)) is not None:
            problems.append(Problem(f"{where}.{key}", f"{value!r} is not supported: {msg}"))
            del t.raw[key]
    return t.raw


def _steps_or_epochs(raw: dict[str, Any], where: str, problems: list[Problem]) -> None:
    """SimpleTuner's rule: num_train_epochs counts when max_train_steps is 0 or absent; both at once is an error."""

    def number(key: str) -> float:
        try:
            return float(raw.get(key) or 0)
        except (TypeError, ValueError):
            return 0.0  # the field's own check reports it

    steps, epochs = number("max_train_steps"), number("num_train_epochs")
    if epochs > 0 and steps > 0:
        problems.append(
            Problem(
                f"{where}.max_train_steps",
                f"both max_train_steps ({raw['max_train_steps']}) and "
                "num_train_epochs ({}) are set; set num_train_epochs to 0 to train by steps, or "
                "max_train_steps to 0 to train by epochs".format(raw["num_train_epochs"]),
            )
        )
    elif epochs > 0:
        raw["max_train_steps"] = 0
    elif "max_train_steps" in raw and steps == 0 and raw.get("max_train_steps") is not None:
        problems.append(
            Problem(
                f"{where}.max_train_steps",
                "is 0 and num_train_epochs is not set: give the run a length with max_train_steps or num_train_epochs",
            )
        )
    if raw.get("max_train_steps") is None and epochs == 0:
        raw.pop("max_train_steps", None)  # the default


def _parse_train(raw: Any, source: str, problems: list[Problem], ignored: list[str]) -> TrainConfig:
    if not isinstance(raw, dict):
        problems.append(Problem(source, "config.json must be a JSON object of option: value"))
        raw = {}
    raw = _strip_dashes(raw)
    mk_raw = raw.pop("model_kwargs", {}) or {}
    raw = _sorted_keys(raw, TrainConfig, TRAIN_RULES, f"{source}: $", problems, ignored, simpletuner_level=True)
    _steps_or_epochs(raw, f"{source}: $", problems)
    mk = ModelKwargs()
    if isinstance(mk_raw, dict):
        mk = build(ModelKwargs, mk_raw, f"{source}: $.model_kwargs", problems, ignored)
    else:
        problems.append(Problem(f"{source}: $.model_kwargs", 'expected an object like {"match_target_res": true}'))
    cfg = build(TrainConfig, raw, f"{source}: $", problems, ignored)
    return dataclasses.replace(cfg, model_kwargs=mk)


DATASET_DEFAULTS = (
    "resolution",
    "resolution_type",
    "minimum_image_size",
    "maximum_image_size",
    "target_downsample_size",
)


def _dataset_type(entry: dict[str, Any], referenced: set[str]) -> None:
    """SimpleTuner's rule, case-insensitive: an entry with a conditioning_type, or (absent a dataset_type) named in
    another's conditioning_data, is a conditioning dataset; otherwise an image dataset."""
    dt = entry.get("dataset_type")
    if isinstance(dt, str):
        entry["dataset_type"] = dt = dt.strip().lower()
    if entry.get("conditioning_type") is not None and dt in (None, "image"):
        entry["dataset_type"] = "conditioning"
    elif dt is None:
        entry["dataset_type"] = "conditioning" if entry.get("id") in referenced else "image"


def _placeholders(entry: dict[str, Any], train: TrainConfig) -> None:
    """SimpleTuner's {model_family}, {output_dir} and {id} in paths."""
    for key in ("instance_data_dir", "cache_dir_vae", "cache_dir", "aws_data_prefix"):
        v = entry.get(key)
        if isinstance(v, str) and "{" in v:
            entry[key] = (
                v.replace("{model_family}", train.model_family)
                .replace("{output_dir}", train.output_dir)
                .replace("{id}", str(entry.get("id", "")))
            )


def _parse_data(
    raw: Any, source: str, problems: list[Problem], ignored: list[str], train: TrainConfig | None = None
) -> DataConfig:
    if not isinstance(raw, list):
        problems.append(Problem(source, "multidatabackend.json must be a JSON list of dataset objects"))
        return DataConfig(source, ())
    train = train or TrainConfig(model_flavour="edit-v2")
    entries = [_strip_dashes(e) if isinstance(e, dict) else e for e in raw]
    referenced = {
        r
        for e in entries
        if isinstance(e, dict)
        for r in (
            [e["conditioning_data"]]
            if isinstance(e.get("conditioning_data"), str)
            else e.get("conditioning_data") or []
        )
        if isinstance(r, str)
    }
    out = []
    for i, entry in enumerate(entries):
        where = f"{source}: $[{i}]"
        if not isinstance(entry, dict):
            problems.append(Problem(where, "each dataset must be a JSON object"))
            continue
        if entry.get("disabled") is True or entry.get("disable") is True:
            continue  # SimpleTuner skips a disabled entry whole, whatever else it says
        entry = dict(entry)
        _dataset_type(entry, referenced)
        _placeholders(entry, train)
        if entry.get("dataset_type") == "image":
            for key in DATASET_DEFAULTS + ("caption_strategy",):
                if key not in entry and getattr(train, key) is not None:
                    entry[key] = getattr(train, key)
        elif entry.get("dataset_type") == "conditioning" and "caption_strategy" not in entry:
            entry["caption_strategy"] = None  # references' captions are not used
        entry = _sorted_keys(entry, DatasetConfig, DATASET_RULES, where, problems, ignored, simpletuner_level=False)
        d = build(DatasetConfig, entry, where, problems, ignored)
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


def load_run_config(
    config: str | Path | None = None,
    data: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    example: str | None = None,
) -> RunConfig:
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
        raise ConfigError(
            [
                Problem(
                    "--config",
                    "give --config path/to/config.json (or example=NAME for a "
                    "bundled preset: " + ", ".join(preset_names()) + ")",
                )
            ]
        )
    config_path = Path(config)
    cfg_label = str(config_path)
    train_raw = jsonc.load(config_path)
    if isinstance(train_raw, dict):
        train_raw = apply_overrides(_strip_dashes(train_raw), overrides)
    problems: list[Problem] = []
    ignored: list[str] = []
    train = _parse_train(train_raw, cfg_label, problems, ignored)

    data_label = (
        str(data)
        if data is not None
        else (_locate_data_config(train_raw, config_path) if isinstance(train_raw, dict) else None)
    )
    if data_label is None:
        problems.append(
            Problem(
                f"{cfg_label}: $.data_backend_config",
                "no dataset file: pass --data multidatabackend.json or set data_backend_config",
            )
        )
        raise ConfigError(problems)
    try:
        data_raw = jsonc.load(data_label)
    except ConfigError as e:
        raise ConfigError(problems + e.problems) from None
    return _finish(train, data_raw, cfg_label, data_label, problems, ignored)


def _finish(
    train: TrainConfig, data_raw: Any, cfg_label: str, data_label: str, problems: list[Problem], ignored: list[str]
) -> RunConfig:
    _count_parse(cfg_label)
    dcfg = _parse_data(data_raw, data_label, problems, ignored, train)
    cross, warnings = check_datasets(train, dcfg, cfg_label)
    problems.extend(cross)
    problems.extend(check_schedule(train, cfg_label) + check_processes(train, cfg_label))
    warnings.extend(check_rollout(train, cfg_label))
    if problems:
        raise ConfigError(problems)
    unknown = [k[: -len(" [unknown key]")] for k in ignored if k.endswith(" [unknown key]")]
    dropped = [k for k in ignored if not k.endswith(" [unknown key]")]
    if unknown:
        warnings.insert(
            0, "ignoring unknown keys (neither EditTuner's nor SimpleTuner's options): " + _by_file(unknown, ", ")
        )
    if dropped:
        warnings.insert(0, "ignoring keys that change nothing here: " + _by_file(dropped, "; "))
    if train.data_backend_config != data_label:
        train = dataclasses.replace(train, data_backend_config=data_label)
    return RunConfig(train=train, data=dcfg, config_source=cfg_label, warnings=tuple(warnings))


def _by_file(entries: list[str], sep: str) -> str:
    """'config.json: $.a; config.json: $.b' → 'config.json: $.a; $.b' (each file named once)."""
    out, last = [], None
    for e in entries:
        source, colon, rest = e.partition(": $")
        if colon and source == last:
            out.append("$" + rest)
        else:
            out.append(e)
            last = source if colon else None
    return sep.join(out)


@dataclass(frozen=True)
class ConfigFiles:
    """A run's two files as text, as a client sends them to a service."""

    config_text: str
    data_text: str
    overrides: tuple[str, ...]
    config_name: str
    data_name: str


def read_run_files(
    config: str | Path | None = None, data: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[ConfigFiles, RunConfig]:
    """Find and read the files as ``load_run_config`` would (presets, data_backend_config), validating them here
    first so that a client reports bad input before anything is sent; the files as text and their RunConfig
    (which ``load_run_config_text`` of the same text then returns without parsing again)."""
    run = load_run_config(config, data, overrides)
    rest = tuple(o for o in overrides if not o.startswith("example="))
    files = ConfigFiles(
        Path(run.config_source).read_text(encoding="utf-8"),
        Path(run.data.source).read_text(encoding="utf-8"),
        rest,
        run.config_source,
        run.data.source,
    )
    _remember(_key(files.config_text, files.data_text, rest, files.config_name, files.data_name), run)
    return files, run


def read_config_files(
    config: str | Path | None = None, data: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ConfigFiles:
    """``read_run_files`` without the RunConfig."""
    return read_run_files(config, data, overrides)[0]


def _key(
    config_text: str, data_text: str, overrides: tuple[str, ...], config_name: str, data_name: str
) -> tuple[object, ...]:
    return (config_text, data_text, tuple(o for o in overrides if not o.startswith("example=")), config_name, data_name)


def _remember(key: tuple[object, ...], run: RunConfig) -> None:
    with _parsed_lock:
        _parsed[key] = run
        _parsed.move_to_end(key)
        while len(_parsed) > REMEMBERED:
            _parsed.popitem(last=False)


def load_run_config_text(
    config_text: str,
    data_text: str,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    config_name: str = "config.json",
    data_name: str = "multidatabackend.json",
) -> RunConfig:
    """The same as ``load_run_config`` for files that arrived as text (a gRPC request): the names are only
    used in messages, so a user still reads 'config.json:3:7' for their own file. The same arguments again give
    the same (frozen) RunConfig without parsing; a config that fails is parsed again each time (its problems may
    name server paths that have changed since)."""
    key = _key(config_text, data_text, tuple(overrides), config_name, data_name)
    with _parsed_lock:
        known = _parsed.get(key)
        if known is not None:
            _parsed.move_to_end(key)
            return known
    run = _parse_text(config_text, data_text, overrides, config_name, data_name)
    _remember(key, run)
    return run


def _parse_text(
    config_text: str, data_text: str, overrides: list[str] | tuple[str, ...], config_name: str, data_name: str
) -> RunConfig:
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
