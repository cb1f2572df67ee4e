"""Hugging Face ``transformers`` encoders as metafunc models: exact under ``torch.func.grad`` and ``vmap``.

A ``transformers`` model runs its own modules here (its embeddings, attention, feed-forward blocks and heads, with
its weights and its parameter names); metafunc only replaces what breaks under function transforms:

* the attention mask is built from the padding mask by arithmetic (an additive ``0 / finfo.min`` mask, as
  ``transformers``' eager attention builds it), not by ``transformers``' mask utilities, whose data-dependent checks
  (``padding_mask.all()``) fail under ``vmap``;
* attention runs in ``transformers``' eager implementation (the SDPA and flash kernels have no double backward);
* ``nn.LayerNorm`` becomes metafunc's exact :class:`metafunc.LayerNorm` (torch's fused kernel gives wrong
  second-order gradients under ``vmap``);
* token ids and masks travel as one integer tensor, ``(texts, 2, length)`` (ids, attention mask) or
  ``(texts, length)`` (ids, no padding), so a :class:`metafunc.Task` carries them and they stay integers.

Checked architectures (float64 meta-gradients equal a plain autograd loop on the untouched model, in loop, vmap and
chunked vmap, with padding): BERT, RoBERTa and DistilBERT, as the base model (sentence embeddings) or with their
sequence-classification head (logits). Any other model is refused with its name. ``functionalize(hf_model)``
builds a :class:`TransformerEncoder` itself.

Needs the optional extra ``pip install 'metafunc[text]'``.

Example:
    >>> import transformers  # doctest: +SKIP
    >>> bert = transformers.BertModel(transformers.BertConfig(num_hidden_layers=2))  # doctest: +SKIP
    >>> model, params = functionalize(bert)  # a TransformerEncoder inside: exact under vmap  # doctest: +SKIP
"""

from metafunc.hf.encoder import (
    ARCHITECTURES,
    POOLINGS,
    Architecture,
    TransformerEncoder,
    is_transformers_model,
    tokenize,
)

__all__ = ["TransformerEncoder", "Architecture", "ARCHITECTURES", "POOLINGS", "is_transformers_model", "tokenize"]
