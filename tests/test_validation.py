"""Bad input gets a ValueError/TypeError naming the function, the argument and the fix, before any transform runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metafunc.core.batching
import metafunc.core.inner
from metafunc import (
    Task,
    anil,
    boil,
    fo_proto_maml,
    fomaml,
    functionalize,
    inner_loop,
    maml,
    matching_net,
    meta_batch,
    meta_sgd,
    meta_value_and_grad,
    models,
    proto_maml,
    protonet,
    reptile,
    sinusoid_tasks,
)

FACTORIES = [maml, fomaml, anil, boil, meta_sgd, reptile]


@pytest.fixture
def no_transform(monkeypatch):
    """Make any vmap/grad transform inside metafunc fail the test: errors must come first, in plain Python."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a torch.func transform ran before the input was validated")

    monkeypatch.setattr(metafunc.core.batching, "vmap", forbidden)
    monkeypatch.setattr(metafunc.core.inner, "grad_and_value", forbidden)
    monkeypatch.setattr(torch.autograd, "grad", forbidden)  # an inner loop written with plain autograd


def _classifier():
    torch.manual_seed(0)
    model, params = functionalize(models.mlp(4, (8,), 3))
    return model, params


def _tasks(num_tasks=2, n_support=6, n_query=6, features=4, ways=3) -> Task:
    g = torch.Generator().manual_seed(0)
    return Task(torch.randn(num_tasks, n_support, features, generator=g),
                torch.randint(0, ways, (num_tasks, n_support), generator=g),
                torch.randn(num_tasks, n_query, features, generator=g),
                torch.randint(0, ways, (num_tasks, n_query), generator=g))


# --- factories ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan"), float("inf")], ids=["zero", "negative", "nan", "inf"])
def test_non_positive_inner_lr(factory, lr):
    model, _ = _classifier()
    with pytest.raises(ValueError, match=rf"^{factory.__name__}: inner_lr must be > 0 \(got {lr}\)"):
        factory(model, inner_lr=lr)


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_zero_steps(factory):
    model, _ = _classifier()
    with pytest.raises(ValueError, match=rf"^{factory.__name__}: steps must be >= 1 \(got 0\)"):
        factory(model, steps=0)
    with pytest.raises(TypeError, match=rf"^{factory.__name__}: steps must be an int \(got float 2.0\)"):
        factory(model, steps=2.0)
    with pytest.raises(TypeError, match=rf"^{factory.__name__}: steps must be an int \(got bool True\)"):
        factory(model, steps=True)


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_nn_module_passed_as_the_model(factory):
    with pytest.raises(TypeError, match=rf"^{factory.__name__}: model must be a pure function model\(params, x\), "
                                        r"not an nn.Module; use model, params = metafunc.functionalize\(module\)"):
        factory(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=rf"^{factory.__name__}: model must be callable"):
        factory("not a model")


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_unknown_loss(factory):
    model, _ = _classifier()
    with pytest.raises(ValueError, match=rf"^{factory.__name__}: loss must be 'cross_entropy', 'mse' or a callable "
                                         r"\(got 'l2'\)"):
        factory(model, loss="l2")
    with pytest.raises(TypeError, match=rf"^{factory.__name__}: loss must be .* \(got int\)"):
        factory(model, loss=3)


def test_non_bool_first_order():
    model, _ = _classifier()
    for factory in (maml, anil, boil, meta_sgd):
        with pytest.raises(TypeError, match=rf"^{factory.__name__}: first_order must be a bool \(got 'yes'\)"):
            factory(model, first_order="yes")


def test_inner_loop_arguments():
    with pytest.raises(TypeError, match="^inner_loop: task_loss must be callable"):
        inner_loop(None, steps=1, lr=0.1)
    with pytest.raises(ValueError, match=r"^inner_loop: steps must be >= 1 \(got 0\)"):
        inner_loop(lambda p, x, y: x.sum(), steps=0, lr=0.1)
    with pytest.raises(ValueError, match=r"^inner_loop: lr must be > 0 \(got -1\)"):
        inner_loop(lambda p, x, y: x.sum(), steps=1, lr=-1)
    with pytest.raises(TypeError, match=r"^inner_loop: lr must be a number \(got str '0.1'\)"):
        inner_loop(lambda p, x, y: x.sum(), steps=1, lr="0.1")
    adapt = inner_loop(lambda p, x, y: x.sum(), steps=1)
    with pytest.raises(ValueError, match="^inner_loop: no learning rate; pass lr= to inner_loop or to the adapt call"):
        adapt({"w": torch.ones(1)}, torch.ones(1), torch.ones(1))


