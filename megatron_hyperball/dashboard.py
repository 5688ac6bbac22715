"""A run's main panels as one PNG, from its TensorBoard event files (no W&B account, no browser).

    megatron-hyperball dashboard RUN_DIR [-o dashboard.png] [--title TEXT]

``RUN_DIR`` is a run directory (e.g. ``runs/quickstart``) or its TensorBoard folder: every
``events.out.tfevents.*`` file under it is read (a later file wins on a repeated step, as after a
resume). One panel per entry of :data:`PANELS` that has data, in that order, three per row:

    loss      lm loss (train, validation); grad norm (Megatron's, and per matrix type); lr
    indicators router Z, attention Z, output RMS (attention, MLP/MoE), outliers   (mean, max, layers)
    moe       MaxVio (mean, max, layers); Megatron's MoE losses
    spheres   weight norm and relative update per matrix type

Needs matplotlib (``pip install 'megatron-hyperball[dashboard]'``); imports neither torch nor
Megatron. The PNG carries the panel titles in its ``Description`` text chunk.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["SECTIONS", "wandb_alias", "Panel", "PANELS", "MissingDependency", "DashboardError", "read_scalars", "panels_with_data",
           "render", "COLUMNS", "PANEL_SIZE", "DPI"]

COLUMNS = 3
PANEL_SIZE = (5.0, 3.2)   # inches per panel
DPI = 100
INSTALL_HINT = "pip install 'megatron-hyperball[dashboard]'  (or: pip install matplotlib)"


#: The W&B sections. W&B groups panels by the name's first '/' part; Megatron's own scalars have
#: none ("lm loss", "learning-rate", ...) and this plugin's sphere metrics are ``hyperball/...``, so
#: W&B also receives each of them under a sectioned alias (:func:`wandb_alias`; TensorBoard keeps
#: the original names only). ``indicators/...`` and ``moe/...`` are written sectioned already.
SECTIONS = ("loss", "lr", "indicators", "spheres", "moe")
_ALIASES = {
    "lm loss": "loss/lm_loss",
    "lm loss validation": "loss/validation",
    "lm loss validation ppl": "loss/validation_ppl",
    "grad-norm": "loss/grad_norm",
    "learning-rate": "lr/learning_rate",
    "load_balancing_loss": "moe/load_balancing_loss",
    "global_load_balancing_loss": "moe/global_load_balancing_loss",
    "seq_load_balancing_loss": "moe/seq_load_balancing_loss",
    "z_loss": "moe/z_loss",
    "max_attention_logit": "indicators/max_attention_logit",  # Megatron's --log-max-attention-logit (TE)
}


def wandb_alias(name: str) -> Optional[str]:
    """The sectioned W&B name of a Megatron / sphere metric (None: already sectioned or unknown)."""
    if name in _ALIASES:
        return _ALIASES[name]
    if name.startswith("hyperball/") and name.count("/") == 2:  # hyperball/<quantity>/<type>
        return "spheres/" + name[len("hyperball/"):]
    return None


class DashboardError(ValueError):
    """Bad input: the message names the argument and what is allowed."""


class MissingDependency(RuntimeError):
    pass


@dataclass(frozen=True)
class Panel:
    """One plot: ``series`` are exact names or fnmatch patterns; ``family`` a per-layer family
    (``<family>/layer_NN`` thin, ``<family>/mean`` bold, ``<family>/max`` dashed)."""

    section: str
    title: str
    series: tuple = ()
    family: Optional[str] = None
    log_y: bool = False


PANELS: tuple[Panel, ...] = (
    Panel("loss", "lm loss", ("lm loss", "lm loss validation")),
    Panel("loss", "grad norm (before clipping)", ("grad-norm", "hyperball/grad_norm/*"), log_y=True),
    Panel("lr", "learning rate", ("learning-rate",)),
    Panel("indicators", "router Z: mean_t LSE(router logits)^2", family="indicators/router_z"),
    Panel("indicators", "attention Z: mean LSE(scores)^2", family="indicators/attention_z"),
    Panel("indicators", "max attention logit (Megatron, TE)", ("max_attention_logit",)),
    Panel("indicators", "output RMS, attention (after alpha)", family="indicators/attn_rms"),
    Panel("indicators", "output RMS, MLP / MoE (after alpha)", family="indicators/mlp_rms"),
    Panel("indicators", "outliers: % of elements > 5 sigma", family="indicators/outliers"),
    Panel("moe", "MaxVio: (max load - mean) / mean", family="moe/maxvio"),
    Panel("moe", "MoE losses (Megatron)", ("*load_balancing_loss", "z_loss")),
    Panel("spheres", "weight norm per matrix type", ("hyperball/weight_norm/*",), log_y=True),
    Panel("spheres", "relative update per matrix type", ("hyperball/rel_update/*",), log_y=True),
)


def event_files(run_dir) -> list[Path]:
    """The TensorBoard event files under ``run_dir``, oldest first; a clear error when there are none."""
    root = Path(run_dir)
    if not root.exists():
        raise DashboardError(f"RUN_DIR: {str(run_dir)!r} does not exist; allowed: a run directory holding "
                             f"TensorBoard event files (events.out.tfevents.*), e.g. runs/quickstart")
    if not root.is_dir():
        raise DashboardError(f"RUN_DIR: {str(run_dir)!r} is not a directory; allowed: a run directory holding "
                             f"TensorBoard event files (events.out.tfevents.*), e.g. runs/quickstart")
    files = sorted(root.rglob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, str(p)))
    if not files:
        raise DashboardError(f"RUN_DIR: no TensorBoard event files (events.out.tfevents.*) under {str(run_dir)!r}; "
                             f"allowed: a run directory whose config sets logging.tensorboard_dir inside it "
                             f"(the default: runs/<name>/tensorboard)")
    return files


def read_scalars(run_dir) -> dict[str, dict[int, float]]:
    """tag -> {step: value} over all event files under ``run_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for path in event_files(run_dir):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series = out.setdefault(tag, {})
            for event in acc.Scalars(tag):
                series[event.step] = event.value
    return out


