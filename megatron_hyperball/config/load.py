"""Reading a config: YAML file + command-line overrides -> validated :class:`HyperballConfig`.

Overrides (any key, any depth), parsed with YAML value semantics and validated like the file:

    --set optimizer.lr=0.01 --set model.moe.topk=4      # --set takes one or more KEY=VALUE
    optimizer.lr=0.01 schedule.train_iters=200           # bare KEY=VALUE arguments work too
    optimizer.lr_law=null                                # null / ~ / empty value: None (removes a block)
    optimizer.betas=[0.9,0.99]   data.data_path=/d/a     # flow YAML: lists, maps, strings
    seed=7 precision=fp32                                # top-level keys

A later override of the same key wins; a dotted key creates missing sections on the way. The
resolved config can be written next to a checkpoint and loaded back as it is.

``--config`` takes a file or the name of a shipped config (:func:`resolve_config`): an existing
file wins; else ``quickstart`` (or ``quickstart.yaml``) is the package's
``megatron_hyperball/configs/quickstart.yaml`` (the repository's ``configs/`` in a checkout or an
editable install); anything else is refused with the list of names. Relative paths inside a config
(data, checkpoint, TensorBoard, W&B, tokenizer files) are relative to the working directory of the
run, never to the config file: a shipped config run by name writes where the user stands, not into
the installed package.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml

from megatron_hyperball.config.schema import ConfigError, HyperballConfig, validate_config

__all__ = [
    "RESOLVED_CONFIG_NAME", "read_yaml", "parse_override", "parse_overrides", "apply_overrides",
    "load_config", "add_config_arguments", "split_argv", "config_from_argv", "resolved_config_yaml",
    "save_resolved_config", "SHIPPED_CONFIGS", "shipped_configs_dir", "shipped_configs", "resolve_config",
]

RESOLVED_CONFIG_NAME = "hyperball_config.yaml"
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_BARE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (it keeps the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            continue  # the base constructor reports an unhashable key
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"found key {key!r} twice (first on {seen[key]}); allowed: each key once per section",
                key_node.start_mark)
        seen[key] = f"line {key_node.start_mark.line + 1}"
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: 'line L, column C: what'."""
    mark = getattr(e, "problem_mark", None)
    what = "; ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    text = f"{where}{what}"
    return text if "allowed:" in text else f"{text}; allowed: valid YAML"


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    source = str(path)
    if path.is_dir():
        raise ConfigError([("", "is a directory; allowed: a YAML config file")], source)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError([("", f"cannot read config file: {e.strerror or e}; allowed: a readable YAML file")],
                          source) from None
    if b"\0" in data:
        raise ConfigError([("", "is not a text file (it contains NUL bytes); allowed: a YAML config file")], source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([("", f"is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); allowed: a "
                                f"UTF-8 YAML config file")], source) from None
    try:
        raw = _yaml_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([("", f"not valid YAML: {_yaml_problem(e)}")], source) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([("", f"the top level must be a mapping of sections, got {type(raw).__name__}; allowed: "
                                f"a mapping like 'model: {{...}}', 'optimizer: {{...}}', 'schedule: {{...}}'")],
                          str(path))
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    """'optimizer.lr=0.01' -> ('optimizer.lr', 0.01) (the value read as YAML)."""
    if "=" not in item:
        raise ConfigError([("", f"override {item!r} is not KEY=VALUE; allowed: e.g. optimizer.lr=0.01")])
    key, text = item.split("=", 1)
    key = key.strip()
    if not _KEY.match(key):
        raise ConfigError([("", f"override {item!r}: {key!r} is not a dotted key path; allowed: e.g. "
                                f"optimizer.lr=0.01")])
    try:
        value = _yaml_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError([(key, f"override value {text!r} is not valid YAML ({_yaml_problem(e)})")]) from None
    return key, value


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    return [parse_override(i) for i in items]


def apply_overrides(raw: dict, overrides: Iterable[tuple[str, Any] | str]) -> dict:
    """A deep copy of ``raw`` with each (key path, value) set; strings are parsed first."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError([(key, f"cannot set a key inside {where!r}, which is "
                                         f"{type(nxt).__name__} {nxt!r}, not a section; allowed: {where}=VALUE")])
            node = nxt
        node[parts[-1]] = value
    return out


# -- the shipped configs ---------------------------------------------------------------------------
SHIPPED_CONFIGS = "megatron_hyperball.configs"
"""The package whose data files are the shipped configs (setup.py maps the repository's configs/)."""
_YAML_SUFFIXES = (".yaml", ".yml")


def shipped_configs_dir() -> Optional[Path]:
    """The folder of the shipped configs: ``megatron_hyperball/configs`` of an installed wheel, the
    repository's ``configs/`` in an editable install or a checkout run without installing; None if
    neither exists. Imports nothing heavy (the package's __init__ is not run for it)."""
    try:
        spec = importlib.util.find_spec(SHIPPED_CONFIGS)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    root = Path(__file__).resolve().parents[2]  # <checkout>/megatron_hyperball/config/load.py
    if (root / "setup.py").is_file() and (root / "configs").is_dir():
        return root / "configs"
    return None


def shipped_configs() -> dict[str, Path]:
    """Name -> file of every shipped config, sorted by name (``quickstart`` -> ``.../quickstart.yaml``)."""
    folder = shipped_configs_dir()
    if folder is None:
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix in _YAML_SUFFIXES and p.is_file()}


def resolve_config(config: str | os.PathLike) -> Path:
    """The file ``--config CONFIG`` means: an existing file as given (a relative path against the
    working directory); else a shipped config's name, with or without ``.yaml``; else a ConfigError
    listing the shipped names. A directory or broken link of that name is left to :func:`read_yaml`
    to refuse, unless a shipped config has the name."""
    text = os.fspath(config)
    path = Path(text)
    if path.is_file() or not text.strip():
        return path
    shipped = shipped_configs()
    bare = os.sep not in text and not (os.altsep and os.altsep in text)
    name = path.stem if path.suffix in _YAML_SUFFIXES else path.name
    if bare and name in shipped:
        return shipped[name]
    if os.path.lexists(path):
        return path
    names = ", ".join(shipped) or "(none found: the package is incomplete)"
    if bare:
        raise ConfigError([("", f"no config file {text!r} in the working directory {os.getcwd()}, and no shipped "
                                f"config of that name; allowed: a YAML config file, or a shipped config name: "
                                f"{names} (megatron-hyperball configs lists them)")], text)
    hint = (f"the shipped config of that name (--config {name})" if name in shipped
            else f"a shipped config name: {names}")
    raise ConfigError([("", f"cannot read config file: No such file or directory (relative to the working "
                            f"directory {os.getcwd()}); allowed: a readable YAML file, or {hint}")], text)


def load_config(path: Optional[str | os.PathLike] = None, overrides: Iterable[tuple[str, Any] | str] = (),
                raw: Optional[dict] = None) -> HyperballConfig:
    """Read ``path`` (a file, or a shipped config's name: :func:`resolve_config`) or take ``raw``,
    apply ``overrides``, validate. Raises ConfigError."""
    if (path is None) == (raw is None):
        raise ValueError("load_config: give exactly one of path and raw")
    if path is not None:
        path = resolve_config(path)
    source = str(path) if path is not None else None
    data = read_yaml(path) if path is not None else raw
    try:
        data = apply_overrides(data, overrides)
    except ConfigError as e:
        raise ConfigError(e.problems, source) from None  # name the file the overrides apply to
    return validate_config(data, source)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting (once per rank)."""

    def error(self, message):
        raise ConfigError([("", f"command line: {message}; allowed: --config X.yaml|NAME [KEY=VALUE ...] "
                                f"[--set KEY=VALUE ...] [--megatron-flag ...]")])


_SECTION_NAMES = ("seed", "precision", "model", "parallelism", "data", "optimizer", "schedule", "hyperp",
                  "checkpoint", "logging")


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--config PATH|NAME and --set KEY=VALUE [KEY=VALUE ...] (repeatable)."""
    group = parser.add_argument_group("hyperball config")
    group.add_argument("--config", required=True, help="YAML config file, or a shipped config's name "
                                                       "(megatron-hyperball configs lists them)")
    group.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set optimizer.lr=0.01 (YAML values)")
    return parser


def split_argv(argv: Sequence[str]) -> tuple[str, list[str], list[str]]:
    """``--config PATH [--set K=V ...] [K=V ...] [other]`` -> (PATH, overrides, other arguments)."""
    parser = add_config_arguments(_ArgumentParser(add_help=False, allow_abbrev=False))
    args, rest = parser.parse_known_args(list(argv))
    items = [i for group in args.overrides for i in group]
    remaining = []
    for i, token in enumerate(rest):
        after_flag = i > 0 and rest[i - 1].startswith("-")  # maybe the value of a Megatron flag
        if _KEY.match(token) and token.split(".", 1)[0] in _SECTION_NAMES and not after_flag:
            # 'optimizer.lr' without '=': not an override, and Megatron's parser would refuse it late
            raise ConfigError([(token, f"argument {token!r} has no value; allowed: {token}=VALUE")], args.config)
        (items if _BARE.match(token) else remaining).append(token)
    return args.config, items, remaining


def config_from_argv(argv: Sequence[str]) -> tuple[HyperballConfig, list[str]]:
    """Parse ``--config PATH [--set K=V ...] [K=V ...]``; returns (config, unrecognised args).

    Bare ``key=value`` arguments (``section.key=value`` or a top-level ``seed=7``) are overrides
    too; anything else is returned untouched (e.g. extra Megatron flags for the entry to pass on).
    """
    path, items, remaining = split_argv(argv)
    return load_config(path, items), remaining


def resolved_config_yaml(cfg: HyperballConfig, megatron_args: Optional[Sequence[str]] = None) -> str:
    """The validated config as YAML (defaults filled, names canonical), headed by comments with the
    resolved lr, Depth-muP alpha and (if given) the Megatron arguments. Loading it back gives the
    same config."""
    alpha = cfg.block_output_alpha()
    header = [
        "# megatron-hyperball resolved config (load with megatron_hyperball.config.load_config)",
        f"# {cfg.lr_summary()}",
        f"# block_output_scale: {cfg.hyperp.block_output_scale} -> alpha = "
        + ("off" if alpha is None else f"{alpha:.9g}"),
    ]
    if megatron_args:
        header.append("# megatron args: " + " ".join(str(a) for a in megatron_args))
    body = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n" + body


def save_resolved_config(cfg: HyperballConfig, directory: str | os.PathLike, *,
                         megatron_args: Optional[Sequence[str]] = None,
                         filename: str = RESOLVED_CONFIG_NAME) -> Path:
    """Write :func:`resolved_config_yaml` to ``directory/filename`` (atomically); returns the path.

    Meant for the checkpoint folder (``checkpoint.save``), next to Megatron's iteration folders.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    tmp = directory / (filename + ".tmp")
    tmp.write_text(resolved_config_yaml(cfg, megatron_args))
    os.replace(tmp, path)
    return path