# --- meta_batch ------------------------------------------------------------------------------------------------


def test_unknown_mode_and_reduce():
    model, _ = _classifier()
    learner = maml(model)
    with pytest.raises(ValueError, match=r"^meta_batch: mode must be one of 'vmap', 'loop' \(got 'pmap'\)"):
        meta_batch(learner.meta_loss, mode="pmap")
    with pytest.raises(ValueError, match=r"^meta_batch: reduce must be one of 'mean', 'sum', 'none' \(got 'max'\)"):
        meta_batch(learner.meta_loss, reduce="max")
    with pytest.raises(TypeError, match="^meta_batch: per_task must be a MetaLearner or callable"):
        meta_batch(None)


@pytest.mark.parametrize("chunk_size, error, message", [
    (0, ValueError, r"meta_batch: chunk_size must be >= 1 \(got 0\)"),
    (-2, ValueError, r"meta_batch: chunk_size must be >= 1 \(got -2\)"),
    (1.5, TypeError, r"meta_batch: chunk_size must be an int \(got float 1.5\)"),
], ids=["zero", "negative", "float"])
def test_bad_chunk_size(chunk_size, error, message):
    model, _ = _classifier()
    with pytest.raises(error, match="^" + message):
        meta_batch(maml(model).meta_loss, chunk_size=chunk_size)


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_empty_meta_batch(no_transform, mode):
    model, params = _classifier()
    with pytest.raises(ValueError, match=r"^meta_batch: the meta-batch is empty \(0 tasks\); pass at least one task"):
        meta_batch(maml(model).meta_loss, mode=mode)(params, _tasks(num_tasks=0))


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_wrong_shapes_between_support_and_query(no_transform, mode):
    model, params = _classifier()
    run = meta_batch(maml(model).meta_loss, mode=mode)
    good = _tasks()
    with pytest.raises(ValueError, match=r"^meta_batch: support and query inputs have different example shapes "
                                         r"\(\(4,\) and \(5,\)\)"):
        run(params, good._replace(query_x=torch.randn(2, 6, 5)))
    with pytest.raises(ValueError, match=r"^meta_batch: task.query_x and task.query_y disagree on the number of "
                                         r"examples .*each example needs one target"):
        run(params, good._replace(query_y=good.query_y[:, :4]))
    with pytest.raises(ValueError, match=r"^meta_batch: every task tensor needs the same leading meta-batch size .*"
                                         "stack tasks along dim 0"):
        run(params, good._replace(query_x=good.query_x[:1], query_y=good.query_y[:1]))
    with pytest.raises(ValueError, match=r"^meta_batch: support and query targets have different shapes"):
        run(params, Task(good.support_x, good.support_y[..., None], good.query_x, good.query_y))
    with pytest.raises(ValueError, match=r"^meta_batch: task.support_x holds no examples"):
        run(params, good._replace(support_x=good.support_x[:, :0], support_y=good.support_y[:, :0]))
    with pytest.raises(ValueError, match=r"^meta_batch: task.support_x and task.support_y need an examples dimension"):
        run(params, Task(torch.randn(2), torch.randn(2), torch.randn(2), torch.randn(2)))


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_task_of_the_wrong_type(no_transform, mode):
    model, params = _classifier()
    run = meta_batch(maml(model).meta_loss, mode=mode)
    with pytest.raises(TypeError, match=r"^meta_batch: task must be a metafunc.Task\(support_x, support_y, query_x, "
                                        r"query_y\) \(got dict\)"):
        run(params, {"support_x": torch.ones(1)})
    with pytest.raises(TypeError, match=r"^meta_batch: task.query_y must be a tensor \(got list\)"):
        run(params, _tasks()._replace(query_y=[0, 1]))


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_labels_out_of_range(no_transform, factory, mode):
    model, params = _classifier()
    learner = factory(model)
    run = meta_batch(learner.meta_loss, mode=mode)
    tasks = _tasks()
    bad = tasks._replace(query_y=tasks.query_y.clone().index_fill_(1, torch.tensor([0]), 3))
    with pytest.raises(ValueError, match=rf"^{factory.__name__}: task.query_y has labels in \[0, 3\] but the model has "
                                         r"3 outputs; labels must be in \[0, 2\] \(relabel each task 0..ways-1\)"):
        run(learner.init(params), bad)
    negative = tasks._replace(support_y=tasks.support_y.clone().index_fill_(1, torch.tensor([2]), -1))
    with pytest.raises(ValueError, match=rf"^{factory.__name__}: task.support_y has labels in \[-1, "):
        run(learner.init(params), negative)
    with pytest.raises(TypeError, match=rf"^{factory.__name__}: task.support_y must hold integer class labels for "
                                        r"cross-entropy \(got torch.float32\)"):
        run(learner.init(params), tasks._replace(support_y=tasks.support_y.float()))


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_parameters_missing_from_the_dict(no_transform, factory, mode):
    model, params = _classifier()
    learner = factory(model)
    meta_params = learner.init(params)
    del meta_params["head.weight"]
    with pytest.raises(ValueError, match=rf"^{factory.__name__}: params is missing \['head.weight'\]; pass the dict "
                                         r"returned by functionalize\(module\) \(or learner.init\(params\)\)"):
        meta_batch(learner.meta_loss, mode=mode)(meta_params, _tasks())
    with pytest.raises(TypeError, match=rf"^{factory.__name__}: params must be a dict of tensors, as returned by "
                                        r"functionalize \(got list\)"):
        meta_batch(learner.meta_loss, mode=mode)(list(params.values()), _tasks())
    with pytest.raises(TypeError, match=rf"^{factory.__name__}: params must hold tensors; \['head.bias'\] are not"):
        meta_batch(learner.meta_loss, mode=mode)({**learner.init(params), "head.bias": 0.0}, _tasks())


