"""TransformerEncoder: a ``transformers`` encoder run exactly under ``vmap`` and ``grad`` (see :mod:`metafunc.hf`)."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from metafunc.nn.norm import convert_norm_layers

__all__ = ["TransformerEncoder", "Architecture", "ARCHITECTURES", "POOLINGS", "is_transformers_model", "tokenize"]

POOLINGS = ("mean", "cls", "pooler")
"""Sentence poolings of a base model: the mean over real tokens (sentence-transformers), the first token's state,
or the model's own pooler (BERT and RoBERTa: dense + tanh over the first token)."""


def _bert_classify(model: nn.Module, states: Tensor) -> Tensor:
    pooled = model.bert.pooler(states)  # type: ignore[operator,union-attr]
    return model.classifier(model.dropout(pooled))  # type: ignore[operator,no-any-return]


def _roberta_classify(model: nn.Module, states: Tensor) -> Tensor:
    return model.classifier(states)  # type: ignore[operator,no-any-return]


def _distilbert_classify(model: nn.Module, states: Tensor) -> Tensor:
    hidden = torch.relu(model.pre_classifier(states[:, 0]))  # type: ignore[operator]
    return model.classifier(model.dropout(hidden))  # type: ignore[operator,no-any-return]


@dataclass(frozen=True)
class Architecture:
    """Where one ``transformers`` architecture keeps its parts, read from the base model.

    ``embeddings`` and ``layers`` are attribute paths in the base model; ``classify(model, states)`` is its
    sequence-classification head on the last token states ``(texts, length, width)``; ``pooler`` names the base
    model's pooler, if it has one.

    Example:
        >>> ARCHITECTURES["distilbert"].layers
        'transformer.layer'
    """

    embeddings: str
    layers: str
    classify: Callable[[nn.Module, Tensor], Tensor]
    pooler: str | None = None


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture("embeddings", "encoder.layer", _bert_classify, pooler="pooler"),
    "roberta": Architecture("embeddings", "encoder.layer", _roberta_classify, pooler="pooler"),
    "distilbert": Architecture("embeddings", "transformer.layer", _distilbert_classify),
}
"""The checked architectures, by ``config.model_type``."""


def is_transformers_model(module: Any) -> bool:
    """Whether ``module`` is a ``transformers`` ``PreTrainedModel``, or a ``peft`` model wrapping one (LoRA
    adapters), without importing either package.

    Example:
        >>> is_transformers_model(nn.Linear(2, 2))
        False
    """
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return False
    return isinstance(_unwrap_peft(module), transformers.PreTrainedModel)


def _unwrap_peft(module: Any) -> Any:
    """The ``transformers`` model inside a ``peft`` ``PeftModel`` (with its adapter layers), else ``module``."""
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(module, peft.PeftModel):
        return module.base_model.model
    return module


