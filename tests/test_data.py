"""Embedded corpus: stdlib source -> byte tokens -> Megatron indexed dataset (train / valid prefixes)."""

import hashlib
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from megatron_hyperball.data import prepare as P

CAP = 300_000      # bytes of source: a few dozen files, fast
EVERY = 5          # every 5th file held out


def listing():
    """The test's own listing of eligible stdlib files (sorted relative POSIX paths, sizes)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    out = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if skip & set(rel.parts[:-1]) or f.name.startswith(("test_", "_sysconfigdata")) or f.is_symlink():
            continue
        if f.stat().st_size:
            out.append((rel.as_posix(), f.stat().st_size))
    return root, sorted(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("pystdlib")
    manifest = P.prepare(out, max_bytes=CAP, valid_every=EVERY)
    return out, manifest


def read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


def test_file_selection(corpus):
    _, manifest = corpus
    root, files = listing()
    total, chosen = 0, []
    for rel, size in files:
        if total + size > CAP:
            break
        chosen.append(rel)
        total += size
    train, valid = manifest["splits"]["train"]["files"], manifest["splits"]["valid"]["files"]
    assert valid == chosen[EVERY - 1::EVERY]
    assert train == [r for i, r in enumerate(chosen) if i % EVERY != EVERY - 1]
    assert not set(train) & set(valid)
    assert manifest["splits"]["train"]["bytes"] + manifest["splits"]["valid"]["bytes"] == total <= CAP
    assert len(chosen) > 2 * EVERY


def test_documents_are_the_source_bytes(corpus):
    out, manifest = corpus
    root = Path(manifest["stdlib"])
    for split, name in (("train", P.TRAIN_NAME), ("valid", P.VALID_NAME)):
        ds = read(out / name)
        files = manifest["splits"][split]["files"]
        assert len(ds) == len(files) == manifest["splits"][split]["documents"]
        assert len(ds.document_indices) - 1 == len(files)            # one document per file
        tokens = 0
        for i, rel in enumerate(files):
            ids = ds[i]
            src = (root / rel).read_bytes()
            assert ids.dtype == np.uint16
            assert ids[-1] == P.EOD_ID and (ids[:-1] < 256).all()
            assert ids[:-1].tobytes() == np.frombuffer(src, np.uint8).astype(np.uint16).tobytes()
            assert P.decode(ids) == src
            tokens += len(ids)
        assert tokens == manifest["splits"][split]["tokens"]
    ds = read(out / P.TRAIN_NAME)  # keep it alive: its __del__ closes the memory map under ds[0]
    assert P.decode(ds[0]) == (root / manifest["splits"]["train"]["files"][0]).read_bytes()


def test_manifest_hashes(corpus):
    out, manifest = corpus
    on_disk = json.loads((out / P.MANIFEST).read_text())
    assert on_disk["sha256"] == manifest["sha256"]
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
        assert (out / name).stat().st_size == manifest["sizes"][name]
    assert manifest["tokenizer"]["vocab_size"] == 257 and manifest["tokenizer"]["eod_id"] == 256


def test_deterministic_and_skips_when_prepared(corpus, tmp_path):
    out, manifest = corpus
    again = P.prepare(tmp_path / "b", max_bytes=CAP, valid_every=EVERY)
    assert again["reused"] is False and again["sha256_all"] == manifest["sha256_all"]
    for name in manifest["sha256"]:
        assert (tmp_path / "b" / name).read_bytes() == (out / name).read_bytes()
    stamps = {n: (out / n).stat().st_mtime_ns for n in list(manifest["sha256"]) + [P.MANIFEST]}
    reused = P.prepare(out, max_bytes=CAP, valid_every=EVERY)
    assert reused["reused"] is True and reused["sha256_all"] == manifest["sha256_all"]
    assert stamps == {n: (out / n).stat().st_mtime_ns for n in stamps}  # nothing rewritten
    other = P.prepare(tmp_path / "b", max_bytes=CAP, valid_every=EVERY + 1)  # new parameters: rebuilt
    assert other["reused"] is False and other["valid_every"] == EVERY + 1


def test_cli(tmp_path, corpus):
    _, manifest = corpus
    assert P.main(["--out", str(tmp_path / "c"), "--max-mb", str(CAP / 1e6), "--valid-every", str(EVERY)]) == 0
    assert json.loads((tmp_path / "c" / P.MANIFEST).read_text())["sha256_all"] == manifest["sha256_all"]
    with pytest.raises(ValueError, match="validation split would be empty"):
        P.prepare(tmp_path / "d", max_bytes=3000, valid_every=50)


def test_megatron_tokenizer_and_padding():
    from types import SimpleNamespace

    from megatron.core.tokenizers import MegatronTokenizer
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

    tok = MegatronTokenizer.from_pretrained(metadata_path={"library": "null-text"}, vocab_size=P.BYTE_VOCAB_SIZE)
    assert (tok.vocab_size, tok.eod) == (257, P.EOD_ID)
    assert P.megatron_tokenizer_args() == ["--tokenizer-type", "NullTokenizer", "--vocab-size", "257"]
    for tp, padded in ((1, 384), (2, 512), (4, 512)):
        args = SimpleNamespace(make_vocab_size_divisible_by=128, tensor_model_parallel_size=tp, rank=1)
        assert vocab_size_with_padding(257, args, logging_enabled=False) == padded == P.padded_vocab_size(tp)


def test_megatron_gpt_dataset_keeps_splits_apart(corpus, tmp_path):
    """Megatron's own GPTDataset over the two prefixes: every sample comes from its split's files."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers import MegatronTokenizer

    out, manifest = corpus
    root = Path(manifest["stdlib"])
    seq = 64
    config = GPTDatasetConfig(
        random_seed=1, sequence_length=seq, tokenizer=MegatronTokenizer.from_pretrained(
            metadata_path={"library": "null-text"}, vocab_size=P.BYTE_VOCAB_SIZE),
        blend_per_split=[([str(out / P.TRAIN_NAME)], None), ([str(out / P.VALID_NAME)], None), None],
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        path_to_cache=str(tmp_path / "cache"), mid_level_dataset_surplus=0.005,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [40, 40, None], lambda: True, config).build()
    texts = {s: [(root / r).read_bytes() for r in manifest["splits"][s]["files"]] for s in ("train", "valid")}
    long_pieces = 0
    for split, ds in (("train", train), ("valid", valid)):
        for i in range(40):
            s = ds[i]
            window = np.append(s["tokens"].numpy(), s["labels"].numpy()[-1])
            piece = window[: np.argmax(window == P.EOD_ID)] if (window == P.EOD_ID).any() else window
            piece = piece.astype(np.uint8).tobytes()
            assert any(piece in t for t in texts[split]), (split, i)
            other = "valid" if split == "train" else "train"
            if len(piece) >= 48:  # long pieces identify their file's split
                assert not any(piece in t for t in texts[other]), (split, i)
                long_pieces += 1
    assert long_pieces >= 60  # of 80 samples
