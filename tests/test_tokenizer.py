"""`magdiff_jax.models.tokenizer.CLIPTokenizer` against transformers' own CLIPTokenizer on a tiny local
vocabulary (exact id equality), plus its errors for missing folders and vocabularies."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import transformers
from helpers import BOS, EOS, write_tokenizer

from magdiff_jax.models.tokenizer import CLIPTokenizer

TEXTS = [
    "The cat, a DOG!",
    "",
    "the cat " * 60,  # 120 words: truncated to 77 ids
    "zz  Ü   dog.\nof",
]


@pytest.fixture(scope="module", params=[EOS, "!"], ids=["pad-eos(SD1)", "pad-!(SD2)"])
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    vocab = write_tokenizer(path, request.param)
    return path, vocab, request.param


def reference(path, texts, max_length=77):
    ref = transformers.CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    return np.asarray(ref(texts, padding="max_length", max_length=max_length, truncation=True).input_ids)


def test_matches_transformers(folder):
    """Ids equal transformers' CLIPTokenizer(padding="max_length", max_length=77, truncation=True) exactly."""
    path, vocab, _ = folder
    tok = CLIPTokenizer.from_folder(path)
    ids = tok(TEXTS)
    assert ids.dtype == np.int32 and ids.shape == (len(TEXTS), 77)
    np.testing.assert_array_equal(ids, reference(path, TEXTS))
    assert len(tok.tokenizer) == len(vocab) > 60  # a real vocabulary was read, not transformers' empty default


def test_known_ids_padding_and_truncation(folder):
    """Hand-computed ids: bos, BPE words, eos, then padding; a long prompt is cut to 77 ids ending in eos."""
    path, vocab, pad = folder
    tok = CLIPTokenizer.from_folder(path)
    ids, mask = tok(TEXTS, return_attention_mask=True)
    bos, eos, pad_id = vocab[BOS], vocab[EOS], vocab[pad]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (bos, eos, pad_id)
    words = [vocab["the</w>"], vocab["cat</w>"], vocab[",</w>"], vocab["a</w>"], vocab["dog</w>"]]
    head = [bos, *words]
    np.testing.assert_array_equal(ids[0, : len(head)], head)
    n0 = int(mask[0].sum())
    assert ids[0, n0 - 1] == eos and (ids[0, n0:] == pad_id).all() and (mask[0, n0:] == 0).all()
    np.testing.assert_array_equal(ids[1, :2], [bos, eos])  # the empty prompt
    assert (ids[1, 2:] == pad_id).all() and mask[1].sum() == 2
    long = ids[2]  # truncated: bos, 75 word ids, eos, no padding
    assert long[0] == bos and long[-1] == eos and mask[2].all()
    np.testing.assert_array_equal(long[1:-1], [vocab["the</w>"], vocab["cat</w>"]] * 37 + [vocab["the</w>"]])


def test_single_string_and_other_length(folder):
    path, _, _ = folder
    tok = CLIPTokenizer.from_folder(path, max_length=16)
    one = tok("a dog of the cat")
    assert one.shape == (1, 16) and one.dtype == np.int32
    np.testing.assert_array_equal(one, reference(path, ["a dog of the cat"], max_length=16))
    np.testing.assert_array_equal(tok(TEXTS), reference(path, TEXTS, max_length=16))
    assert tok([]).shape == (0, 16)


def test_pipeline_root_uses_tokenizer_subfolder(folder):
    path, _, _ = folder
    tok = CLIPTokenizer.from_folder(path.parent)
    assert tok.folder == path
    np.testing.assert_array_equal(tok(TEXTS), reference(path, TEXTS))


def test_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        CLIPTokenizer.from_folder(missing)


def test_missing_vocab_names_the_path_and_files(tmp_path):
    """transformers would silently build an empty tokenizer from a folder without vocab.json; we refuse."""
    folder = tmp_path / "broken-tokenizer"
    write_tokenizer(folder, EOS)
    (folder / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError) as err:
        CLIPTokenizer.from_folder(folder)
    assert "broken-tokenizer" in str(err.value) and "missing vocab.json (" in str(err.value)


def test_bad_input_type(folder):
    tok = CLIPTokenizer.from_folder(folder[0])
    with pytest.raises(TypeError, match="list of strings"):
        tok(["fine", 3])


def test_core_imports_without_transformers_or_torch():
    code = (
        "import sys; import magdiff_jax.models.tokenizer, magdiff_jax.models.clip; "
        "bad = [m for m in ('transformers', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