def test_meta_sgd_without_learning_rates_says_to_call_init():
    model, params = functionalize(models.mlp(1, (8,), 1))
    learner = meta_sgd(model, loss="mse", inner_lr=0.01)
    tasks = sinusoid_tasks(2, shots=3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"^meta_sgd: the meta-parameters lack learning rates for .*"
                                         r"build them with learner.init\(params\)"):
        meta_batch(learner.meta_loss)(params, tasks)


def test_selector_that_matches_nothing():
    model, params = _classifier()
    with pytest.raises(ValueError, match=r"the parameter selector 'classifier' matches no parameter; the names are"):
        meta_batch(anil(model, head="classifier").meta_loss)(params, _tasks())
    with pytest.raises(TypeError, match=r"^boil: a parameter selector must be None, a name prefix, a list of prefixes "
                                        r"or a predicate on names \(got 3\)"):
        boil(model, head=3)


def test_functionalize_rejects_a_non_module():
    with pytest.raises(TypeError, match=r"^functionalize: module must be an nn.Module \(got function\)"):
        functionalize(lambda x: x)


def test_sinusoid_tasks_arguments():
    with pytest.raises(TypeError, match=r"^sinusoid_tasks: generator must be a torch.Generator, e.g. "
                                        r"torch.Generator\(\).manual_seed\(0\) \(got int\)"):
        sinusoid_tasks(2, generator=0)
    with pytest.raises(ValueError, match=r"^sinusoid_tasks: shots must be >= 1 \(got 0\)"):
        sinusoid_tasks(2, shots=0, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"^sinusoid_tasks: num_tasks must be >= 1 \(got 0\)"):
        sinusoid_tasks(0, generator=torch.Generator())


def test_models_arguments():
    with pytest.raises(ValueError, match=r"^conv4: width must be a positive int \(got 0\)"):
        models.conv4(width=0)
    with pytest.raises(ValueError, match=r"^conv4: image_size must be an int >= 16"):
        models.conv4(image_size=8)
    with pytest.raises(ValueError, match=r"^mlp: hidden must be positive ints \(got \(40, 0\)\)"):
        models.mlp(hidden=(40, 0))
    with pytest.raises(ValueError, match=r"^models: norm must be 'batch', 'layer', 'group' or 'none' \(got 'bn'\)"):
        models.mlp(norm="bn")


def test_random_ops_under_vmap_get_the_fix():
    torch.manual_seed(0)
    model, params = functionalize(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)))
    run = meta_batch(maml(model, inner_lr=0.1).meta_loss, mode="vmap")
    with pytest.raises(ValueError, match=r"^meta_batch: the per-task function draws random numbers under vmap .*"
                                         r"module.eval\(\) before functionalize.*mode='loop'"):
        run(params, _tasks())
    loss, _ = meta_batch(maml(model, inner_lr=0.1).meta_loss, mode="loop")(params, _tasks())  # the loop is fine
    assert torch.isfinite(loss)


# --- dtypes, loss and labels, parameter names, input shapes: clear errors before any transform -----------------


