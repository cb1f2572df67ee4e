"""Hugging Face transformers models through metafunc.hf: exact meta-gradients against the untouched model.

The reference is a plain ``torch.autograd`` loop over tasks on the untouched ``transformers`` module (its own mask
utilities, SDPA attention in torch's math kernel, torch's LayerNorm), from ``tests/reference.py`` (MAML) and
``tests/test_proto_maml.py`` (ProtoMAML). Tiny configs built from each architecture's config class, random weights,
float64, padding in every batch.
"""

from __future__ import annotations

import pytest
import torch
from reference import reference_meta_gradient as reference_maml_gradient
from reference import relative_error
from test_proto_maml import reference_meta_gradient as reference_proto_maml_gradient
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from metafunc import Task, convert_norm_layers, functionalize, maml, meta_batch, meta_value_and_grad, proto_maml
from metafunc.data.episodes import EpisodeSampler

transformers = pytest.importorskip("transformers")
from metafunc.hf import TransformerEncoder, tokenize  # noqa: E402

VOCAB, LENGTH, WAYS = 40, 7, 3


def tiny(kind: str, head: bool = False) -> nn.Module:
    """A tiny random model of ``kind``, float64, eval mode, every parameter moved off its initial value."""
    torch.manual_seed(0)
    if kind == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=8, n_layers=2, n_heads=2, hidden_dim=16,
                                               max_position_embeddings=16, num_labels=WAYS)
    else:
        config_class = transformers.BertConfig if kind == "bert" else transformers.RobertaConfig
        config = config_class(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=16, max_position_embeddings=20, num_labels=WAYS)
    classes = {"bert": ("BertModel", "BertForSequenceClassification"),
               "roberta": ("RobertaModel", "RobertaForSequenceClassification"),
               "distilbert": ("DistilBertModel", "DistilBertForSequenceClassification")}[kind]
    model = getattr(transformers, classes[head])(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


class Untouched(nn.Module):
    """The transformers model called as its users call it: ``model(input_ids=..., attention_mask=...)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids, mask = tokens[:, 0], tokens[:, 1]
        out = self.hf(input_ids=ids, attention_mask=mask)
        if hasattr(out, "logits"):
            return out.logits
        weights = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * weights).sum(1) / weights.sum(1)


def token_tasks(num_tasks: int = 3, shots: int = 1, queries: int = 2, seed: int = 0, pad_id: int = 0) -> Task:
    """Tasks of integer tokens ``(n, 2, LENGTH)`` with texts of 2..LENGTH real tokens (padding in every batch)."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> torch.Tensor:
        ids = torch.randint(3, VOCAB, (num_tasks, n, LENGTH), generator=g)
        lengths = torch.randint(2, LENGTH + 1, (num_tasks, n, 1), generator=g)
        lengths[:, 0] = LENGTH - 2  # at least one padded text per task
        mask = (torch.arange(LENGTH) < lengths).long()
        return torch.stack([torch.where(mask.bool(), ids, pad_id), mask], dim=2)

    def labels(per: int) -> torch.Tensor:
        return torch.arange(WAYS).repeat_interleave(per).expand(num_tasks, -1).clone()

    return Task(tokens(WAYS * shots), labels(shots), tokens(WAYS * queries), labels(queries))


def to_reference(params: dict) -> dict:
    return {"hf." + k: v for k, v in params.items()}


def from_reference(grads: dict) -> dict:
    return {k[len("hf."):]: v for k, v in grads.items()}


def metafunc_gradient(learner, params, tasks, mode, chunk):
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    loss, _ = meta_batch(learner.meta_loss, mode=mode, chunk_size=chunk)(p, tasks)
    grads = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
    return loss, {k: (g if g is not None else torch.zeros_like(v)) for (k, v), g in zip(p.items(), grads)}


KINDS = pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
MODES = pytest.mark.parametrize("mode,chunk", [("loop", None), ("vmap", None), ("vmap", 2)],
                                ids=["loop", "vmap", "vmap-chunk2"])


@KINDS
@MODES
def test_second_order_maml_equals_autograd_on_the_untouched_model(float64, kind, mode, chunk):
    hf = tiny(kind, head=True)
    model, params = functionalize(hf)
    tasks = token_tasks(pad_id=hf.config.pad_token_id)
    learner = maml(model, inner_lr=0.4, steps=2)
    _, grads = metafunc_gradient(learner, params, tasks, mode, chunk)
    reference = from_reference(reference_maml_gradient(Untouched(hf), to_reference(params), list(tasks),
                                                       algorithm="maml", inner_lr=0.4, steps=2))
    assert relative_error(grads, reference) < 1e-10


@KINDS
@MODES
def test_second_order_proto_maml_equals_autograd_on_the_untouched_model(float64, kind, mode, chunk):
    hf = tiny(kind)
    model, params = functionalize(convert_norm_layers(hf))  # the path a user tries first
    tasks = token_tasks(pad_id=hf.config.pad_token_id)
    learner = proto_maml(model, inner_lr=0.3, head_lr=0.5, steps=1)
    loss, grads = metafunc_gradient(learner, params, tasks, mode, chunk)
    with sdpa_kernel([SDPBackend.MATH]):
        ref_loss, reference = reference_proto_maml_gradient(Untouched(hf), to_reference(params), tasks, ways=WAYS,
                                                            inner_lr=0.3, head_lr=0.5, steps=1, first_order=False)
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert relative_error(grads, from_reference(reference)) < 1e-10


def test_meta_value_and_grad_runs_a_transformer_under_vmap_and_auto(float64):
    hf = tiny("bert", head=True)
    model, params = functionalize(hf)
    tasks = token_tasks()
    learner = maml(model, inner_lr=0.4, steps=1)
    results = {}
    for mode in ("vmap", "auto"):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        step = meta_value_and_grad(learner, mode=mode)
        loss, grads, _ = step(p, tasks)
        results[mode] = (loss, grads)
    assert abs(results["vmap"][0].item() - results["auto"][0].item()) < 1e-12
    assert relative_error(results["auto"][1], results["vmap"][1]) < 1e-12


def test_parameters_keep_the_models_names_and_the_model_is_left_alone():
    hf = tiny("bert", head=True)
    attention, norm_type = hf.config._attn_implementation, type(hf.bert.embeddings.LayerNorm)
    model, params = functionalize(hf)
    assert set(params) == {k for k, _ in hf.named_parameters()}
    assert hf.config._attn_implementation == attention and type(hf.bert.embeddings.LayerNorm) is norm_type
    assert isinstance(model.module, TransformerEncoder)
    base, base_params = functionalize(tiny("bert"))
    assert not any(k.startswith("pooler.") for k in base_params)  # mean pooling: the pooler is not a parameter
    assert any(k.startswith("pooler.") for k in functionalize(TransformerEncoder(tiny("bert"), pooling="pooler"))[1])


@KINDS
def test_top_layers_over_cached_states_equal_the_full_encoder_with_frozen_lower_layers(float64, kind):
    hf = tiny(kind)
    full = TransformerEncoder(hf)
    top = full.top_layers(1)
    tasks = token_tasks(pad_id=hf.config.pad_token_id)
    states = Task(full.lower_states(tasks.support_x.flatten(0, 1), top=1).unflatten(0, tasks.support_x.shape[:2]),
                  tasks.support_y,
                  full.lower_states(tasks.query_x.flatten(0, 1), top=1).unflatten(0, tasks.query_x.shape[:2]),
                  tasks.query_y)
    top_model, top_params = functionalize(top)
    full_model, full_params = functionalize(full)
    assert set(top_params) < set(full_params) and all(".1." in k for k in top_params)
    adapt = tuple(top_params)
    _, want = metafunc_gradient(proto_maml(full_model, inner_lr=0.3, steps=2, adapt=lambda k: k in adapt),
                                full_params, tasks, "vmap", None)
    _, got = metafunc_gradient(proto_maml(top_model, inner_lr=0.3, steps=2), top_params, states, "vmap", None)
    assert relative_error(got, {k: want[k] for k in got}) < 1e-10


def test_unchecked_models_and_bad_inputs_are_refused_with_their_reason():
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=r"GPT2Model \(model_type 'gpt2'\) is not a checked architecture; checked: "
                                         r"\['bert', 'distilbert', 'roberta'\]"):
        functionalize(gpt2)
    masked = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1,
                                                                  num_attention_heads=2, intermediate_size=16))
    with pytest.raises(ValueError, match=r"BertForMaskedLM has a head metafunc does not run; pass the base model "
                                         r"\(model.bert\)"):
        TransformerEncoder(masked)
    with pytest.raises(ValueError, match=r"DistilBertModel has no pooler; use pooling='mean' or 'cls'"):
        TransformerEncoder(tiny("distilbert"), pooling="pooler")
    with pytest.raises(ValueError, match=r"pooling must be one of \('mean', 'cls', 'pooler'\) \(got 'max'\)"):
        TransformerEncoder(tiny("bert"), pooling="max")
    with pytest.raises(ValueError, match=r"top must be None \(every layer\) or an int in \[1, 2\].*\(got 3\)"):
        TransformerEncoder(tiny("bert"), top=3)
    encoder = TransformerEncoder(tiny("bert"))
    with pytest.raises(ValueError, match=r"tokens must be \(texts, 2, length\).*\(got shape \(2, 3, 4\)\)"):
        encoder(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"TransformerEncoder\(top=1\): takes token states"):
        encoder.top_layers(1)(torch.zeros(2, 2, 4, dtype=torch.long))