def _attr(root: nn.Module, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _classification(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def _check_model(model: Any) -> Architecture:
    """The :class:`Architecture` of ``model``, or a ``TypeError``/``ValueError`` naming what is not supported."""
    if not is_transformers_model(model):
        raise TypeError(f"TransformerEncoder: model must be a transformers PreTrainedModel (got {type(model).__name__})")
    config = model.config
    kind = getattr(config, "model_type", None)
    name = type(model).__name__
    if kind not in ARCHITECTURES:
        raise ValueError(
            f"TransformerEncoder: {name} (model_type {kind!r}) is not a checked architecture; checked: "
            f"{sorted(ARCHITECTURES)} (base model or *ForSequenceClassification). Its attention, position and mask "
            "code is not known to run exactly under vmap; to run it in a loop over tasks, call it from your own "
            "nn.Module whose forward takes one tensor, pass that to convert_norm_layers and functionalize, and use "
            "mode='loop'; or add it to metafunc.hf.ARCHITECTURES with a float64 test"
        )
    if model.base_model is not model and not _classification(model):
        raise ValueError(f"TransformerEncoder: {name} has a head metafunc does not run; pass the base model "
                         f"(model.{model.base_model_prefix}) or a {type(model.base_model).__name__[:-5]}"
                         "ForSequenceClassification")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError(f"TransformerEncoder: {name} is configured as a decoder (is_decoder / add_cross_attention); "
                         "only bidirectional encoders are supported")
    position = getattr(config, "position_embedding_type", "absolute")
    if position not in (None, "absolute"):
        raise ValueError(f"TransformerEncoder: {name} uses position_embedding_type={position!r}; only 'absolute' "
                         "is checked")
    return ARCHITECTURES[kind]


def _transformers_version() -> str:
    """The installed ``transformers`` version (its package metadata)."""
    from importlib.metadata import version

    return version("transformers")


def _exact_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that shares its weight tensors, in eval mode (no dropout), with eager attention and
    metafunc's exact LayerNorm; ``model`` itself is left as it was."""
    version = _transformers_version()
    if int(version.split(".")[0]) < 5:
        # Older transformers chose BERT's attention class (SDPA by default, no double backward) when the model was
        # built; 5 dispatches on config._attn_implementation at every call, which this copy sets. Checked on 5.
        raise ImportError(f"TransformerEncoder: needs transformers >= 5 (got {version}), whose "
                          "attention implementation can be switched to eager after loading; pip install "
                          "'transformers>=5'")
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    clone = copy.deepcopy(model, memo=shared)
    clone.set_attn_implementation("eager")  # type: ignore[operator]
    clone = convert_norm_layers(clone, inplace=True)
    return clone.eval()


def _check_pooling(pooling: Any, model: nn.Module, arch: Architecture) -> str | None:
    if _classification(model):
        if pooling is not None:
            raise ValueError(f"TransformerEncoder: pooling is for base models; {type(model).__name__} pools with its "
                             f"own classification head (got pooling={pooling!r})")
        return None
    pooling = "mean" if pooling is None else pooling
    if pooling not in POOLINGS:
        raise ValueError(f"TransformerEncoder: pooling must be one of {POOLINGS} (got {pooling!r})")
    if pooling == "pooler" and (arch.pooler is None or getattr(model, arch.pooler, None) is None):
        raise ValueError(f"TransformerEncoder: {type(model).__name__} has no pooler; use pooling='mean' or 'cls'")
    return str(pooling)


def _check_top(top: Any, layers: int) -> int | None:
    if top is None:
        return None
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= layers:
        raise ValueError(f"TransformerEncoder: top must be None (every layer) or an int in [1, {layers}], the "
                         f"number of top transformer layers this module runs (got {top!r})")
    return top


def _split_tokens(tokens: Tensor, caller: str) -> tuple[Tensor, Tensor | None]:
    """``(ids, mask)`` of ``(texts, 2, length)`` tokens, or ``(ids, None)`` of ``(texts, length)`` ids."""
    if tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{caller}: tokens must hold integer ids (got dtype {tokens.dtype})")
    if tokens.dim() == 2:
        return tokens.long(), None
    if tokens.dim() == 3 and tokens.shape[1] == 2:
        return tokens[:, 0].long(), tokens[:, 1]
    raise ValueError(f"{caller}: tokens must be (texts, 2, length) (ids and attention mask, from metafunc.hf.tokenize) "
                     f"or (texts, length) ids (got shape {tuple(tokens.shape)})")


def _run_layer(layer: nn.Module, states: Tensor, additive_mask: Tensor) -> Tensor:
    out = layer(states, additive_mask)
    return out[0] if isinstance(out, tuple) else out  # older transformers return (states, ...)


class TransformerEncoder(nn.Module):
    """A ``transformers`` BERT, RoBERTa or DistilBERT as a module that is exact under ``vmap`` and ``grad``.

    ``forward(tokens)`` takes ``(texts, 2, length)`` integer tokens (ids and attention mask; see :func:`tokenize`)
    or ``(texts, length)`` ids, and returns the pooled sentence embedding ``(texts, width)`` of a base model
    (``pooling``: ``"mean"`` over real tokens by default, ``"cls"`` or ``"pooler"``), or the logits of a
    ``*ForSequenceClassification`` model's own head. The parameter names are the model's own
    (``encoder.layer.5.attention.self.query.weight``), so ``adapt`` selectors and ``state_dict`` use them; a base
    model's pooler is left out unless ``pooling="pooler"``. The model's weights are shared, not copied, and the
    model is not modified; the module runs in eval mode (no dropout).

    With ``top=k`` the module holds only the top ``k`` transformer layers and the pooling or head, and takes the
    token states :meth:`lower_states` computes (once, without a graph) from a full encoder: the frozen lower
    layers then run once per text instead of once per task and inner step.

    A ``peft`` model (``get_peft_model(model, LoraConfig(...))``) is taken too: its LoRA layers run as ``peft``
    wrote them, and their parameters (``...query.lora_A.default.weight``) can be the only ones adapted and
    meta-learned (``adapt=lambda name: "lora_" in name``): a meta-learned LoRA initialisation.

    Example:
        >>> import transformers
        >>> config = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2,
        ...                                  num_attention_heads=2, intermediate_size=16)
        >>> encoder = TransformerEncoder(transformers.BertModel(config))
        >>> tokens = torch.stack([torch.randint(0, 50, (3, 5)), torch.ones(3, 5, dtype=torch.long)], dim=1)
        >>> encoder(tokens).shape
        torch.Size([3, 8])
        >>> top = encoder.top_layers(1)
        >>> torch.allclose(top(encoder.lower_states(tokens, top=1)), encoder(tokens), atol=1e-6)
        True
    """

    architecture: Architecture
    pooling: str | None
    base_prefix: str
    num_layers: int
    top: int | None

    def __init__(self, model: nn.Module, *, pooling: str | None = None, top: int | None = None):
        super().__init__()
        model = _unwrap_peft(model)
        arch = _check_model(model)
        self.architecture = arch
        self.pooling = _check_pooling(pooling, model, arch)
        self.base_prefix = str(model.base_model_prefix) + "." if _classification(model) else ""
        clone = _exact_copy(model)
        self.num_layers = len(_attr(clone, self.base_prefix + arch.layers))
        self.top = _check_top(top, self.num_layers)
        for name, child in clone.named_children():
            self.add_module(name, child)
        self._prune(arch)

    def _prune(self, arch: Architecture) -> None:
        """Drop what this module never runs: the pooler unless used; with ``top``, the embeddings and lower layers
        (kept layers stay under their own index: ``encoder.layer.5`` of a 6-layer model)."""
        base = self._base()
        if arch.pooler is not None and self.pooling not in (None, "pooler") and hasattr(base, arch.pooler):
            setattr(base, arch.pooler, None)
        if self.top is None:
            return
        delattr(base, arch.embeddings)
        parent_path, _, name = arch.layers.rpartition(".")
        parent = _attr(base, parent_path)
        first = self.num_layers - self.top
        setattr(parent, name, nn.ModuleDict({str(i): layer for i, layer in enumerate(getattr(parent, name))
                                             if i >= first}))

    def _base(self) -> nn.Module:
        return _attr(self, self.base_prefix[:-1]) if self.base_prefix else self

    def _layers(self) -> list[nn.Module]:
        layers = _attr(self._base(), self.architecture.layers)
        return list(layers.values() if isinstance(layers, nn.ModuleDict) else layers)

    def _embed(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        ids, mask = _split_tokens(tokens, "TransformerEncoder")
        states = _attr(self._base(), self.architecture.embeddings)(input_ids=ids)
        mask = torch.ones_like(ids, dtype=states.dtype) if mask is None else mask.to(states.dtype)
        return states, mask

    def encode(self, states: Tensor, mask: Tensor, layers: Sequence[nn.Module]) -> Tensor:
        """Run ``layers`` over token ``states`` ``(texts, length, width)`` with the padding ``mask`` (1 real, 0 pad).

        Example:
            >>> import transformers
            >>> config = transformers.DistilBertConfig(vocab_size=50, dim=8, n_layers=1, n_heads=2, hidden_dim=16)
            >>> encoder = TransformerEncoder(transformers.DistilBertModel(config))
            >>> encoder.encode(torch.randn(2, 4, 8), torch.ones(2, 4), encoder._layers()).shape
            torch.Size([2, 4, 8])
        """
        additive = ((1 - mask) * torch.finfo(states.dtype).min)[:, None, None, :]
        for layer in layers:
            states = _run_layer(layer, states, additive)
        return states

    def pool(self, states: Tensor, mask: Tensor) -> Tensor:
        """The sentence embedding (base model) or logits (classification model) of the last token states."""
        if self.pooling is None:
            return self.architecture.classify(self, states)
        if self.pooling == "cls":
            return states[:, 0]
        if self.pooling == "pooler":
            return getattr(self._base(), str(self.architecture.pooler))(states)  # type: ignore[no-any-return]
        weights = mask.unsqueeze(-1)
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.top is None:
            states, mask = self._embed(x)
        else:
            if x.dim() != 3 or not x.is_floating_point():
                raise ValueError(f"TransformerEncoder(top={self.top}): takes token states (texts, length, width + 1) "
                                 f"from encoder.lower_states(tokens, top={self.top}) (got {x.dtype} of shape "
                                 f"{tuple(x.shape)})")
            states, mask = x[..., :-1], x[..., -1]
        return self.pool(self.encode(states, mask, self._layers()), mask)

    def top_layers(self, top: int) -> "TransformerEncoder":
        """The module of the top ``top`` layers and the pooling or head, over :meth:`lower_states` (shares weights).

        Example:
            >>> import transformers
            >>> config = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2,
            ...                                  num_attention_heads=2, intermediate_size=16)
            >>> top = TransformerEncoder(transformers.BertModel(config)).top_layers(1)
            >>> sorted({name.split(".")[2] for name, _ in top.named_parameters()})
            ['1']
        """
        if self.top is not None:
            raise ValueError(f"TransformerEncoder.top_layers: call it on the full encoder (this one has top={self.top})")
        top_module = copy.deepcopy(self, memo={id(t): t for t in (*self.parameters(), *self.buffers())})
        top_module.top = _check_top(top, self.num_layers)
        top_module._prune(self.architecture)
        return top_module

    def lower_states(self, tokens: Tensor, *, top: int, batch_size: int = 64) -> Tensor:
        """The token states below the top ``top`` layers, with the attention mask as one more channel:
        ``(texts, length, width + 1)``, without a graph, ``batch_size`` texts at a time: the input of
        :meth:`top_layers`. These layers stay frozen, so the states can be computed once and cached.

        Example:
            >>> import transformers
            >>> config = transformers.RobertaConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2,
            ...                                     num_attention_heads=2, intermediate_size=16)
            >>> encoder = TransformerEncoder(transformers.RobertaModel(config))
            >>> encoder.lower_states(torch.randint(3, 50, (4, 6)), top=1).shape
            torch.Size([4, 6, 9])
        """
        if self.top is not None:
            raise ValueError(f"TransformerEncoder.lower_states: call it on the full encoder (this one has top={self.top})")
        top = _check_top(top, self.num_layers)  # type: ignore[assignment]
        lower = self._layers()[:self.num_layers - top]
        out = []
        with torch.no_grad():
            for start in range(0, tokens.shape[0], batch_size):
                states, mask = self._embed(tokens[start:start + batch_size])
                states = self.encode(states, mask, lower)
                out.append(torch.cat([states, mask.unsqueeze(-1)], dim=-1))
        return torch.cat(out)


def tokenize(tokenizer: Any, texts: Sequence[str], *, max_length: int = 32) -> Tensor:
    """Token ids and attention masks of ``texts`` as one int64 tensor ``(len(texts), 2, max_length)``, padded to
    ``max_length`` with the tokenizer's pad id (the input of :class:`TransformerEncoder`).

    Example:
        >>> def toy_tokenizer(texts, **options):  # what a transformers tokenizer returns, one id per word
        ...     ids = torch.tensor([[len(w) for w in t.split()] + [0] * (4 - len(t.split())) for t in texts])
        ...     return {"input_ids": ids, "attention_mask": (ids > 0).long()}
        >>> tokenize(toy_tokenizer, ["hello there", "hi"], max_length=4)
        tensor([[[5, 5, 0, 0],
                 [1, 1, 0, 0]],
        <BLANKLINE>
                [[2, 0, 0, 0],
                 [1, 0, 0, 0]]])
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("tokenize: texts must be a sequence of strings")
    encoded = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
    return torch.stack([encoded["input_ids"], encoded["attention_mask"]], dim=1).long()
