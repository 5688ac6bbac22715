"""What a valid config needs from the machine, checked before anything exists: files, folders,
packages, and the checkpoint it resumes.

Everything here only reads the file system (``os.stat`` / ``os.access``; nothing is created) and
asks ``importlib`` whether a package is installed (nothing is imported), so it runs in well under
a second, before torch, Megatron or a process group. Problems are (key path, message) pairs,
reported like the schema's.

- ``data.data_path``: ``PREFIX.bin`` and ``PREFIX.idx`` exist for every prefix;
- ``checkpoint.save``, ``logging.tensorboard_dir``, the W&B save dir, ``data.embedded_dir``: a
  writable directory, or a path whose first existing parent is a writable directory;
- ``checkpoint.load``: a Megatron checkpoint directory (``latest_checkpointed_iteration.txt``);
- the tokenizer's files and library;
- resuming: the model the config describes has the shapes of the checkpoint it would load (as
  ``hyperball_config.yaml`` beside the checkpoint records them; the entry writes that file only
  after a checkpoint save succeeded, so it always describes the checkpoint).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Optional, Sequence

import yaml

from megatron_hyperball.config.schema import HyperballConfig, ModelConfig

__all__ = ["TRACKER_NAME", "path_problems", "resume_problems", "file_problems", "directory_problem",
           "checkpoint_model_keys"]

TRACKER_NAME = "latest_checkpointed_iteration.txt"  # Megatron's tracker file in a checkpoint directory
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _tilde(path: str) -> Optional[str]:
    if path.startswith("~"):
        return f"{path!r} starts with '~', which is not expanded (it would create a folder named '~'); " \
               f"allowed: an absolute or relative path"
    return None


def directory_problem(path: Optional[str]) -> Optional[str]:
    """None when ``path`` is a writable directory, or does not exist and can be created (its first
    existing parent is a writable directory); else what is wrong. Creates nothing."""
    if path is None:
        return None
    if not str(path).strip():
        return "is empty; allowed: a directory path"
    if _tilde(str(path)):
        return _tilde(str(path))
    p = Path(path)
    allowed = "allowed: a writable directory, or a path that can be created"
    if os.path.lexists(p):
        if not p.exists():
            return f"{path} is a broken symbolic link; {allowed}"
        if not p.is_dir():
            return f"{path} exists and is not a directory; {allowed}"
        if not os.access(p, os.W_OK | os.X_OK):
            return f"{path} is a directory this user cannot write to; {allowed}"
        return None
    parent = p.absolute().parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{path} cannot be created: {parent} is not a directory; {allowed}"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path} cannot be created: this user cannot write to {parent}; {allowed}"
    return None


def _file_problem(path: str, what: str) -> Optional[str]:
    if _tilde(path):
        return _tilde(path)
    p = Path(path)
    if not p.exists():
        return f"{what} {path} does not exist"
    if not p.is_file():
        return f"{what} {path} is not a file"
    if not os.access(p, os.R_OK):
        return f"{what} {path} is not readable"
    return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _data_problems(cfg: HyperballConfig) -> list[tuple[str, str]]:
    data = cfg.data
    p = []
    if data.embedded:
        problem = directory_problem(data.embedded_dir)
        if problem and os.path.isdir(data.embedded_dir) and os.path.isfile(os.path.join(data.embedded_dir,
                                                                                       "manifest.json")):
            problem = None  # a prepared corpus on a read-only file system is fine
        if problem:
            p.append(("data.embedded_dir", f"{problem} (the embedded corpus is written there)"))
        return p
    missing = []
    for prefix in data.prefixes():
        gone = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if _tilde(prefix) or gone:
            missing.append(f"{prefix} ({' and '.join(prefix + e for e in gone) or 'the prefix'} "
                           f"{'does' if len(gone) == 1 else 'do'} not exist)")
    if missing:
        p.append(("data.data_path", f"{'; '.join(missing)}; allowed: prefixes of Megatron indexed datasets "
                                    f"(PREFIX.bin and PREFIX.idx, e.g. from Megatron's tools/preprocess_data.py), "
                                    f"relative to the working directory {os.getcwd()}"))
    return p


def _tokenizer_problems(cfg: HyperballConfig) -> list[tuple[str, str]]:
    tok = cfg.model.tokenizer
    p = []
    library = {"huggingface": "transformers", "sentencepiece": "sentencepiece", "tiktoken": "tiktoken"}.get(tok.type)
    if library and not _installed(library):
        p.append(("model.tokenizer.type", f"'{tok.type}' needs the Python package '{library}', which is not "
                                          f"installed; allowed: install it, or another tokenizer type"))
    for key in ("vocab_file", "merge_file"):
        value = getattr(tok, key)
        if value is not None:
            problem = _file_problem(value, key)
            if problem:
                p.append((f"model.tokenizer.{key}", f"{problem}; allowed: an existing file"))
    if tok.model is not None:
        if tok.type in ("sentencepiece", "tiktoken"):
            problem = _file_problem(tok.model, "tokenizer model")
            if problem:
                p.append(("model.tokenizer.model", f"{problem}; allowed: an existing {tok.type} model file"))
        elif tok.type == "huggingface" and not os.path.exists(tok.model):
            if _tilde(tok.model) or tok.model.startswith(("/", "./", "../")) or not _HUB_ID.match(tok.model):
                p.append(("model.tokenizer.model", f"{tok.model} is not an existing directory or file, nor a "
                                                   f"Hugging Face hub id; allowed: a local tokenizer directory "
                                                   f"or an id like 'gpt2' / 'org/name'"))
    return p


def _output_problems(cfg: HyperballConfig) -> list[tuple[str, str]]:
    p = []
    save = cfg.checkpoint.save
    save_problem = directory_problem(save)
    if save_problem:
        p.append(("checkpoint.save", save_problem))
    tb, wandb_dir = cfg.log_dirs()
    problem = directory_problem(tb)
    if problem:
        p.append(("logging.tensorboard_dir", problem + ("" if cfg.logging.tensorboard_dir else
                                                        " (the default TensorBoard dir, used with W&B on)")))
    if cfg.logging.wandb.save_dir is not None or save is None:  # else <checkpoint.save>/wandb
        problem = directory_problem(wandb_dir)
        if problem:
            p.append(("logging.wandb.save_dir", problem + ("" if cfg.logging.wandb.save_dir else
                                                           " (the default W&B dir without checkpoint.save)")))
    elif not save_problem:
        problem = directory_problem(wandb_dir)
        if problem:
            p.append(("checkpoint.save", f"{problem} (W&B writes to <checkpoint.save>/wandb unless "
                                         f"logging.wandb.save_dir is set)"))
    load = cfg.checkpoint.load
    if load is not None:
        if _tilde(load):
            p.append(("checkpoint.load", _tilde(load)))
        elif not os.path.isdir(load):
            p.append(("checkpoint.load", f"{load} is not an existing directory; allowed: a Megatron checkpoint "
                                         f"directory (with {TRACKER_NAME}), or leave it out to resume from "
                                         f"checkpoint.save"))
        elif not os.path.isfile(os.path.join(load, TRACKER_NAME)):
            p.append(("checkpoint.load", f"{load} holds no Megatron checkpoint (no {TRACKER_NAME}); allowed: a "
                                         f"checkpoint directory, or leave it out"))
    return p


def path_problems(cfg: HyperballConfig) -> list[tuple[str, str]]:
    """Files, folders and packages ``cfg`` needs on this machine."""
    return _data_problems(cfg) + _tokenizer_problems(cfg) + _output_problems(cfg)


# -- resuming --------------------------------------------------------------------------------------
def checkpoint_model_keys(model: ModelConfig) -> dict[str, object]:
    """The model keys that fix the shapes (or names) of the checkpoint's tensors."""
    keys = {
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "num_query_groups": model.num_query_groups or model.num_attention_heads,
        "ffn_hidden_size": model.resolved_ffn_hidden_size(),
        "tokenizer.type": model.tokenizer.type,
        "vocab_size": model.vocab_size,
        "normalization": model.normalization,
        "position_embedding": model.position_embedding,
        "swiglu": model.swiglu,
        "bias": model.bias,
        "qk_layernorm": model.qk_layernorm,
        "tie_embeddings": model.tie_embeddings,
    }
    if model.position_embedding == "learned_absolute":
        keys["max_position_embeddings"] = model.max_position_embeddings or model.seq_length
    moe = model.moe
    if moe is not None:
        keys.update({"moe.num_experts": moe.num_experts,
                     "moe.ffn_hidden_size": moe.ffn_hidden_size or model.resolved_ffn_hidden_size(),
                     "moe.shared_expert_size": moe.shared_expert_size, "moe.layer_freq": moe.layer_freq,
                     "moe.grouped_gemm": moe.grouped_gemm})
    return keys