def _regression():
    torch.manual_seed(0)
    return functionalize(models.mlp(1, (8,), 1))


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_tasks_of_another_dtype_than_the_parameters(no_transform, mode):
    model, params = _classifier()
    fix = (r"make them match: convert the tasks with tasks.to\(torch.float32\) \(.float\(\) on each tensor\), or "
           r"the model with module.to\(torch.float64\) \(.double\(\)\) before functionalize")
    with pytest.raises(TypeError, match=r"^maml: task.support_x is torch.float64 but the parameters are "
                                        r"torch.float32; " + fix):
        meta_batch(maml(model), mode=mode)(params, _tasks().to(torch.float64))
    tasks = _tasks()
    with pytest.raises(TypeError, match=r"^maml: task.query_x is torch.float64 but the parameters are torch.float32"):
        meta_value_and_grad(maml(model), mode=mode)(params, tasks._replace(query_x=tasks.query_x.double()))
    reg_model, reg_params = _regression()
    sines = sinusoid_tasks(2, shots=3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match=r"^fomaml: task.support_y is torch.float64 but the parameters are "
                                        r"torch.float32; " + fix):
        meta_batch(fomaml(reg_model, loss="mse"), mode=mode)(reg_params, sines._replace(support_y=sines.support_y.double()))
    encoder, encoder_params = functionalize(nn.Sequential(nn.Linear(4, 8), nn.ReLU()))
    with pytest.raises(TypeError, match=r"^protonet: task.support_x is torch.float64 but the parameters are "
                                        r"torch.float32; " + fix):
        meta_batch(protonet(encoder), mode=mode)(encoder_params, _protonet_tasks().to(torch.float64))
    double = {k: v.detach().double().requires_grad_() for k, v in reg_params.items()}
    with pytest.raises(TypeError, match=r"^maml: task.support_x is torch.float32 but the parameters are "
                                        r"torch.float64; make them match: convert the tasks with "
                                        r"tasks.to\(torch.float64\) \(.double\(\) on each tensor\)"):
        meta_batch(maml(reg_model, loss="mse"), mode=mode)(double, sines)


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_mse_with_integer_labels(no_transform, factory):
    model, params = _classifier()
    learner = factory(model, loss="mse")
    with pytest.raises(TypeError, match=rf"^{factory.__name__}: loss='mse' needs floating-point targets but "
                                        r"task.support_y holds torch.int64 \(class labels\?\); use "
                                        r"loss='cross_entropy' for class labels, or pass float targets "
                                        r"\(task.support_y.float\(\)\)"):
        meta_value_and_grad(learner)(learner.init(params), _tasks())


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_a_key_the_model_does_not_take(no_transform, factory, mode):
    model, params = _classifier()
    learner = factory(model)
    extra = {**learner.init(params), "head.scale": torch.ones(3)}
    with pytest.raises(ValueError, match=rf"^{factory.__name__}: params has keys the model does not take: "
                                         r"\['head.scale'\] \(its parameters are \['body.0.weight', 'body.0.bias', "
                                         r"'head.weight', 'head.bias'\]\); pass the dict returned by "
                                         r"functionalize\(module\) \(or learner.init\(params\)\) without other entries"):
        meta_batch(learner, mode=mode)(extra, _tasks())
    with pytest.raises(ValueError, match=rf"^{factory.__name__}: params has keys the model does not take"):
        meta_value_and_grad(learner, mode=mode)(extra, _tasks())
    encoder, encoder_params = functionalize(nn.Sequential(nn.Linear(4, 8), nn.ReLU()))
    with pytest.raises(ValueError, match=r"^protonet: params has keys the model does not take: \['scale'\]"):
        meta_batch(protonet(encoder), mode=mode)({**encoder_params, "scale": torch.ones(())}, _protonet_tasks())


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_inputs_of_the_wrong_shape_name_the_expected_shape(no_transform, mode):
    model, params = _classifier()
    with pytest.raises(ValueError, match=r"^maml: the model's first layer 'body.0' \(Linear\) takes examples of shape "
                                         r"\(\.\.\., 4\) but task.support_x has examples of shape \(5,\); reshape the "
                                         r"tasks' inputs or build the model for examples of shape \(5,\)") as info:
        meta_value_and_grad(maml(model), mode=mode)(params, _tasks(features=5))
    assert isinstance(info.value.__cause__, RuntimeError)  # raised from torch's own error
    torch.manual_seed(0)
    conv, conv_params = functionalize(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)))
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2]] * 2)
    rgb = Task(torch.randn(2, 6, 3, 6, 6, generator=g), labels, torch.randn(2, 6, 3, 6, 6, generator=g), labels)
    with pytest.raises(ValueError, match=r"^anil: the model's first layer '0' \(Conv2d\) takes examples of shape "
                                         r"\(1, H, W\) but task.support_x has examples of shape \(3, 6, 6\)"):
        meta_batch(anil(conv, head="2"), mode=mode)(conv_params, rgb)
    larger = Task(torch.randn(2, 6, 1, 8, 8, generator=g), labels, torch.randn(2, 6, 1, 8, 8, generator=g), labels)
    with pytest.raises(ValueError, match=r"^maml: the model failed on 2 examples of task.support_x \(example shape "
                                         r"\(1, 8, 8\), torch.float32, cpu\): mat1 and mat2 shapes cannot be multiplied "
                                         r".*check that the tasks' inputs have the shape, dtype and device the model "
                                         r"was built for") as info:
        meta_batch(maml(conv), mode=mode)(conv_params, larger)
    assert isinstance(info.value.__cause__, RuntimeError)
    encoder, encoder_params = functionalize(nn.Sequential(nn.Linear(4, 8), nn.ReLU()))
    tasks = _protonet_tasks()
    with pytest.raises(ValueError, match=r"^protonet: the model's first layer '0' \(Linear\) takes examples of shape "
                                         r"\(\.\.\., 4\) but task.support_x has examples of shape \(5,\)"):
        meta_batch(protonet(encoder), mode=mode)(encoder_params, tasks._replace(
            support_x=torch.randn(2, 6, 5), query_x=torch.randn(2, 3, 5)))


