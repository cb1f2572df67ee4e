"""One registry of learners: every algorithm and gradient path by name, with its options read from its signature.

Each :class:`LearnerSpec` holds a factory ``factory(model, **options) -> MetaLearner`` and what a trainer must know
about it, declared once: whether the model ends in an output layer (``needs_head``) or is an encoder (metric
learners), and which gradient path it implements (``path``: the names of ``metafunc bench --paths``). The options
(``inner_lr``, ``steps``, ``lam``, ``checkpoints``, ...) are not listed anywhere: :attr:`LearnerSpec.options` reads
them from the factory's signature, so the CLI's flags, ``metafunc bench --paths`` and the test contract cases follow the
factories by construction. ``metafunc train --algorithm``, ``metafunc bench --paths``, the text experiment and the
contract suite all read :data:`LEARNERS`.

Adding a learner is one module plus one :func:`register_learner` call (see CONTRIBUTING.md)::

    register_learner("my_maml", my_maml)                 # my_maml(model, *, inner_lr, steps, loss, my_option=...)
    LEARNERS["my_maml"].build(model, inner_lr=0.4, my_option=3)

One way builds a learner from the registry, :meth:`LearnerSpec.build`; a gradient path's learner is found by
:func:`learner_for_path` (``learner_for_path("checkpointed").build(model, inner_lr=0.1, steps=100)``).

This module imports only the learners; it knows nothing of the trainer's configuration.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, Callable

from metafunc.algorithms import (
    MetaLearner,
    anil,
    boil,
    fo_proto_maml,
    fomaml,
    maml,
    maml_plus_plus,
    matching_net,
    meta_sgd,
    proto_maml,
    protonet,
    reptile,
)
from metafunc.core.types import ModelFn
from metafunc.gradients.checkpointed import checkpointed_maml
from metafunc.gradients.implicit import imaml
from metafunc.gradients.one_step import one_step

__all__ = ["LearnerSpec", "LearnerOption", "LEARNERS", "register_learner", "path_names", "learner_for_path",
           "COMMON_OPTIONS"]

COMMON_OPTIONS = ("inner_lr", "steps", "loss", "ways", "epoch")
"""Options every trainer sets from its own settings (``--inner-lr``, ``--inner-steps``, the dataset's loss,
``--ways``, and the training epoch, ``iteration // --epoch-length``, for learners annealed by epoch such as MAML++);
a factory takes those of them it declares. Every other keyword of a factory is a learner option."""


@dataclasses.dataclass(frozen=True)
class LearnerOption:
    """One keyword option of a factory, read from its signature: ``name``, ``default`` and ``kind`` (``int``,
    ``float``, ``bool``, ``str`` or ``None`` for anything else), and whether ``None`` is allowed.

    Example:
        >>> [o.name for o in LEARNERS["imaml"].options]
        ['lam', 'cg_iterations', 'damping', 'solver', 'lam_damping', 'inner_loop', 'on_cg_divergence']
    """

    name: str
    default: Any
    kind: type | None
    optional: bool
    choices: tuple[Any, ...] | None = None


def _option_kind(annotation: Any, default: Any) -> tuple[type | None, bool, tuple[Any, ...] | None]:
    """``(kind, optional, choices)`` of an annotation such as ``int | None`` or ``Literal['sgd', 'adam']``."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return type(args[0]), False, tuple(args)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in (int, float, bool, str):
            return rest[0], True, None
        return None, True, None
    if annotation in (int, float, bool, str):
        return annotation, False, None
    if default is not None and type(default) in (int, float, bool, str):
        return type(default), False, None
    return None, default is None, None


@dataclasses.dataclass(frozen=True)
class LearnerSpec:
    """A registered learner: its ``factory``, whether its model has an output layer (``needs_head``), the gradient
    ``path`` it implements (or ``None``), and a one-line ``description``.

    Example:
        >>> spec = LEARNERS["checkpointed_maml"]
        >>> spec.needs_head, spec.path, spec.accepts("inner_lr"), [o.name for o in spec.options]
        (True, 'checkpointed', True, ['checkpoints', 'clip_norm', 'adapt', 'hvp'])
    """

    name: str
    factory: Callable[..., MetaLearner]
    needs_head: bool = True
    path: str | None = None
    description: str = ""

    def _parameters(self) -> dict[str, inspect.Parameter]:
        params = list(inspect.signature(self.factory).parameters.values())
        return {p.name: p for p in params[1:] if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def accepts(self, option: str) -> bool:
        """Whether the factory takes the keyword ``option``."""
        return option in self._parameters()

    @property
    def options(self) -> list[LearnerOption]:
        """The factory's own options (every keyword but :data:`COMMON_OPTIONS`), in signature order."""
        try:  # string annotations (``from __future__ import annotations``) resolve in the factory's globals
            hints = typing.get_type_hints(self.factory, globalns=getattr(self.factory, "__globals__", None))
        except (NameError, TypeError):
            hints = {}
        out = []
        for name, p in self._parameters().items():
            if name in COMMON_OPTIONS:
                continue
            kind, optional, choices = _option_kind(hints.get(name, p.annotation), p.default)
            out.append(LearnerOption(name, p.default, kind, optional, choices))
        return out

    def build(self, model: ModelFn, **options: Any) -> MetaLearner:
        """``factory(model, **options)``: the :data:`COMMON_OPTIONS` the factory does not take are dropped (a
        trainer passes them to every learner); any other unknown option is a ``TypeError`` naming the learner's
        options.

        Example:
            >>> from metafunc import functionalize, models
            >>> model, params = functionalize(models.mlp())
            >>> LEARNERS["protonet"].build(model, inner_lr=0.4, steps=1, ways=5).name
            'protonet'
        """
        accepted = self._parameters()
        unknown = sorted(k for k in options if k not in accepted and k not in COMMON_OPTIONS)
        if unknown:
            known = ", ".join(o.name for o in self.options) or "none"
            raise TypeError(f"{self.name}: unknown option(s) {unknown}; its options are: {known} (and "
                            f"{', '.join(k for k in COMMON_OPTIONS if k in accepted) or 'no common ones'})")
        return self.factory(model, **{k: v for k, v in options.items() if k in accepted})


LEARNERS: dict[str, LearnerSpec] = {}
"""Every learner metafunc knows, by name (``metafunc train --algorithm NAME``)."""


def register_learner(name: str, factory: Callable[..., MetaLearner], *, needs_head: bool = True,
                     path: str | None = None, description: str = "", replace: bool = False) -> LearnerSpec:
    """Register ``factory(model, *, **options) -> MetaLearner`` as ``name`` (trainable with ``metafunc train
    --algorithm name``, its keyword options becoming flags). ``needs_head=False`` for encoders without an output
    layer (metric learners); ``path`` names the gradient path it implements, for ``metafunc bench --paths``.

    Example:
        >>> from metafunc import maml
        >>> def maml_3(model, *, inner_lr=0.4, loss="cross_entropy"):
        ...     return maml(model, inner_lr=inner_lr, steps=3, loss=loss)
        >>> spec = register_learner("maml_3", maml_3, description="MAML, 3 inner steps")
        >>> "maml_3" in LEARNERS
        True
        >>> del LEARNERS["maml_3"]
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_learner: name must be an identifier such as 'my_maml' (got {name!r})")
    if not callable(factory):
        raise TypeError(f"register_learner: factory must be callable as factory(model, **options) "
                        f"(got {type(factory).__name__})")
    params = list(inspect.signature(factory).parameters.values())
    if not params or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        raise TypeError(f"register_learner: {name!r}'s factory must take the model as its first positional argument")
    if name in LEARNERS and not replace:
        raise ValueError(f"register_learner: {name!r} is registered already; pass replace=True to override it")
    if path is not None and any(s.path == path and s.name != name for s in LEARNERS.values()):
        raise ValueError(f"register_learner: gradient path {path!r} is implemented by "
                         f"{learner_for_path(path).name!r} already")
    spec = LearnerSpec(name, factory, bool(needs_head), path, description)
    LEARNERS[name] = spec
    return spec


def path_names() -> list[str]:
    """The gradient paths of the registered learners, in registration order.

    Example:
        >>> path_names()
        ['exact', 'first_order', 'checkpointed', 'one_step', 'implicit']
    """
    return [s.path for s in LEARNERS.values() if s.path is not None]


def learner_for_path(path: str) -> LearnerSpec:
    """The registered learner that implements gradient path ``path``.

    Example:
        >>> learner_for_path("implicit").name
        'imaml'
    """
    for spec in LEARNERS.values():
        if spec.path == path:
            return spec
    raise ValueError(f"unknown gradient path {path!r}; choose one of {', '.join(map(repr, path_names()))}")


for _name, _factory, _head, _path, _text in (
    ("maml", maml, True, "exact", "MAML, second order through the unrolled inner loop (Finn et al. 2017)"),
    ("fomaml", fomaml, True, "first_order", "first-order MAML (Finn et al. 2017)"),
    ("anil", anil, True, None, "ANIL: only the head adapts (Raghu et al. 2020)"),
    ("boil", boil, True, None, "BOIL: only the body adapts (Oh et al. 2021)"),
    ("meta_sgd", meta_sgd, True, None, "Meta-SGD: learned per-parameter inner learning rates (Li et al. 2017)"),
    ("reptile", reptile, True, None, "Reptile (Nichol et al. 2018)"),
    ("maml_plus_plus", maml_plus_plus, True, None, "MAML++: MSL, per-step BN, LSLR, DA (Antoniou et al. 2019)"),
    ("checkpointed_maml", checkpointed_maml, True, "checkpointed",
     "exact MAML for long inner loops in O(sqrt(k)) memory (gradient checkpointing)"),
    ("one_step", one_step, True, "one_step", "one-step (lazy) approximation of a long inner loop (Jamal et al. 2021)"),
    ("imaml", imaml, True, "implicit", "iMAML: implicit meta-gradient by conjugate gradient (Rajeswaran et al. 2019)"),
    ("protonet", protonet, False, None, "Prototypical Networks (Snell et al. 2017)"),
    ("matching_net", matching_net, False, None, "Matching Networks (Vinyals et al. 2016)"),
    ("proto_maml", proto_maml, False, None, "ProtoMAML (Triantafillou et al. 2020)"),
    ("fo_proto_maml", fo_proto_maml, False, None, "first-order ProtoMAML, optional two-pass gradient"),
):
    register_learner(_name, _factory, needs_head=_head, path=_path, description=_text)
