"""Few-shot intent classification on CLINC150 with MiniLM: meta-train on 7 domains, test on 3 held-out domains.

Run one algorithm per call (``python -m metafunc.text.experiment --algorithm proto_maml --shots 1``); it prints a
tqdm bar with loss and accuracy, writes ``results.json``, a learning-curve plot and a checkpoint to ``--out``.

``--features frozen`` (default) embeds every utterance once with the frozen all-MiniLM-L6-v2 (mean pooling; cached
in ``--cache``) and meta-learns the MLP head on top; ``--features tokens`` runs the whole MiniLM inside each task and
adapts/learns the parameters chosen by ``--train-prefix`` (e.g. ``minilm.encoder.layer.5 head_mlp``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from metafunc._shared import save_atomic, strict_json
from metafunc.core.functional import functionalize
from metafunc.hf import TransformerEncoder
from metafunc.registry import LEARNERS
from metafunc.step import meta_value_and_grad
from metafunc.text.clinc import DEFAULT_TEST_DOMAINS, clinc_samplers
from metafunc.text.minilm import SentenceEncoder, embed_texts, load_minilm, tokenize
from metafunc.train.callbacks import ProgressBar
from metafunc.train.checkpoint import save_checkpoint
from metafunc.train.evaluation import evaluate_episodes
from metafunc.train.fit import FitState, fit

__all__ = ["main", "ALGORITHMS", "cached_encoder"]

ALGORITHMS = ("protonet_frozen", *(n for n, spec in LEARNERS.items() if not spec.needs_head))
"""``protonet_frozen``: ProtoNet on the frozen MiniLM embeddings, nothing trained; then every registered learner of
an encoder (no output layer), read from :data:`metafunc.LEARNERS`."""


def cached_encoder(cache: Path, *, max_length: int = 32, tokens: bool = False,
                   states_top: int | None = None) -> tuple[Callable[[Sequence[str]], torch.Tensor], TransformerEncoder]:
    """``(encode, net)``: ``encode(texts)`` gives frozen MiniLM embeddings (or tokens), cached on disk by a hash of
    the texts; ``net`` is the pretrained MiniLM from :func:`~metafunc.text.load_minilm`. With ``states_top=n`` it
    gives the token states below the top ``n`` layers (:meth:`metafunc.hf.TransformerEncoder.lower_states`), cached
    too, so that a task runs only the layers it adapts.

    Example:
        The pretrained MiniLM takes seconds to load, so this example swaps in a tiny random BERT and a
        word-length tokenizer; with the real ones, ``cached_encoder(Path("/tmp/cache"))`` is all it takes.

        >>> import tempfile
        >>> from pathlib import Path
        >>> from unittest import mock
        >>> import transformers
        >>> from metafunc.hf import TransformerEncoder
        >>> def toy_tokenizer(texts, *, max_length, **options):  # one id per word: its length
        ...     ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        ...     for i, text in enumerate(texts):
        ...         words = [len(w) for w in text.split()][:max_length]
        ...         ids[i, :len(words)] = torch.tensor(words)
        ...     return {"input_ids": ids, "attention_mask": (ids > 0).long()}
        >>> toy = TransformerEncoder(transformers.BertModel(transformers.BertConfig(
        ...     vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)))
        >>> tmp = tempfile.TemporaryDirectory()
        >>> cache = Path(tmp.name)
        >>> with mock.patch("metafunc.text.experiment.load_minilm", lambda: (toy_tokenizer, toy)):
        ...     encode, net = cached_encoder(cache, max_length=6)
        ...     encode_tokens, _ = cached_encoder(cache, max_length=6, tokens=True)
        >>> texts = ["book a flight to paris", "what is my balance"]
        >>> emb = encode(texts)
        >>> emb.shape, [p.suffix for p in cache.iterdir()]
        (torch.Size([2, 8]), ['.pt'])
        >>> torch.equal(encode(texts), emb)  # the second call reads the cache
        True
        >>> encode_tokens(texts).shape  # (texts, ids and attention mask, max_length)
        torch.Size([2, 2, 6])
        >>> tmp.cleanup()
    """
    tokenizer, net = load_minilm()

    def encode(texts: Sequence[str]) -> torch.Tensor:
        toks = tokenize(tokenizer, texts, max_length=max_length)
        if tokens:
            return toks
        key = hashlib.sha1("\n".join(texts).encode()).hexdigest()[:16]
        if states_top is not None:
            path = cache / f"minilm-hf-states-top{states_top}-{key}.pt"
            if path.exists():
                return torch.load(path, weights_only=True)
            states = net.lower_states(toks, top=states_top)
            cache.mkdir(parents=True, exist_ok=True)
            save_atomic(states, path)
            return states
        path = cache / f"minilm-hf-{key}.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
        order = torch.argsort(toks[:, 1].sum(-1))  # similar lengths together: less padding per batch
        emb = torch.empty(len(texts), int(net.embeddings.word_embeddings.weight.shape[1]))  # type: ignore[union-attr,index]
        emb[order] = embed_texts(net, toks[order], batch_size=64, progress=True)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(emb, tmp)
        os.replace(tmp, path)
        return emb

    return encode, net


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metafunc.text.experiment", description=__doc__.split("\n")[0])
    p.add_argument("--algorithm", choices=ALGORITHMS, default="proto_maml")
    p.add_argument("--data-root", default=None, help="the clinc150 folder (default $METAFUNC_DATA/clinc150)")
    p.add_argument("--features", choices=("frozen", "tokens", "states"), default="frozen",
                   help="frozen: cached sentence embeddings and an MLP head; tokens: the whole MiniLM per task; "
                        "states: cached token states below the top --adapt-layers layers, which run (and adapt) "
                        "in every task")
    p.add_argument("--adapt-layers", type=int, default=1,
                   help="with --features states: how many of MiniLM's top transformer layers adapt in the inner loop")
    p.add_argument("--train-prefix", nargs="*", default=None,
                   help="with --features tokens: parameter name prefixes that learn and adapt (others frozen)")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--iterations", type=int, default=500)
    p.add_argument("--inner-steps", type=int, default=3)
    p.add_argument("--eval-steps", type=int, default=None, help="inner steps at test time (default: --inner-steps)")
    p.add_argument("--inner-lr", type=float, default=0.1)
    p.add_argument("--head-lr", type=float, default=0.1)
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--out-features", type=int, default=128)
    p.add_argument("--two-pass", action="store_true", help="fo_proto_maml: the two-pass meta-gradient")
    p.add_argument("--query-chunk-size", type=int, default=None,
                   help="fo_proto_maml --two-pass: the query gradient over this many queries at a time (memory)")
    p.add_argument("--mode", choices=("vmap", "loop"), default="vmap")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache", default="/tmp/metafunc-clinc-cache")
    p.add_argument("--out", default="/tmp/metafunc-clinc")
    return p


def _learner(args: argparse.Namespace, model: Any):
    adapt = None
    if args.features == "tokens" and args.train_prefix:
        prefixes = tuple(args.train_prefix)
        adapt = lambda name: name.startswith(prefixes)  # noqa: E731
    name = "protonet" if args.algorithm == "protonet_frozen" else args.algorithm
    spec = LEARNERS[name]
    options = {"head_lr": args.head_lr, "adapt": adapt, "two_pass": args.two_pass}
    if args.query_chunk_size is not None:
        if not spec.accepts("query_chunk_size"):
            raise ValueError(f"metafunc.text.experiment: --query-chunk-size is an option of fo_proto_maml --two-pass "
                             f"(got --algorithm {args.algorithm})")
        options["query_chunk_size"] = args.query_chunk_size
    return spec.build(model, inner_lr=args.inner_lr, steps=args.inner_steps, ways=args.ways,
                      **{k: v for k, v in options.items() if spec.accepts(k)})


def _plot(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [r["iteration"] for r in records]
    for i, key in enumerate(("loss", "accuracy")):
        values = [r[key] for r in records]
        window = max(1, len(values) // 25)
        smooth = [sum(values[max(0, j - window + 1):j + 1]) / len(values[max(0, j - window + 1):j + 1])
                  for j in range(len(values))]
        ax[i].plot(steps, values, alpha=0.3, color="C0")
        ax[i].plot(steps, smooth, color="C0")
        ax[i].set_xlabel("meta-step")
        ax[i].set_ylabel(f"query {key} (train domains)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train (unless ``protonet_frozen``) and evaluate one algorithm; returns and writes the results.

    Example:
        >>> main(["--algorithm", "protonet_frozen", "--shots", "1", "--episodes", "20"])  # doctest: +SKIP
    """
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) / f"{args.algorithm}{'-2pass' if args.two_pass else ''}-{args.features}-{args.ways}w{args.shots}s"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    encode, minilm = cached_encoder(Path(args.cache), tokens=args.features == "tokens",
                                    states_top=args.adapt_layers if args.features == "states" else None)
    samplers = clinc_samplers(encode, args.data_root, ways=args.ways, shots=args.shots, queries=args.queries,
                              test_domains=DEFAULT_TEST_DOMAINS)
    if args.features == "states":
        module: nn.Module = minilm.top_layers(args.adapt_layers)   # the transformer in the loop
    elif args.algorithm == "protonet_frozen":
        module = minilm if args.features == "tokens" else nn.Identity()
    else:
        width = int(minilm.embeddings.word_embeddings.embedding_dim)  # type: ignore[union-attr,arg-type,operator]
        module = SentenceEncoder(minilm if args.features == "tokens" else None, in_features=width, hidden=args.hidden,
                                 out_features=args.out_features)
    model, params = functionalize(module)
    learner = _learner(args, model)
    trainable = [k for k in params if args.features == "frozen" or not args.train_prefix
                 or k.startswith(tuple(args.train_prefix))]
    for k, v in params.items():
        v.requires_grad_(k in trainable)
    records: list[dict[str, Any]] = []
    start = time.time()
    if args.algorithm != "protonet_frozen":
        state = FitState(params=params, optimizer=torch.optim.Adam([params[k] for k in trainable], lr=args.outer_lr),
                         generator=torch.Generator().manual_seed(args.seed), iterations=args.iterations)
        bar = ProgressBar(total=args.iterations, initial=0, desc=f"{args.algorithm} {args.ways}w{args.shots}s",
                          metric="accuracy")
        fit(meta_value_and_grad(learner, mode=args.mode), samplers["train"], state, meta_batch=args.meta_batch,
            callbacks=[bar])
        records = state.records
        _plot(records, out / "learning_curve.png", f"{args.algorithm} on CLINC150 ({args.ways}-way {args.shots}-shot)")
        save_checkpoint(out / "checkpoint.pt", {"params": {k: v.detach() for k, v in params.items()},
                                                "args": vars(args)})
    train_seconds = time.time() - start
    eval_steps = args.eval_steps if args.eval_steps is not None else args.inner_steps
    result = evaluate_episodes(learner, {k: v.detach() for k, v in params.items()}, samplers["test"],
                               episodes=args.episodes, steps=eval_steps, classification=True,
                               generator=torch.Generator().manual_seed(1234), batch=25, mode=args.mode)
    summary = {"args": vars(args), "test": result.as_dict(), "train_seconds": train_seconds,
               "eval_seconds": time.time() - start - train_seconds, "torch": torch.__version__,
               "held_out_domains": list(DEFAULT_TEST_DOMAINS), "trainable_parameters":
               sum(params[k].numel() for k in trainable) if args.algorithm != "protonet_frozen" else 0,
               "final_train_accuracy": (sum(r["accuracy"] for r in records[-50:]) / len(records[-50:])
                                        if records else None)}
    tmp = out / "results.json.tmp"
    tmp.write_text(strict_json(summary, indent=2))
    os.replace(tmp, out / "results.json")
    print(f"{args.algorithm} {args.ways}-way {args.shots}-shot held-out domains: {result.format()}")
    return summary


if __name__ == "__main__":
    main()