def _protonet_tasks() -> Task:
    g = torch.Generator().manual_seed(0)
    return Task(torch.randn(2, 6, 4, generator=g), torch.tensor([[0, 0, 1, 1, 2, 2]] * 2),
                torch.randn(2, 3, 4, generator=g), torch.tensor([[0, 1, 2]] * 2))


@pytest.mark.parametrize("factory, ways", [(protonet, None), (protonet, 3), (matching_net, None), (proto_maml, None),
                                           (fo_proto_maml, 3)], ids=["protonet", "protonet-ways3", "matching_net",
                                                                     "proto_maml", "fo_proto_maml-ways3"])
@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_a_bad_query_label_is_reported_as_a_query_label(no_transform, factory, ways, mode):
    encoder, params = functionalize(nn.Sequential(nn.Linear(4, 8), nn.ReLU()))
    tasks = _protonet_tasks()
    bad = tasks._replace(query_y=torch.tensor([[0, 1, 2], [0, 1, 3]]))
    name = factory.__name__
    with pytest.raises(ValueError, match=rf"^{name}: task 1 has query label 3 \(task.query_y, example 2\), which is "
                                         r"not one of its support classes 0..2 \(ways=3\); every query label must be "
                                         r"a class of its task's support set") as info:
        meta_batch(factory(encoder, ways=ways), mode=mode)(params, bad)
    assert "support set of task" not in str(info.value)
    negative = tasks._replace(query_y=torch.tensor([[0, 1, 2], [0, -1, 2]]))
    with pytest.raises(ValueError, match=rf"^{name}: task.query_y has negative labels \(min -1\)"):
        meta_batch(factory(encoder, ways=ways), mode=mode)(params, negative)
    missing = tasks._replace(support_y=torch.tensor([[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 0, 0]]))  # and query has a 2
    with pytest.raises(ValueError, match=rf"^{name}: the support set of task 1 has no example of class 2 \(ways=3\)"):
        meta_batch(factory(encoder, ways=3), mode=mode)(params, missing)


def test_a_per_task_function_that_returns_something_else_is_refused(no_transform):
    tasks = _tasks()

    def three(params, task):
        return task.query_x.sum(), {}, None

    with pytest.raises(TypeError, match=r"^meta_batch: the per-task function three must return a loss tensor or "
                                        r"\(loss, metrics\) with metrics a dict of tensors \(got tuple of 3\)"):
        meta_batch(three, mode="loop")({}, tasks)
    with pytest.raises(TypeError, match=r"^meta_value_and_grad: the per-task function <lambda> must return a loss "
                                        r"tensor or \(loss, metrics\) .*\(got float\)"):
        meta_value_and_grad(lambda p, t: 1.0, mode="loop")({"w": torch.ones(1, requires_grad=True)}, tasks)
