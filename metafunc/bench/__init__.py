"""The benchmark engine behind ``metafunc bench``: time, memory and accuracy of every gradient path on a model.

For each inner-loop length ``k`` and each gradient path of :func:`metafunc.path_names` one meta-step (the default
step :func:`metafunc.meta_value_and_grad`, as ``metafunc train`` takes it) is run ``repeats`` times after a warm-up.
:func:`run_bench` returns one row per case with

* the median wall time of a meta-step;
* the peak memory of the meta-step above what the process held before it. On CUDA this is the caching
  allocator's peak (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before the step). On CPU every case runs in a fresh subprocess: it first runs a tiny
  version of the same case (one task, at most two steps) so that the code pages and allocator arenas every
  meta-step needs are mapped, returns freed heap to the OS (``malloc_trim``), reads its resident set size
  (``/proc/self/statm``) as the baseline, runs the case, and reads its lifetime peak (``resource.getrusage
  (RUSAGE_SELF).ru_maxrss``): the difference is the extra physical memory the meta-step needed (model, data and the
  Python runtime are in the baseline, and a fresh process keeps allocator caches of other cases out of it);
* the cosine similarity and the norm ratio of the path's meta-gradient against the exact (unrolled) one on the same
  parameters and tasks, where the exact case ran (``n/a`` when it was not run or did not fit in memory).

Tasks are random inputs with random labels (timing and memory do not depend on the data; the gradient comparison
is between paths on the same tasks). The modules: :mod:`~metafunc.bench.config` (:class:`BenchConfig`, the model),
:mod:`~metafunc.bench.case` (one case, in this process or a subprocess) and :mod:`~metafunc.bench.table` (every
case, the comparison, the table and the plot). ``metafunc bench`` (:mod:`metafunc.cli.bench`) parses the flags into
a :class:`BenchConfig` and prints the table.

Example:
    >>> cfg = BenchConfig(model="mlp", paths=["exact", "checkpointed"], inner_steps=[2], meta_batch=2, repeats=1,
    ...                   memory="none")
    >>> print(format_table(run_bench(cfg, progress=False)))  # doctest: +ELLIPSIS
    path          k  time/meta-step  peak memory  cos vs exact  norm / exact norm...meta-batch runs as
    exact         2 ... n/a ...
    checkpointed  2 ... n/a ...
"""

from metafunc.bench.case import bench_problem, check_cases, path_learner, run_case, run_isolated
from metafunc.bench.config import MEMORY_METHODS, MODELS, BenchConfig, build_model, memory_method
from metafunc.bench.table import format_table, plot_rows, run_bench

__all__ = ["BenchConfig", "MODELS", "MEMORY_METHODS", "build_model", "memory_method", "bench_problem", "path_learner",
           "check_cases", "run_case", "run_isolated", "run_bench", "format_table", "plot_rows"]