def test_integer_tokens_stay_integers_through_the_episode_sampler():
    def toy_tokenizer(texts, *, max_length, **options):
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, text in enumerate(texts):
            words = [len(w) + 2 for w in text.split()][:max_length]
            ids[i, :len(words)] = torch.tensor(words)
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    texts = [f"{'a' * (i % 5 + 1)} {'b' * (i % 3 + 1)}" for i in range(40)]
    tokens = tokenize(toy_tokenizer, texts, max_length=5)
    assert tokens.dtype == torch.int64 and tokens.shape == (40, 2, 5)
    task = EpisodeSampler(tokens, torch.arange(40) % 4, ways=3, shots=2, queries=2).sample(
        2, torch.Generator().manual_seed(0))
    assert task.support_x.dtype == torch.int64 and task.support_x.shape == (2, 6, 2, 5)
    assert set(task.support_x[:, :, 1].unique().tolist()) == {0, 1}


@MODES
def test_meta_learned_lora_initialisation_equals_autograd_on_the_untouched_peft_model(float64, mode, chunk):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny("bert"), peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                             lora_dropout=0.0))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn_like(p))   # peft starts B at zero; move off it so every term is tested
    model, params = functionalize(lora)
    assert sum("lora_" in k for k in params) == 8 and "encoder.layer.1.attention.self.query.base_layer.weight" in params
    adapted = {k: v for k, v in params.items() if "lora_" in k}
    frozen = {k: v.detach() for k, v in params.items() if "lora_" not in k}
    learner = proto_maml(model, inner_lr=0.3, head_lr=0.5, steps=2, adapt=lambda k: "lora_" in k)
    tasks = token_tasks()
    p = {**frozen, **{k: v.detach().clone().requires_grad_(True) for k, v in adapted.items()}}
    loss, _ = meta_batch(learner.meta_loss, mode=mode, chunk_size=chunk)(p, tasks)
    got = dict(zip(adapted, torch.autograd.grad(loss, [p[k] for k in adapted])))

    prefix = "hf.base_model.model."
    reference_params = {prefix + k: v for k, v in params.items()}
    with sdpa_kernel([SDPBackend.MATH]):
        ref_loss, reference = reference_proto_maml_gradient(
            Untouched(lora), reference_params, tasks, ways=WAYS, inner_lr=0.3, head_lr=0.5, steps=2,
            first_order=False, adapted=lambda k: "lora_" in k)
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert relative_error(got, {k: reference[prefix + k] for k in adapted}) < 1e-10


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_variable_way_and_shot_token_tasks_under_vmap_equal_each_task_alone(float64, mode):
    """Seed 000's protocol on a transformer: tasks of 2 and 3 ways, 1 and 2 shots, padded into one meta-batch of
    integer tokens; ProtoMAML's loss and meta-gradient equal the mean over the tasks run alone, unpadded."""
    from metafunc import pad_tasks

    hf = tiny("bert")
    model, params = functionalize(hf)
    big, small = token_tasks(num_tasks=1, shots=2, seed=1).task_at(0), token_tasks(num_tasks=1, seed=2).task_at(0)
    keep_support, keep_query = small.support_y < 2, small.query_y < 2      # 2 ways, 1 shot
    small = Task(small.support_x[keep_support], small.support_y[keep_support], small.query_x[keep_query],
                 small.query_y[keep_query])
    learner = proto_maml(model, inner_lr=0.3, head_lr=0.5, steps=2)
    loss, grads = metafunc_gradient(learner, params, pad_tasks([big, small]), mode, None)
    alone = [metafunc_gradient(learner, params, Task(*(t[None] for t in task)), "loop", None) for task in (big, small)]
    assert abs(loss.item() - sum(a[0].item() for a in alone) / 2) < 1e-12
    assert relative_error(grads, {k: (alone[0][1][k] + alone[1][1][k]) / 2 for k in grads}) < 1e-10


def test_transformers_4_is_refused_with_the_fix(monkeypatch):
    import metafunc.hf.encoder

    monkeypatch.setattr(metafunc.hf.encoder, "_transformers_version", lambda: "4.40.0")
    with pytest.raises(ImportError, match=r"TransformerEncoder: needs transformers >= 5 \(got 4.40.0\).*"
                                          r"pip install 'transformers>=5'"):
        TransformerEncoder(tiny("bert"))
