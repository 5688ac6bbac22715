"""The ``megatron-hyperball`` command: the shipped configs, and the pretraining entry.

    megatron-hyperball configs                      # the shipped configs: name and first comment line
    megatron-hyperball show NAME > my_run.yaml      # a shipped config's text, to copy and edit
    megatron-hyperball pretrain --config NAME|FILE [KEY=VALUE ...] [--check-only] [Megatron flags]
    megatron-hyperball dashboard RUN_DIR [-o dashboard.png]   # TensorBoard files -> one PNG of the main panels

``pretrain`` is ``python -m megatron_hyperball.pretrain`` (:func:`megatron_hyperball.pretrain.entry.main`);
under torchrun: ``torchrun --nproc-per-node 2 --no-python megatron-hyperball pretrain --config quickstart``.
The command is installed as a script (setup.py ``scripts``: ``scripts/megatron-hyperball``) that
imports this module without running ``megatron_hyperball/__init__.py``, so listing, showing and
checking configs import neither torch nor Megatron (a tenth of a second); the entry imports them
once a config has passed. An unknown config name exits with status 2 and the list of names, like
any invalid config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main"]

EXIT_CONFIG_ERROR = 2  # pretrain.entry.EXIT_CONFIG_ERROR (not imported: the entry module is imported lazily)


def _summary(path: Path) -> str:
    """A config's first comment line (its title)."""
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#") and line.strip("# ").strip():
                return line.lstrip("#").strip()
            if line.strip() and not line.startswith("#"):
                break
    except (OSError, UnicodeDecodeError):
        pass
    return ""


def _configs(_args) -> int:
    from megatron_hyperball.config.load import shipped_configs, shipped_configs_dir

    shipped = shipped_configs()
    if not shipped:
        print(f"megatron-hyperball: no shipped configs found (looked in {shipped_configs_dir()})", file=sys.stderr)
        return 1
    width = max(map(len, shipped))
    for name, path in shipped.items():
        print(f"{name:<{width}}  {_summary(path)}".rstrip())
    sys.stdout.flush()
    print(f"\n(in {shipped_configs_dir()})\n"
          f"run one:   torchrun --nproc-per-node N -m megatron_hyperball.pretrain --config NAME [KEY=VALUE ...]\n"
          f"copy one:  megatron-hyperball show NAME > my_run.yaml   (then --config my_run.yaml)", file=sys.stderr)
    return 0


def _show(args) -> int:
    from megatron_hyperball.config.load import shipped_configs
    from megatron_hyperball.config.schema import ConfigError

    shipped, name = shipped_configs(), args.name
    path = None if "/" in name else shipped.get(name.removesuffix(".yaml").removesuffix(".yml"))
    if path is None:
        print(ConfigError([("", f"no shipped config named {name!r}; allowed: a shipped config name: "
                                f"{', '.join(shipped) or '(none found)'}")], name), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    sys.stdout.buffer.write(path.read_bytes())
    sys.stdout.flush()
    return 0


def _dashboard(args) -> int:
    from megatron_hyperball import dashboard

    output = args.output or str(Path(args.run_dir) / "dashboard.png")
    try:
        titles = dashboard.render(args.run_dir, output, title=args.title)
    except dashboard.DashboardError as e:
        print(f"megatron-hyperball dashboard: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except dashboard.MissingDependency as e:
        print(f"megatron-hyperball dashboard: {e}", file=sys.stderr)
        return 1
    print(f"{output}: {len(titles)} panels ({', '.join(titles)})")
    return 0


def _pretrain(argv: Sequence[str]) -> int:
    from megatron_hyperball.pretrain.entry import main as entry_main

    return entry_main(list(argv))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-hyperball",
        description="Hypersphere optimizers (AdamH, MuonH) for megatron-core: the shipped configs and "
                    "the pretraining entry.",
        epilog="Pretraining: torchrun --nproc-per-node N -m megatron_hyperball.pretrain --config NAME|FILE "
               "[KEY=VALUE ...] (or: torchrun --nproc-per-node N --no-python megatron-hyperball pretrain ...). "
               "Relative paths in a config are relative to the working directory.")
    parser.add_argument("--version", action="store_true", help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("configs", help="list the shipped configs").set_defaults(func=_configs)
    show = sub.add_parser("show", help="print a shipped config (megatron-hyperball show NAME > my_run.yaml)")
    show.add_argument("name", metavar="NAME", help="a shipped config's name (megatron-hyperball configs)")
    show.set_defaults(func=_show)
    dash = sub.add_parser("dashboard", help="a run's main panels (loss, lr, indicators, spheres, MoE) as one PNG, "
                                            "from its TensorBoard event files (needs matplotlib)")
    dash.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or its TensorBoard folder, e.g. runs/quickstart")
    dash.add_argument("-o", "--output", metavar="PNG", help="where to write the PNG (default: RUN_DIR/dashboard.png)")
    dash.add_argument("--title", help="a title above the panels")
    dash.set_defaults(func=_dashboard)
    sub.add_parser("pretrain", add_help=False,
                   help="the pretraining entry: pretrain --config NAME|FILE [KEY=VALUE ...] [--check-only] "
                        "[Megatron flags] (python -m megatron_hyperball.pretrain)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pretrain"]:  # everything after it belongs to the entry (overrides, Megatron flags)
        return _pretrain(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"megatron-hyperball {version('megatron-hyperball')}")
        except PackageNotFoundError:
            print("megatron-hyperball (not installed: running from a checkout)")
        return 0
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG_ERROR
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. megatron-hyperball configs | head -3
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
