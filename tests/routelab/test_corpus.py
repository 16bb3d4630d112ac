import collections
import os
import subprocess
import sys
import sysconfig

import pytest
import torch

from routelab.corpus import (
    TOKEN_PATTERN,
    TokenCorpus,
    load_stdlib_corpus,
    stdlib_files,
    tokenize,
)


def test_tokenizer_on_a_known_line():
    line = 'def f(x: int = 0x1F) -> "s":  # 3.14 ** 2\n    y **= x // 2; z := a != b'
    assert tokenize(line) == [
        "def", "f", "(", "x", ":", "int", "=", "0x1F", ")", "->", '"', "s", '"', ":",
        "#", "3.14", "**", "2", "y", "**=", "x", "//", "2", ";", "z", ":=", "a", "!=", "b",
    ]  # fmt: skip
    assert tokenize('"""doc"""') == ['"""', "doc", '"""']
    assert tokenize("café_1 +=") == ["café_1", "+="]
    assert TOKEN_PATTERN.pattern  # documented, public


def test_files_are_sorted_stdlib_sources_without_tests():
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    assert all(f.endswith(".py") for f in files)
    assert not any(
        part in ("test", "tests", "site-packages") for f in files for part in f.split("/")[:-1]
    )
    root = sysconfig.get_paths()["stdlib"]
    assert os.path.isfile(os.path.join(root, files[0]))
    assert "os.py" in files and "json/decoder.py" in files


def test_small_corpus_against_an_independent_count():
    corpus = load_stdlib_corpus(50, max_files=3)
    assert isinstance(corpus, TokenCorpus)
    assert corpus.files == stdlib_files()[:3]
    tokens = []
    for name in corpus.files:
        with open(os.path.join(corpus.root, name), encoding="utf-8") as f:
            tokens += tokenize(f.read())
    freq = collections.Counter(tokens)
    top = sorted(freq, key=lambda t: (-freq[t], t))[:49]
    assert corpus.vocab == ["<unk>", *top]
    expected = torch.tensor([corpus.vocab.index(t) if t in top else 0 for t in tokens])
    assert torch.equal(corpus.ids, expected)
    assert corpus.counts.dtype == torch.int64 and corpus.ids.dtype == torch.int64
    assert torch.equal(corpus.counts, torch.bincount(corpus.ids, minlength=50))
    assert int(corpus.counts.sum()) == corpus.num_tokens == len(tokens)
    assert corpus.decode(corpus.ids[:5]) == [t if t in top else "<unk>" for t in tokens[:5]]


def test_max_tokens_truncates_and_small_streams_shrink_the_vocab():
    corpus = load_stdlib_corpus(100_000, max_tokens=500)
    assert corpus.num_tokens == 500
    assert corpus.vocab_size == len(corpus.vocab) == corpus.counts.shape[0]
    assert int(corpus.counts[0]) == 0  # every distinct token got an id
    assert int(corpus.counts[1:].min()) >= 1
    assert corpus.counts[1:].tolist() == sorted(corpus.counts[1:].tolist(), reverse=True)
    longer = load_stdlib_corpus(100_000, max_tokens=1000)
    assert longer.decode(longer.ids[:500]) == corpus.decode(corpus.ids)


def test_cache_returns_fresh_tensors():
    a = load_stdlib_corpus(64, max_files=2)
    a.ids[:] = -1
    a.vocab.append("x")
    b = load_stdlib_corpus(64, max_files=2)
    assert int(b.ids.min()) >= 0 and len(b.vocab) == 64


def test_full_corpus_is_zipf_like():
    corpus = load_stdlib_corpus(8192)
    assert corpus.vocab_size == 8192 and corpus.num_tokens > 1_000_000
    assert len(corpus.files) > 300
    counts = corpus.counts[1:].double()
    # heavy head, long tail: the 10 most frequent tokens carry a large share
    assert counts[:10].sum() / counts.sum() > 0.2
    assert counts[-1] < counts[0] / 1000
    assert 0 < int(corpus.counts[0]) < corpus.num_tokens // 10


def test_stream_is_identical_in_another_process():
    code = (
        "import hashlib;from routelab.corpus import load_stdlib_corpus;"
        "c=load_stdlib_corpus(512, max_files=40);"
        "print(hashlib.sha256(c.ids.numpy().tobytes()+'|'.join(c.vocab).encode()).hexdigest())"
    )
    digests = set()
    for hashseed in ("0", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        digests.add(out.stdout.strip())
    import hashlib

    c = load_stdlib_corpus(512, max_files=40)
    digests.add(hashlib.sha256(c.ids.numpy().tobytes() + "|".join(c.vocab).encode()).hexdigest())
    assert len(digests) == 1


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"vocab_size": 1}, ValueError),
        ({"vocab_size": 2.0}, TypeError),
        ({"max_files": 0}, ValueError),
        ({"max_tokens": -5}, ValueError),
        ({"max_tokens": 1.5}, TypeError),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, error):
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        load_stdlib_corpus(**kwargs)
