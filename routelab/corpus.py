"""A real token corpus that ships offline: the Python standard library's own source.

:func:`load_stdlib_corpus` reads the ``.py`` files of the running interpreter's
standard library, tokenises them with one regular expression (:data:`TOKEN_PATTERN`)
and maps the tokens to a vocabulary of the ``vocab_size - 1`` most frequent tokens
plus ``"<unk>"`` (id 0). The text is real, written by others, and Zipf-distributed,
which is what hash routing's balance questions need (Roller et al. 2021 balance their
tables on token frequencies).

What is read, exactly (so the stream is identical on every run on one installation):

- the directory ``sysconfig.get_paths()["stdlib"]``, walked recursively, every file
  ending in ``.py``, ordered by its POSIX path relative to that directory;
- excluded: ``site-packages`` / ``dist-packages`` (third-party code), ``__pycache__``,
  and the test suites, i.e. every directory named ``test``, ``tests`` or ``idle_test``
  (``Lib/test`` alone is larger than the rest of the library and holds deliberately
  odd files such as bad encodings);
- each file decoded as strict UTF-8; a file that does not decode is skipped (the same
  files on every run, so the stream stays deterministic);
- comments and string contents are not special: they are tokenised like code.

Tokens (:data:`TOKEN_PATTERN`, first alternative that matches wins, whitespace is
dropped): identifiers and keywords (Unicode letters allowed), numbers (``42``,
``0x1F``, ``3.14``, ``1e10``, ``1_000``), string quotes (``\"\"\"``, ``'''``, ``"``,
``'``, one token each), the multi-character operators (``**=``, ``//=``, ``>>=``,
``<<=``, ``**``, ``//``, ``>>``, ``<<``, ``->``, ``:=``, ``==``, ``!=``, ``<=``,
``>=`` and the augmented assignments ``+=``, ``-=``, ...), and any other single
non-space character (punctuation, brackets, ``.``, ``,``, ``:``, ``@``).

Vocabulary: id 0 is ``"<unk>"``; ids ``1 .. V-1`` are the most frequent tokens by
count, ties broken by the token string (ascending). Every other token maps to 0.

Speed: the full standard library (about 730 files, 14 MB, a few million tokens) loads
in a few seconds; results are cached per process on the arguments, and each call
returns fresh tensors (mutating them does not touch the cache).
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import sysconfig
from dataclasses import dataclass

import numpy as np
import torch

from routelab._validate import require_int, require_optional_int

__all__ = ["TOKEN_PATTERN", "UNK", "TokenCorpus", "load_stdlib_corpus", "stdlib_files", "tokenize"]

UNK = "<unk>"

TOKEN_PATTERN = re.compile(
    r"""
      [^\W\d]\w*                               # identifiers and keywords
    | \d[\w.]*                                 # numbers: 42, 0x1F, 3.14, 1e10, 1_000
    | \"\"\"|'''|["']                          # string quotes, one token each
    | \*\*=?|//=?|>>=?|<<=?|->|:=              # ** // >> << (and their =), ->, :=
    | [-+*/%&|^@<>=!]=                         # == != <= >= += -= *= /= %= &= |= ^= @=
    | \S                                       # any other non-space character
    """,
    re.VERBOSE,
)

_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)


@dataclass
class TokenCorpus:
    """A token stream with its vocabulary.

    Fields:
        ids: int64 ``[N]``, the token stream; id 0 is ``"<unk>"``.
        vocab: ``id -> token string``; ``vocab[0] == "<unk>"``; ``len(vocab) == V``.
        counts: int64 ``[V]``, how often each id occurs in ``ids`` (``counts.sum() == N``).
        files: the source files read, in order, as POSIX paths relative to ``root``.
        root: the directory the files were read from.

    ``V`` is the requested ``vocab_size`` unless the stream holds fewer distinct
    tokens, in which case every distinct token gets an id and ``V`` is that number + 1
    (tiny ``max_tokens`` only); :attr:`vocab_size` always gives the actual V.
    """

    ids: torch.Tensor
    vocab: list[str]
    counts: torch.Tensor
    files: list[str]
    root: str = ""

    @property
    def vocab_size(self) -> int:
        """V, the number of ids (``len(vocab)``)."""
        return len(self.vocab)

    @property
    def num_tokens(self) -> int:
        """N, the length of the stream."""
        return int(self.ids.shape[0])

    def decode(self, ids: torch.Tensor | list[int]) -> list[str]:
        """The token strings of ``ids``."""
        return [self.vocab[int(i)] for i in ids]


def tokenize(text: str) -> list[str]:
    """Split ``text`` into tokens with :data:`TOKEN_PATTERN` (whitespace dropped)."""
    return TOKEN_PATTERN.findall(text)


def stdlib_files(root: str | None = None) -> list[str]:
    """The ``.py`` files of the standard library that the corpus reads, sorted.

    POSIX paths relative to ``root`` (default ``sysconfig.get_paths()["stdlib"]``),
    excluding third-party packages, ``__pycache__`` and the test suites.
    """
    root = _stdlib_root() if root is None else root
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.endswith(".py"):
                rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def _stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def load_stdlib_corpus(
    vocab_size: int = 8192, *, max_files: int | None = None, max_tokens: int | None = None
) -> TokenCorpus:
    """Load the standard-library token corpus (see the module docstring for the rules).

    Args:
        vocab_size: V, including ``"<unk>"``; at least 2.
        max_files: read only the first ``max_files`` files of :func:`stdlib_files`.
        max_tokens: truncate the stream to its first ``max_tokens`` tokens (the
            vocabulary and counts are those of the truncated stream).

    Returns a :class:`TokenCorpus`; identical on every run on the same installation.
    """
    vocab_size = require_int("vocab_size", vocab_size, 2)  # <unk> plus one token
    max_files = require_optional_int("max_files", max_files, 1)
    max_tokens = require_optional_int("max_tokens", max_tokens, 1)
    ids, vocab, counts, files, root = _load_cached(vocab_size, max_files, max_tokens)
    return TokenCorpus(
        ids=torch.from_numpy(ids.copy()),
        vocab=list(vocab),
        counts=torch.from_numpy(counts.copy()),
        files=list(files),
        root=root,
    )


@functools.lru_cache(maxsize=8)
def _read_stream(
    max_files: int | None, max_tokens: int | None
) -> tuple[np.ndarray, list[str], tuple[str, ...], str]:
    """The raw stream as first-occurrence ids: ``(raw [N], strings by raw id, files, root)``.

    Each token gets the stream position of its first occurrence as a provisional id
    (``dict.setdefault`` driven by ``map``, so the per-token loop runs in C).
    """
    root = _stdlib_root()
    names = stdlib_files(root)
    if max_files is not None:
        names = names[:max_files]
    first_seen: dict[str, int] = {}
    chunks: list[np.ndarray] = []
    read: list[str] = []
    total = 0
    for name in names:
        try:
            with open(os.path.join(root, name), encoding="utf-8", errors="strict") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue  # undecodable or unreadable: skipped, the same way on every run
        tokens = TOKEN_PATTERN.findall(text)
        if max_tokens is not None:
            tokens = tokens[: max_tokens - total]
        raw = np.fromiter(
            map(first_seen.setdefault, tokens, itertools.count(total)),
            dtype=np.int64,
            count=len(tokens),
        )
        chunks.append(raw)
        read.append(name)
        total += len(tokens)
        if max_tokens is not None and total >= max_tokens:
            break
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    strings = [""] * total
    for token, position in first_seen.items():
        strings[position] = token
    return stream, strings, tuple(read), root


@functools.lru_cache(maxsize=8)
def _load_cached(
    vocab_size: int, max_files: int | None, max_tokens: int | None
) -> tuple[np.ndarray, tuple[str, ...], np.ndarray, tuple[str, ...], str]:
    raw, strings, files, root = _read_stream(max_files, max_tokens)
    distinct, inverse, freq = np.unique(raw, return_inverse=True, return_counts=True)
    tokens = [strings[int(p)] for p in distinct]
    # most frequent first, ties by the token string
    order = sorted(range(len(tokens)), key=lambda i: (-int(freq[i]), tokens[i]))
    kept = order[: vocab_size - 1]
    new_id = np.zeros(len(tokens), dtype=np.int64)  # everything else -> <unk> = 0
    new_id[np.asarray(kept, dtype=np.int64)] = np.arange(1, len(kept) + 1, dtype=np.int64)
    ids = new_id[inverse.reshape(-1)]
    vocab = (UNK, *(tokens[i] for i in kept))
    counts = np.bincount(ids, minlength=len(vocab)).astype(np.int64)
    return ids, vocab, counts, files, root
