"""Peak memory and time of one ProtoMAML meta-step with a transformer encoder: fo-ProtoMAML two-pass (whole query
set, and its query gradient in chunks of ``--query-chunk-size``) versus single graph, and second-order ProtoMAML.

Each case runs in a fresh subprocess: it loads all-MiniLM-L6-v2 (+ MLP head), builds one 5-way 5-shot CLINC150 task
(10 queries per class, 32 tokens), then runs one meta-step (``meta_batch(learner.meta_loss)`` + ``loss.backward()``)
while a thread samples the process RSS every millisecond; the reported peak is the maximum RSS during the step minus
the RSS just before it (glibc's mmap threshold is fixed at 64 KiB in the subprocesses, so freed tensors leave
the RSS at once). The gradients of both cases are compared (they must agree to float32 round-off) before the
table is printed. On a GPU (``--device cuda``) the allocator's peak is reported instead.

    python benchmarks/memory_proto_maml.py            # table of the three cases, 3 runs each
    python benchmarks/memory_proto_maml.py --encoder top --mode loop   # the transformer in the loop
    python benchmarks/memory_proto_maml.py --repeats 1 --json /tmp/memory.json
    # issue 20's BERT-base check: 12 layers, 768 wide, random weights, top 2 layers adapted, 4 tasks, loop and vmap
    python benchmarks/memory_proto_maml.py --model bert-base --encoder top --adapt-layers 2 --tasks 4 \
        --cases single-graph two-pass second-order --repeats 1 --mode loop      # and --mode vmap
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["run_case", "main"]

CASES = ("single-graph", "two-pass", "two-pass-chunked", "second-order")
"""fo-ProtoMAML three ways (equal gradients, checked), and second-order ProtoMAML (its own gradient)."""


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _encoder_module(model_name: str, encoder: str, adapt_layers: int) -> tuple[Any, Any, Any]:
    """``(tokenizer, full TransformerEncoder, the module in the loop)`` for ``--model`` and ``--encoder``."""
    from metafunc.text import SentenceEncoder, load_minilm

    tokenizer, minilm = load_minilm()
    full = minilm
    if model_name == "bert-base":   # BERT-base's shape (12 layers, 768 wide), random weights; MiniLM's vocabulary
        import transformers

        from metafunc.hf import TransformerEncoder

        full = TransformerEncoder(transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False))
    if encoder == "top":   # seed 000: cached states below the top layers, which run and adapt in the task
        return tokenizer, full, full.top_layers(adapt_layers)
    return tokenizer, full, SentenceEncoder(full, in_features=full.embeddings.word_embeddings.embedding_dim,
                                            hidden=256, out_features=128)


def run_case(case: str, grad_path: str, *, device: str, steps: int, shots: int, queries: int, threads: int,
             encoder: str = "full", adapt_layers: int = 1, mode: str = "loop", query_chunk_size: int = 10,
             model_name: str = "minilm", tasks: int = 1) -> dict:
    """One meta-step of ``case`` in this process; writes the meta-gradient to ``grad_path``; returns the peak."""
    import torch

    torch.set_num_threads(threads)
    from metafunc import Task, fo_proto_maml, functionalize, meta_batch, proto_maml
    from metafunc.text import load_clinc150, tokenize

    torch.manual_seed(0)
    tokenizer, full, module = _encoder_module(model_name, encoder, adapt_layers)
    model, params = functionalize(module.to(device))
    data = load_clinc150(split="test")
    xs, ys, xq, yq = [], [], [], []
    for label, intent in enumerate(range(0, 75, 15)):  # one intent from each of 5 domains
        texts = [t for t, y in zip(data.texts, data.labels.tolist()) if y == intent]
        xs += texts[:shots]
        xq += texts[shots:shots + queries]
        ys += [label] * shots
        yq += [label] * queries

    def inputs(texts: list[str]) -> torch.Tensor:
        tokens = tokenize(tokenizer, texts)
        return full.lower_states(tokens, top=adapt_layers) if encoder == "top" else tokens

    def stack(t: torch.Tensor) -> torch.Tensor:
        return t[None].expand(tasks, *t.shape).contiguous()

    task = Task(stack(inputs(xs)), stack(torch.tensor(ys)), stack(inputs(xq)), stack(torch.tensor(yq))).to(device)
    if case == "second-order":
        learner = proto_maml(model, inner_lr=1e-3, head_lr=0.1, steps=steps)
    else:
        learner = fo_proto_maml(model, inner_lr=1e-3, head_lr=0.1, steps=steps, two_pass=case != "single-graph",
                                query_chunk_size=query_chunk_size if case == "two-pass-chunked" else None)
    step = meta_batch(learner.meta_loss, mode=mode)
    import gc

    gc.collect()
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
    start = time.perf_counter()
    loss, _ = step(params, task)
    loss.backward()
    seconds = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.synchronize()
        used = torch.cuda.max_memory_allocated() - base
    else:
        stop.set()
        thread.join()
        used = peak[0] - base
    torch.save({k: v.grad.detach().cpu() for k, v in params.items()}, grad_path)
    return {"case": case, "peak_bytes": used, "seconds": seconds, "loss": float(loss)}


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every case ``--repeats`` times in subprocesses, check equal gradients, print the table.

    Example:
        >>> rows = main(["--repeats", "1"])  # doctest: +SKIP
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", choices=CASES, default=None, help="internal: run one case in this process")
    p.add_argument("--grad", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--encoder", choices=("full", "top"), default="full",
                   help="full: MiniLM + MLP head on tokens; top: only the top --adapt-layers transformer layers, on "
                        "cached lower-layer states (the transformer in the loop)")
    p.add_argument("--adapt-layers", type=int, default=1)
    p.add_argument("--mode", choices=("loop", "vmap"), default="loop")
    p.add_argument("--model", choices=("minilm", "bert-base"), default="minilm",
                   help="minilm: all-MiniLM-L6-v2 (pretrained); bert-base: BERT-base's shape from its config, random "
                        "weights (12 layers, 768 wide)")
    p.add_argument("--tasks", type=int, default=1, help="tasks in the meta-batch (copies of the one CLINC150 task)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES[:3]))
    p.add_argument("--query-chunk-size", type=int, default=10,
                   help="queries per chunk of the two-pass-chunked case (default 10, one class's queries)")
    args = p.parse_args(argv)
    common = ["--device", args.device, "--steps", str(args.steps), "--shots", str(args.shots), "--queries",
              str(args.queries), "--threads", str(args.threads), "--encoder", args.encoder, "--adapt-layers",
              str(args.adapt_layers), "--mode", args.mode, "--query-chunk-size", str(args.query_chunk_size),
              "--model", args.model, "--tasks", str(args.tasks)]
    if args.case:
        print(json.dumps(run_case(args.case, args.grad, device=args.device, steps=args.steps, shots=args.shots,
                                  queries=args.queries, threads=args.threads, encoder=args.encoder,
                                  adapt_layers=args.adapt_layers, mode=args.mode,
                                  query_chunk_size=args.query_chunk_size, model_name=args.model, tasks=args.tasks)))
        return []
    import torch

    from metafunc.core.tree import tree_relative_error

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for case in args.cases:
                grad = str(Path(tmp) / f"{case}.pt")
                # A fixed mmap threshold makes glibc hand every large tensor back to the OS when it is freed, so
                # the RSS follows the live tensors instead of the allocator's high-water mark.
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
                out = subprocess.run([sys.executable, __file__, "--case", case, "--grad", grad, *common],
                                     capture_output=True, text=True, check=True, env=env)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["repeat"] = r
                rows.append(row)
            first = args.cases[0] if args.cases[0] != "second-order" else None
            reference = torch.load(str(Path(tmp) / f"{first}.pt"), weights_only=True) if first else None
            for row in rows[-len(args.cases):]:
                if row["case"] == "second-order" or reference is None:
                    row["grad_relative_error"] = float("nan")   # a different gradient: nothing to compare
                    continue
                error = tree_relative_error(torch.load(str(Path(tmp) / f"{row['case']}.pt"), weights_only=True),
                                            reference)
                if error > 1e-4:
                    raise SystemExit(f"memory_proto_maml: {row['case']}'s gradient differs from {first}'s "
                                     f"(relative error {error:.2e})")
                row["grad_relative_error"] = error
    mib = 1024 ** 2
    name = "MiniLM-L6" if args.model == "minilm" else "BERT-base (random weights)"
    network = (f"{name} + MLP head" if args.encoder == "full" else
               f"{name}'s top {args.adapt_layers} layer(s) in the loop on cached states")
    print(f"ProtoMAML meta-step, {network}, {args.tasks} task(s) of 5-way {args.shots}-shot, {args.queries} "
          f"queries/class, {args.steps} inner step(s), meta_batch mode {args.mode}, device {args.device}, "
          f"torch {torch.__version__}")
    print(f"{'case':<14}{'peak MiB (median)':>20}{'all runs':>28}{'seconds':>10}{'grad rel. err':>16}")
    medians = {}
    for case in args.cases:
        mine = [r for r in rows if r["case"] == case]
        peaks = sorted(r["peak_bytes"] / mib for r in mine)
        medians[case] = peaks[len(peaks) // 2]
        secs = sorted(r["seconds"] for r in mine)[len(mine) // 2]
        print(f"{case:<14}{medians[case]:>20.1f}{', '.join(f'{x:.0f}' for x in peaks):>28}{secs:>10.1f}"
              f"{max(r['grad_relative_error'] for r in mine):>16.1e}")
    for case in args.cases[1:]:
        print(f"{case} / {args.cases[0]} peak: {medians[case] / medians[args.cases[0]]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
