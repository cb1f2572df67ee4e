"""Peak memory of one fo-ProtoMAML meta-step with the MiniLM encoder: two-pass (whole query set, and its query
gradient in chunks of ``--query-chunk-size``) versus single graph.

Each case runs in a fresh subprocess: it loads all-MiniLM-L6-v2 (+ MLP head), builds one 5-way 5-shot CLINC150 task
(10 queries per class, 32 tokens), then runs one meta-step (``meta_batch(learner.meta_loss)`` + ``loss.backward()``)
while a thread samples the process RSS every millisecond; the reported peak is the maximum RSS during the step minus
the RSS just before it (glibc's mmap threshold is fixed at 64 KiB in the subprocesses, so freed tensors leave
the RSS at once). The gradients of both cases are compared (they must agree to float32 round-off) before the
table is printed. On a GPU (``--device cuda``) the allocator's peak is reported instead.

    python benchmarks/memory_proto_maml.py            # table of the three cases, 3 runs each
    python benchmarks/memory_proto_maml.py --encoder top --mode loop   # the transformer in the loop
    python benchmarks/memory_proto_maml.py --repeats 1 --json /tmp/memory.json
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

__all__ = ["run_case", "main"]

CASES = ("single-graph", "two-pass", "two-pass-chunked")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(case: str, grad_path: str, *, device: str, steps: int, shots: int, queries: int, threads: int,
             encoder: str = "full", adapt_layers: int = 1, mode: str = "loop", query_chunk_size: int = 10) -> dict:
    """One meta-step of ``case`` in this process; writes the meta-gradient to ``grad_path``; returns the peak."""
    import torch

    torch.set_num_threads(threads)
    from metafunc import fo_proto_maml, functionalize, meta_batch
    from metafunc.text import SentenceEncoder, load_clinc150, load_minilm, tokenize

    torch.manual_seed(0)
    tokenizer, minilm = load_minilm()
    if encoder == "top":   # seed 000: cached states below the top layers, which run and adapt in the task
        module = minilm.top_layers(adapt_layers).to(device)
    else:
        module = SentenceEncoder(minilm, hidden=256, out_features=128).to(device)
    model, params = functionalize(module)
    data = load_clinc150(split="test")
    xs, ys, xq, yq = [], [], [], []
    for label, intent in enumerate(range(0, 75, 15)):  # one intent from each of 5 domains
        texts = [t for t, y in zip(data.texts, data.labels.tolist()) if y == intent]
        xs += texts[:shots]
        xq += texts[shots:shots + queries]
        ys += [label] * shots
        yq += [label] * queries
    from metafunc import Task

    def inputs(texts):
        tokens = tokenize(tokenizer, texts)
        return minilm.lower_states(tokens, top=adapt_layers) if encoder == "top" else tokens

    task = Task(inputs(xs)[None], torch.tensor([ys]), inputs(xq)[None], torch.tensor([yq]))
    task = task.to(device)
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
    p.add_argument("--query-chunk-size", type=int, default=10,
                   help="queries per chunk of the two-pass-chunked case (default 10, one class's queries)")
    args = p.parse_args(argv)
    common = ["--device", args.device, "--steps", str(args.steps), "--shots", str(args.shots), "--queries",
              str(args.queries), "--threads", str(args.threads), "--encoder", args.encoder, "--adapt-layers",
              str(args.adapt_layers), "--mode", args.mode, "--query-chunk-size", str(args.query_chunk_size)]
    if args.case:
        print(json.dumps(run_case(args.case, args.grad, device=args.device, steps=args.steps, shots=args.shots,
                                  queries=args.queries, threads=args.threads, encoder=args.encoder,
                                  adapt_layers=args.adapt_layers, mode=args.mode,
                                  query_chunk_size=args.query_chunk_size)))
        return []
    import torch

    from metafunc.core.tree import tree_relative_error

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for case in CASES:
                grad = str(Path(tmp) / f"{case}.pt")
                # A fixed mmap threshold makes glibc hand every large tensor back to the OS when it is freed, so
                # the RSS follows the live tensors instead of the allocator's high-water mark.
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
                out = subprocess.run([sys.executable, __file__, "--case", case, "--grad", grad, *common],
                                     capture_output=True, text=True, check=True, env=env)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["repeat"] = r
                rows.append(row)
            single = torch.load(str(Path(tmp) / "single-graph.pt"), weights_only=True)
            for row in rows[-len(CASES):]:
                error = tree_relative_error(torch.load(str(Path(tmp) / f"{row['case']}.pt"), weights_only=True),
                                            single)
                if error > 1e-4:
                    raise SystemExit(f"memory_proto_maml: {row['case']}'s gradient differs from the single graph's "
                                     f"(relative error {error:.2e})")
                row["grad_relative_error"] = error
    mib = 1024 ** 2
    network = ("MiniLM-L6 + MLP head" if args.encoder == "full" else
               f"MiniLM-L6's top {args.adapt_layers} layer(s) in the loop on cached states")
    print(f"fo-ProtoMAML meta-step, {network}, 5-way {args.shots}-shot, {args.queries} queries/class, "
          f"{args.steps} inner step(s), meta_batch mode {args.mode}, device {args.device}, torch {torch.__version__}")
    print(f"{'case':<14}{'peak MiB (median)':>20}{'all runs':>28}{'seconds':>10}{'grad rel. err':>16}")
    medians = {}
    for case in CASES:
        mine = [r for r in rows if r["case"] == case]
        peaks = sorted(r["peak_bytes"] / mib for r in mine)
        medians[case] = peaks[len(peaks) // 2]
        secs = sorted(r["seconds"] for r in mine)[len(mine) // 2]
        print(f"{case:<14}{medians[case]:>20.1f}{', '.join(f'{x:.0f}' for x in peaks):>28}{secs:>10.1f}"
              f"{max(r['grad_relative_error'] for r in mine):>16.1e}")
    for case in CASES[1:]:
        print(f"{case} / single-graph peak: {medians[case] / medians['single-graph']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
