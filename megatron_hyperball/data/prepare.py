"""Embedded default corpus: the Python standard library's source, byte-level tokens, Megatron format.

    python -m megatron_hyperball.data.prepare --out data/pystdlib [--max-mb 20] [--valid-every 50]

Every machine that runs this project has a Python standard library, so this corpus needs no
download. What is written:

- Documents: the ``.py`` files under ``sysconfig.get_paths()['stdlib']``, sorted by their POSIX
  path relative to that folder, skipping ``site-packages`` / ``dist-packages``, test folders
  (``test``, ``tests``, ``idle_test``), ``test_*.py`` files, ``__pycache__``, the machine-specific
  ``_sysconfigdata*.py`` and empty files. Files are taken in that order while the running total
  stays within ``--max-mb`` (default 20 MB = 20e6 bytes); the first file that would overflow ends
  the list. One document per file.
- Tokens: byte-level: each byte is its own id (0..255), and every document ends with the
  end-of-document id 256, so the vocabulary has 257 entries. Megatron's
  ``NullTokenizer`` with ``--vocab-size 257`` is exactly this tokenizer for training (its eod
  id defaults to ``vocab_size - 1`` = 256; the data are already token ids, so its text methods
  are never used). Megatron pads the model's vocabulary itself
  (``--make-vocab-size-divisible-by 128`` x TP): 384 rows at TP=1, 512 at TP=4.
- Split: a held-out validation set of whole files, every ``--valid-every``-th file of the list
  (index % 50 == 49) goes to ``<out>/pystdlib_valid``, all others to ``<out>/pystdlib_train``.
  Train with ``--train-data-path <out>/pystdlib_train --valid-data-path <out>/pystdlib_valid``
  (Megatron's per-split data paths; ``--split`` is not used with them).
- Format: ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`` (uint16 tokens),
  i.e. the ``.bin`` / ``.idx`` pair Megatron's ``tools/preprocess_data.py`` writes.
- ``<out>/manifest.json``: parameters, the file list of each split, document / token counts,
  and sha256 of every written file (plus one over all of them). The output is byte-identical
  on every run with the same Python installation.
- A second run with the same parameters and the same standard library finds the manifest and
  does nothing (``--force`` rebuilds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional, Sequence

import numpy as np

__all__ = [
    "BYTE_VOCAB_SIZE", "EOD_ID", "TOKENIZER_TYPE", "DEFAULT_MAX_BYTES", "DEFAULT_VALID_EVERY",
    "TRAIN_NAME", "VALID_NAME", "MANIFEST", "stdlib_files", "select_files", "encode", "decode",
    "megatron_tokenizer_args", "megatron_data_args", "padded_vocab_size", "prepare", "main",
]

BYTE_VOCAB_SIZE = 257          # 256 byte values + end-of-document
EOD_ID = 256
TOKENIZER_TYPE = "NullTokenizer"
DTYPE = np.uint16
DEFAULT_MAX_BYTES = 20_000_000
DEFAULT_VALID_EVERY = 50
TRAIN_NAME = "pystdlib_train"
VALID_NAME = "pystdlib_valid"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


# -- the tokenizer ----------------------------------------------------------------------------------
def encode(data: bytes, eod: bool = True) -> np.ndarray:
    """Byte-level token ids of ``data`` (one id per byte), followed by ``EOD_ID`` if ``eod``."""
    ids = np.frombuffer(data, dtype=np.uint8).astype(DTYPE)
    return np.append(ids, DTYPE(EOD_ID)) if eod else ids


def decode(ids: Iterable[int]) -> bytes:
    """Bytes of a token sequence; the end-of-document id (and any id > 255) is dropped."""
    if hasattr(ids, "numpy"):  # torch tensor
        ids = ids.numpy()
    arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
    return arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes()


def megatron_tokenizer_args() -> list[str]:
    """megatron.training flags for this tokenizer."""
    return ["--tokenizer-type", TOKENIZER_TYPE, "--vocab-size", str(BYTE_VOCAB_SIZE)]


def padded_vocab_size(tensor_model_parallel_size: int = 1, divisible_by: int = 128) -> int:
    """The model's vocabulary rows after Megatron's padding (``vocab_size_with_padding``)."""
    multiple = divisible_by * tensor_model_parallel_size
    return -(-BYTE_VOCAB_SIZE // multiple) * multiple


def megatron_data_args(out_dir: str | os.PathLike) -> list[str]:
    """megatron.training flags that read a prepared corpus (train and validation prefixes)."""
    out = Path(out_dir)
    return ["--train-data-path", str(out / TRAIN_NAME), "--valid-data-path", str(out / VALID_NAME)]


# -- the file list ----------------------------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _keep(rel: PurePosixPath) -> bool:
    if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
        return False
    name = rel.name
    return name.endswith(".py") and not name.startswith("test_") and not name.startswith("_sysconfigdata")


def stdlib_files(root: Optional[Path] = None) -> list[tuple[str, int]]:
    """(relative POSIX path, size in bytes) of every eligible non-empty .py file, sorted by path."""
    root = Path(root) if root is not None else stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            full = Path(dirpath) / name
            rel = PurePosixPath(full.relative_to(root).as_posix())
            if not _keep(rel) or not full.is_file() or full.is_symlink():
                continue
            size = full.stat().st_size
            if size > 0:
                found.append((str(rel), size))
    found.sort()
    return found


def select_files(files: Sequence[tuple[str, int]], max_bytes: int, valid_every: int):
    """The capped prefix of ``files`` and its split: (train, valid) lists of relative paths."""
    chosen, total = [], 0
    for rel, size in files:
        if total + size > max_bytes:
            break
        chosen.append(rel)
        total += size
    train = [rel for i, rel in enumerate(chosen) if (i + 1) % valid_every != 0]
    valid = [rel for i, rel in enumerate(chosen) if (i + 1) % valid_every == 0]
    return train, valid


def _fingerprint(files: Sequence[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for rel, size in files:
        h.update(f"{rel}\0{size}\n".encode())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_split(root: Path, rels: Sequence[str], prefix: Path) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tmp = prefix.with_name(prefix.name + ".tmp")
    builder = IndexedDatasetBuilder(str(tmp) + ".bin", dtype=DTYPE)
    tokens = nbytes = 0
    for rel in rels:
        data = (root / rel).read_bytes()
        ids = encode(data)
        builder.add_document(ids, [ids.size])
        tokens += ids.size
        nbytes += len(data)
    builder.finalize(str(tmp) + ".idx")
    for ext in (".bin", ".idx"):
        os.replace(str(tmp) + ext, str(prefix) + ext)
    return {"prefix": prefix.name, "documents": len(rels), "tokens": tokens, "bytes": nbytes, "files": list(rels)}


def _params(max_bytes: int, valid_every: int, fingerprint: str, root: Path) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "python_version": sys.version.split()[0],
        "stdlib": str(root),
        "max_bytes": int(max_bytes),
        "valid_every": int(valid_every),
        "source_fingerprint": fingerprint,
        "tokenizer": {"type": TOKENIZER_TYPE, "vocab_size": BYTE_VOCAB_SIZE, "eod_id": EOD_ID,
                      "scheme": "byte-level: id = byte value, eod appended to every document",
                      "dtype": np.dtype(DTYPE).name},
    }


def _existing(out: Path, params: dict) -> Optional[dict]:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if any(manifest.get(k) != v for k, v in params.items()):
        return None
    for name in (TRAIN_NAME, VALID_NAME):
        for ext in (".bin", ".idx"):
            f = out / (name + ext)
            if not f.is_file() or f.stat().st_size != manifest.get("sizes", {}).get(name + ext):
                return None
    return manifest


def prepare(
    out_dir: str | os.PathLike,
    max_bytes: int = DEFAULT_MAX_BYTES,
    valid_every: int = DEFAULT_VALID_EVERY,
    *,
    force: bool = False,
    stdlib: Optional[str | os.PathLike] = None,
    verbose: bool = False,
) -> dict:
    """Write (or find already written) the corpus under ``out_dir``; returns the manifest.

    The returned dict is the manifest plus ``"reused": True`` when an identical corpus was
    already there and nothing was written.
    """
    if int(valid_every) < 2:
        raise ValueError(f"valid_every={valid_every!r} must be >= 2 (every n-th file is held out)")
    if int(max_bytes) <= 0:
        raise ValueError(f"max_bytes={max_bytes!r} must be positive")
    root = Path(stdlib) if stdlib is not None else stdlib_root()
    out = Path(out_dir)
    files = stdlib_files(root)
    params = _params(max_bytes, valid_every, _fingerprint(files), root)
    if not force:
        manifest = _existing(out, params)
        if manifest is not None:
            if verbose:
                print(f"[prepare] {out} is up to date ({manifest['splits']['train']['documents']} train / "
                      f"{manifest['splits']['valid']['documents']} valid documents); nothing to do")
            return dict(manifest, reused=True)

    train, valid = select_files(files, int(max_bytes), int(valid_every))
    if not valid:
        raise ValueError(
            f"max_bytes={max_bytes} keeps {len(train)} file(s) of {root}: fewer than valid_every="
            f"{valid_every}, so the validation split would be empty; raise the cap"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    splits = {"train": _write_split(root, train, out / TRAIN_NAME),
              "valid": _write_split(root, valid, out / VALID_NAME)}
    names = [n + ext for n in (TRAIN_NAME, VALID_NAME) for ext in (".bin", ".idx")]
    sha = {n: _sha256(out / n) for n in names}
    total = hashlib.sha256("".join(f"{n}:{sha[n]}\n" for n in names).encode()).hexdigest()
    manifest = dict(params, splits=splits, sizes={n: (out / n).stat().st_size for n in names},
                    sha256=sha, sha256_all=total)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out / MANIFEST)
    if verbose:
        print(f"[prepare] wrote {out}: {splits['train']['documents']} train / {splits['valid']['documents']} "
              f"valid documents, {splits['train']['tokens'] + splits['valid']['tokens']} tokens, "
              f"sha256 {total[:16]}")
    return dict(manifest, reused=False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m megatron_hyperball.data.prepare",
        description="Write the Python standard library's source as a byte-level Megatron corpus "
                    "(train and held-out validation prefixes).",
    )
    p.add_argument("--out", required=True, help="output folder (e.g. data/pystdlib)")
    p.add_argument("--max-mb", type=float, default=DEFAULT_MAX_BYTES / 1e6,
                   help="cap on source bytes, in MB of 1e6 bytes (default %(default)s)")
    p.add_argument("--valid-every", type=int, default=DEFAULT_VALID_EVERY,
                   help="every n-th file goes to the validation split (default %(default)s)")
    p.add_argument("--force", action="store_true", help="rebuild even if an identical corpus is there")
    a = p.parse_args(argv)
    prepare(a.out, int(a.max_mb * 1e6), a.valid_every, force=a.force, verbose=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