def resume_problems(cfg: HyperballConfig, extra: Sequence[str] = ()) -> list[tuple[str, str]]:
    """A config whose model cannot load the checkpoint it resumes: refused now, naming the keys,
    instead of failing inside Megatron's checkpoint loader after the process groups exist."""
    from megatron_hyperball.config.load import RESOLVED_CONFIG_NAME

    if "--load" in extra or any(a.startswith("--load=") for a in extra):
        return []  # Megatron loads from somewhere the config does not name
    directory = cfg.checkpoint.load or cfg.checkpoint.save
    if directory is None:
        return []
    tracker, saved = Path(directory) / TRACKER_NAME, Path(directory) / RESOLVED_CONFIG_NAME
    if not (tracker.is_file() and saved.is_file()):
        return []
    try:
        raw = yaml.safe_load(saved.read_text())
        old = ModelConfig.model_validate(raw["model"], context={"fields_only": True})
        iteration = tracker.read_text().strip()
    except Exception:  # not ours to judge: Megatron reads the checkpoint itself
        return []
    mine, theirs = checkpoint_model_keys(cfg.model), checkpoint_model_keys(old)
    p = []
    key = "checkpoint.load" if cfg.checkpoint.load else "checkpoint.save"
    for name in sorted(set(mine) | set(theirs), key=lambda k: list(mine).index(k) if k in mine else len(mine)):
        a, b = mine.get(name), theirs.get(name)
        if a != b:
            p.append((f"model.{name}", f"{a!r}, but the checkpoint this run resumes ({key} {directory}, iteration "
                                       f"{iteration}) has {b!r} (its {RESOLVED_CONFIG_NAME}); allowed: {b!r} to "
                                       f"resume it, or another {key} for a new run"))
    return p


def file_problems(cfg: HyperballConfig, extra: Sequence[str] = ()) -> list[tuple[str, str]]:
    """:func:`path_problems` and :func:`resume_problems`."""
    return path_problems(cfg) + resume_problems(cfg, extra)