def _layer_tags(scalars, family: str) -> list[str]:
    return sorted(t for t in scalars if t.startswith(family + "/layer_"))


def _series_tags(scalars, panel: Panel) -> list[str]:
    tags = []
    for pattern in panel.series:
        tags += sorted(t for t in scalars if fnmatch.fnmatchcase(t, pattern) and t not in tags)
    return tags


def panels_with_data(scalars) -> list[Panel]:
    """The panels of :data:`PANELS` that have at least one series in ``scalars``."""
    out = []
    for panel in PANELS:
        if panel.family is not None:
            has = any(t.startswith(panel.family + "/") for t in scalars)
        else:
            has = bool(_series_tags(scalars, panel))
        if has:
            out.append(panel)
    return out


def _plot(ax, series: dict[int, float], **kwargs) -> None:
    steps = sorted(series)
    if len(steps) <= 25:  # sparse series (validation, a short run): points visible
        kwargs.setdefault("marker", ".")
    ax.plot(steps, [series[s] for s in steps], **kwargs)


def render(run_dir, output, title: Optional[str] = None) -> list[str]:
    """Write the dashboard PNG of ``run_dir`` to ``output``; returns the panel titles drawn."""
    event_files(run_dir)  # bad input first
    try:
        import matplotlib
    except ImportError as e:
        raise MissingDependency(f"the dashboard needs matplotlib, which is not installed: {INSTALL_HINT}") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = read_scalars(run_dir)
    panels = panels_with_data(scalars)
    if not panels:
        raise DashboardError(f"RUN_DIR: the event files under {str(run_dir)!r} hold none of the dashboard's "
                             f"metrics (lm loss, learning-rate, indicators/*, hyperball/*)")
    rows = math.ceil(len(panels) / COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(PANEL_SIZE[0] * COLUMNS, PANEL_SIZE[1] * rows), dpi=DPI,
                             squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        if panel.family is not None:
            for tag in _layer_tags(scalars, panel.family):
                _plot(ax, scalars[tag], lw=0.8, alpha=0.45, label=tag.rsplit("/", 1)[1].replace("_", " "))
            for stat, style in (("mean", dict(lw=2.0, color="black")), ("max", dict(lw=1.5, ls="--", color="C3"))):
                if f"{panel.family}/{stat}" in scalars:
                    _plot(ax, scalars[f"{panel.family}/{stat}"], label=stat, **style)
        else:
            for tag in _series_tags(scalars, panel):
                _plot(ax, scalars[tag], lw=1.2, label=tag.rsplit("/", 1)[-1])
        ax.set_title(f"[{panel.section}] {panel.title}", fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        if panel.log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if 1 < len(handles) <= 12:
            ax.legend(fontsize=6, ncol=2 if len(handles) > 6 else 1)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    titles = [f"[{p.section}] {p.title}" for p in panels]
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, metadata={"Description": "panels: " + " | ".join(titles),
                                        "Software": "megatron-hyperball dashboard"})
    plt.close(fig)
    return titles
