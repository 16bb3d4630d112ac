"""Tiny Hugging Face checkpoints shared by the HF test modules (built once per session).

Each registered architecture that has a tiny config gets a randomly initialised model
saved with ``save_pretrained`` next to one byte-level BPE tokenizer trained offline on
standard-library text; tests load them back through ``routelab.hf.tiny.load_pretrained``
(``AutoTokenizer`` / ``AutoModelForCausalLM`` or ``AutoModelForSeq2SeqLM``), the path a
user's checkpoint takes.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from routelab.hf.tiny import TINY_CONFIGS, stdlib_text, tiny_checkpoint, train_tokenizer  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

ARCHITECTURES = sorted(TINY_CONFIGS)


@functools.lru_cache(maxsize=1)
def checkpoint_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="routelab-hf-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    tokenizer = train_tokenizer(stdlib_text(4), vocab_size=320)
    for model_type in ARCHITECTURES:
        tiny_checkpoint(model_type, root / model_type, tokenizer=tokenizer, seed=1)
    return root


def checkpoint(model_type: str) -> Path:
    return checkpoint_root() / model_type


def sample_text(max_files: int = 1, offset: int = 40) -> str:
    return "\n".join(stdlib_text(max_files, offset=offset))
