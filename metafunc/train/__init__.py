"""The trainer behind ``metafunc train``: settings, the loop, checkpoints, evaluation, plots and the sinusoid
baseline. Not imported by ``import metafunc``; import it as ``metafunc.train``.

Example:
    >>> import tempfile
    >>> from metafunc.train import TrainConfig, train
    >>> result = train(TrainConfig(dataset="synthetic", iterations=2, width=8, out=tempfile.mkdtemp()), progress=False)
    >>> result.records[-1]["iteration"]
    2
"""

from metafunc.data.sinusoid import SinusoidSource
from metafunc.data.synthetic import GaussianClassification
from metafunc.train.callbacks import (
    AgreeAcrossRanks,
    Barrier,
    Checkpointer,
    MetricsLog,
    ProgressBar,
    StopOnSignal,
    Validation,
)
from metafunc.train.checkpoint import CheckpointError, check_compatible, load_checkpoint, previous_path, save_checkpoint
from metafunc.train.checkpoint_evaluation import CheckpointEvaluation, evaluate_checkpoint
from metafunc.train.config import RESUME_KEYS, ResolvedConfig, TrainConfig, resolve_config
from metafunc.train.datasets import DATASETS, DatasetSpec, dataset_spec, register_dataset
from metafunc.train.evaluation import BATCHNORM_PROTOCOL, EvalResult, TaskSource, evaluate_episodes, new_output_layer
from metafunc.train.experiment import Experiment, build_experiment, build_network, build_sources, learner_options
from metafunc.train.fit import FitState, fit
from metafunc.train.loop import (
    COSINE_FLOOR,
    EXIT_CHECKPOINT,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    NonFiniteError,
    Preempted,
    TrainResult,
    checkpoint_state,
    default_is_main,
    restore_checkpoint,
    run_callbacks,
    run_fraction,
    train,
    trainer_step,
)
from metafunc.train.plots import plot_learning_curve, save_figure
from metafunc.train.sinusoid_baseline import (
    SINUSOID_EVAL_STEPS,
    SinusoidComparison,
    compare_with_baseline,
    plot_sinusoid_adaptation,
    pretrain_baseline,
    sinusoid_comparison,
)

__all__ = [
    "fit", "FitState", "StopOnSignal", "AgreeAcrossRanks", "Validation", "MetricsLog", "ProgressBar", "Checkpointer",
    "Barrier", "run_callbacks", "evaluate_checkpoint", "CheckpointEvaluation", "compare_with_baseline", "run_fraction", "COSINE_FLOOR",
    "TrainConfig", "ResolvedConfig", "RESUME_KEYS", "resolve_config",
    "DATASETS", "DatasetSpec", "dataset_spec", "register_dataset",
    "Experiment", "build_experiment", "build_sources", "build_network", "learner_options",
    "TrainResult", "train", "trainer_step", "default_is_main", "checkpoint_state", "restore_checkpoint",
    "save_checkpoint", "load_checkpoint", "check_compatible", "CheckpointError", "previous_path",
    "NonFiniteError", "Preempted", "EXIT_NONFINITE", "EXIT_PREEMPTED", "EXIT_CHECKPOINT",
    "EvalResult", "TaskSource", "evaluate_episodes", "BATCHNORM_PROTOCOL", "new_output_layer",
    "plot_learning_curve", "save_figure",
    "SINUSOID_EVAL_STEPS", "SinusoidComparison", "pretrain_baseline", "sinusoid_comparison", "plot_sinusoid_adaptation",
    "SinusoidSource", "GaussianClassification",
]
