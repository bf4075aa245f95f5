"""Every use of private Keras / TensorFlow / tf2onnx API, each with why.

The rest of the package calls only the functions here (and public API):
when a new version moves one of these hooks, `tests/test_keras_hooks.py`
fails naming it, and this is the one file to change.

Nothing heavy is imported at module level: `layers` imports this module, and
`fold` / `convert` must never import tf2onnx or onnxruntime; every import
happens inside the function that needs it.
"""

import contextlib
import copy

# --- layer tracking ---


def flatten_layers(layer, include_self=False, recursive=True):
    """Every layer tracked by `layer` (nested models and the sublayers of
    custom layers too, each once), in Keras's tracking order.

    Why: Keras 3 has no public recursive iteration (`Model.layers` lists the
    top level only; `Layer._flatten_layers` is what Keras's own
    `summary`, `weights` and saving use). Without it, conversion and the
    schedule would miss the normalization layers inside nested models and
    custom blocks.
    """
    return list(layer._flatten_layers(include_self=include_self,
                                      recursive=recursive))


def own_variables(layer):
    """The variables `layer` created itself (trainable first), without those
    of its sublayers.

    Why: `layer.weights` is the layer's variables and all its sublayers',
    flattened; Keras keeps a layer's own in `_trainable_variables` /
    `_non_trainable_variables` and has no public name for them. Copying a
    custom block pairs its sublayers by attribute and moves its own
    variables by name; without this, a block's own weights could not be told
    from its sublayers' (which share names such as `kernel`).
    """
    return list(layer._trainable_variables) + list(
        layer._non_trainable_variables)


# Attributes of a layer that are Keras's or TensorFlow's bookkeeping of the
# same sublayers, not where the layer's own code keeps them.
_TRACKING_ATTRIBUTES = ("_layers", "_tracker", "_modules", "_parameters",
                        "_buffers")
_TRACKING_PREFIXES = ("_keras", "_self_")


def layer_attributes(layer):
    """{name: value} of a layer's instance attributes, as user code set
    them, on every backend.

    Why: on PyTorch a Keras layer is a `torch.nn.Module`, whose
    `__setattr__` keeps a sublayer in `_modules` instead of the instance
    `__dict__`; without merging them, a block's `self.bn` would be found as
    `_modules["bn"]` there and as `bn` elsewhere, and a file saved on one
    backend would name other paths than on another.
    """
    attributes = dict(vars(layer))
    attributes.update(vars(layer).get("_modules") or {})
    return attributes


def is_tracking_attribute(name):
    """Whether the instance attribute `name` of a layer is Keras's (or
    TensorFlow's checkpointing) bookkeeping rather than the layer's own.

    Why: a custom layer's sublayers are found, and replaced in place, by
    the attribute that holds them (`vars(layer)`). Keras also lists them in
    `_layers` and in its `_tracker`, TensorFlow's checkpointing in `_self_*`
    attributes and Keras in `_keras*` ones; there is no public list of "the
    attributes user code set". Without this filter each sublayer would be
    found twice, and conversion would rewrite Keras's own lists as if they
    were the layer's attributes. PyTorch's `torch.nn.Module` keeps them in
    `_modules` (see `layer_attributes`).
    """
    return name in _TRACKING_ATTRIBUTES or name.startswith(_TRACKING_PREFIXES)


def replace_sublayer(layer, attr, index, old, new):
    """Puts `new` where `layer` holds sublayer `old`: in attribute `attr`
    (index None) or at `attr[index]` of a list or dict.

    Why: Keras locks a built layer's tracker ("You cannot add new elements
    of state to a layer that is already built") and its tracked lists and
    dicts refuse new layers the same way; TensorFlow's checkpointing keeps
    its own name -> object map (`_self_unconditional_dependency_names`).
    Conversion swaps a BatchNormalization inside an already built custom
    block, so it replaces the value in Keras's tracker store
    (`Tracker.replace_tracked_value`, what Keras's own quantization uses)
    and writes the attribute past `Layer.__setattr__`. Without it the swap
    raises, or the block keeps saving and training the old sublayer.
    """
    tracker = getattr(layer, "_tracker", None)
    if tracker is not None and tracker.is_in_store("layers", old):
        tracker.replace_tracked_value("layers", old, new)
    container = getattr(layer, attr)
    if index is None:
        object.__setattr__(layer, attr, new)
        modules = vars(layer).get("_modules")  # PyTorch's, see above
        if isinstance(modules, dict) and modules.get(attr) is old:
            modules[attr] = new
        names = getattr(layer, "_self_unconditional_dependency_names", None)
        if isinstance(names, dict) and names.get(attr) is old:
            dict.__setitem__(names, attr, new)
    elif isinstance(container, dict):
        dict.__setitem__(container, index, new)
    else:
        list.__setitem__(container, index, new)


# --- layer (de)serialization ---


def adopt_call_signature(wrapper, layer):
    """Makes Keras bind the arguments of calls to `wrapper` (whose `call`
    takes `*args, **kwargs` and calls `layer`) by `layer.call`'s signature.

    Why: Keras reads `Layer._call_signature` (set in `Layer.__init__`) to
    tell tensor arguments from the others; against `**kwargs` every keyword
    lands in one argument, and a block called as `block(x, skips=[a, b],
    mode="sum")` is then refused ("you cannot mix tensors and
    non-tensors"), which made rebuilding such a model fail. There is no
    public way to give a wrapper its wrapped layer's signature.
    """
    wrapper._call_signature = layer._call_signature
    wrapper.call_signature_parameters = list(layer.call_signature_parameters)
    wrapper._call_has_training_arg = layer._call_has_training_arg
    wrapper._call_has_mask_arg = layer._call_has_mask_arg
    wrapper._call_has_context_arg = {
        arg: arg in wrapper.call_signature_parameters
        for arg in wrapper._call_context_args}


def _copy_value(value, memo):
    """A deep copy of `value`; a value that cannot be copied (a lock, an
    open file, a module) and is no Keras object is shared with the
    original instead, as it holds no weights."""
    try:
        return copy.deepcopy(value, memo)
    except (TypeError, copy.Error):
        from keras.src.saving.keras_saveable import KerasSaveable
        from keras.src.utils import tracking

        if isinstance(value, (KerasSaveable, tracking.TrackedList,
                              tracking.TrackedDict, tracking.TrackedSet)):
            raise
        memo[id(value)] = value
        return value


def _copy_object(obj, memo):
    cls = type(obj)
    new = cls.__new__(cls)
    memo[id(obj)] = new
    for key, value in obj.__dict__.items():
        new.__dict__[key] = _copy_value(value, memo)
    return new


def _copy_tracked_list(obj, memo):
    new = _copy_object(obj, memo)
    list.extend(new, [_copy_value(v, memo) for v in obj])
    return new


def _copy_tracked_dict(obj, memo):
    new = _copy_object(obj, memo)
    for key, value in obj.items():
        dict.__setitem__(new, key, _copy_value(value, memo))
    return new


def _copy_tracked_set(obj, memo):
    new = _copy_object(obj, memo)
    for value in obj:
        set.add(new, _copy_value(value, memo))
    return new


def live_copy(layer):
    """A deep copy of the built `layer` as it is in memory: every sublayer
    and variable copied (new variables, same values), nothing recreated
    from its config, and no graph nodes (the copy is called afresh).

    Why: `copy.deepcopy` of a Keras object goes through `__reduce__`, which
    saves and reloads it through its config, the very thing that fails for
    layers whose `get_config()` does not describe them (sublayers made in
    `build()` from arguments the config leaves out) or whose Python code
    cannot be found again (a loaded Lambda). Keras's tracked containers
    refuse additions once a layer is built, so they are refilled directly.
    Attributes that cannot be copied and hold no weights (a lock) are
    shared with the original. The `__deepcopy__` hooks exist only during
    this call.
    """
    from keras.src.saving.keras_saveable import KerasSaveable
    from keras.src.utils import tracking

    memo = {}
    for sub in [layer] + flatten_layers(layer):
        memo[id(sub._inbound_nodes)] = []
        memo[id(sub._outbound_nodes)] = []
    hooks = [(KerasSaveable, _copy_object),
             (tracking.TrackedList, _copy_tracked_list),
             (tracking.TrackedDict, _copy_tracked_dict),
             (tracking.TrackedSet, _copy_tracked_set)]
    for cls, hook in hooks:
        cls.__deepcopy__ = hook
    try:
        new = copy.deepcopy(layer, memo)
    finally:
        for cls, _ in hooks:
            del cls.__deepcopy__
    for obj in list(memo.values()):
        if isinstance(obj, tracking.Tracker):
            # Trackers know their values by id: the copies' ids now.
            obj.stored_ids = {name: {id(v) for v in store}
                              for name, (_, store) in obj.config.items()}
    return new


def from_config_unsafe(cls, config):
    """`cls.from_config(config)` with Keras's safe mode lifted.

    Why: safe mode refuses to deserialize a Lambda layer's Python code; it
    exists for files. `clone_layer` recreates a layer that is already in
    memory (its code is already running), but `Layer.from_config` has no
    `safe_mode` argument, only Keras's private `SafeModeScope` sets it for
    one call (the public `keras.config.enable_unsafe_deserialization()`
    lifts it for the whole process, for files too). Without it, converting
    a model with a Lambda layer fails.
    """
    from keras.src.saving.serialization_lib import SafeModeScope

    with SafeModeScope(False):
        return cls.from_config(config)


def function_from_code(code, defaults, closure, globals_):
    """A Python function from the code a Keras 2 Lambda layer saved, run
    with `globals_` (the names of the module that defined it).

    Why: Keras 3 recreates such functions with `python_utils.func_load`
    and the globals of that Keras module, so a Lambda calling a helper of
    its own module (`Lambda(expand_dims)` in a model-zoo library) fails
    with a NameError; Keras 2 used the module named in the config, as this
    does. `func_load` (which decodes Keras's encoding) has no public name.
    """
    from keras.src.utils import python_utils

    return python_utils.func_load(code, defaults=defaults, closure=closure,
                                  globs=globals_)


@contextlib.contextmanager
def lambda_code_globals(choose):
    """Within the block, a Lambda function Keras recreates from saved code
    runs with `choose(code)`'s globals where that gives a dict (Keras's own
    module's globals otherwise).

    Why: `python_utils.func_load` (no public name; `Lambda.from_config`
    calls it through its module) gives every loaded function the globals
    of that Keras module, so a Lambda calling a helper of the module that
    defined it fails on loading with a NameError."""
    import types

    from keras.src.utils import python_utils

    original = python_utils.func_load

    def func_load(code, defaults=None, closure=None, globs=None):
        function = original(code, defaults=defaults, closure=closure,
                            globs=globs)
        globals_ = None if globs is not None else choose(function.__code__)
        if globals_ is None:
            return function
        return types.FunctionType(function.__code__, globals_,
                                  function.__name__, function.__defaults__,
                                  function.__closure__)

    python_utils.func_load = func_load
    try:
        yield
    finally:
        python_utils.func_load = original


def load_legacy_h5(path, config, custom_objects=None, safe_mode=True):
    """A Keras 3 model from a Keras 2 `.h5` file, built from `config` (its
    `model_config`, rewritten where Keras 3 refuses it), with the file's
    weights.

    Why: these are the steps of Keras's own `.h5` reader
    (`legacy_h5_format.load_model_from_hdf5`: the legacy-config option, safe
    mode, `model_from_config`, `load_weights_from_hdf5_group`), none with a
    public name, and `keras.models.load_model` cannot take a rewritten
    config. Without it, Keras 2 files with TF-op layers, or with configs
    Keras 2 wrote and Keras 3 rejects (`groups` on a DepthwiseConv2D), do
    not load.
    """
    import h5py
    from keras.src.legacy.saving import legacy_h5_format, saving_options
    from keras.src.legacy.saving.saving_utils import model_from_config
    from keras.src.saving.serialization_lib import SafeModeScope

    with h5py.File(path, "r") as f:
        with saving_options.keras_option_scope(use_legacy_config=True), \
                SafeModeScope(safe_mode):
            model = model_from_config(config, custom_objects=custom_objects)
            legacy_h5_format.load_weights_from_hdf5_group(
                legacy_h5_format.safe_get_h5_group(f, "model_weights"), model)
    return model


# --- the functional graph ---


def is_functional(model):
    """Whether `model` is a Keras Functional model (`keras.Model(inputs,
    outputs)`, which Sequential is not).

    Why: `keras.Model(inputs, outputs)` returns an instance of Keras's
    private `Functional` class; a subclassed model is a `keras.Model` too,
    and there is no public way to tell a graph from Python code. Without it,
    `model_graph` could not refuse subclassed models nor walk functional ones.
    """
    from keras.src.models.functional import Functional

    return isinstance(model, Functional)


def sequential_functional(model):
    """The Functional model a built Sequential model runs, or None while it
    has no input shape.

    Why: Keras builds a Sequential model's graph as a private `_functional`
    model; Sequential has no public graph of its own. Without it,
    Sequential models could not be walked, converted through `clone_model`
    with their input names, or folded.
    """
    return getattr(model, "_functional", None)


def nodes_deepest_first(functional):
    """The call nodes of a Functional model, as one list per depth, the
    inputs' depth first and the outputs' last.

    Why: `Functional._nodes_by_depth` is Keras's own execution order (what
    `Functional.call` runs); there is no public list of a model's nodes, and
    `model.layers` loses shared layers' several calls and raw operations.
    Without it there is no graph to walk. The nodes' `operation`,
    `is_input`, `input_tensors` and `outputs` are read as Keras's Node has
    them.
    """
    by_depth = functional._nodes_by_depth
    return [list(by_depth[depth]) for depth in sorted(by_depth, reverse=True)]


def call_arguments(node, values):
    """(args, kwargs) of the call `node` records, each KerasTensor replaced by
    `values[id(tensor)]`.

    Why: a node keeps its call's arguments (keyword arguments, nested
    structures and constants included) in Keras's private
    `SymbolicArguments`; `fill_in` is how `Functional.call` replays them.
    Without it, rebuilt models would lose every argument but the tensors.
    """
    return node.arguments.fill_in(values)


def producing_operation(tensor):
    """The layer or operation whose call produced the KerasTensor `tensor`
    (an `InputLayer` for a model input).

    Why: Keras records a symbolic tensor's origin only in its private
    `_keras_history` (operation, node index, tensor index). Without it,
    inputs could not keep their layers' names and the graph could not be
    followed back from an output.
    """
    return tensor._keras_history.operation


def producing_node(tensor):
    """(operation, node) of the call that produced the KerasTensor `tensor`.

    Why: the node (with the call's `input_tensors`) is at index
    `_keras_history.node_index` of the operation's private `_inbound_nodes`;
    Keras has no public way from a tensor to the call that made it. Without
    it, a model's head and its final activation could not be found.
    """
    operation, node_index, _ = tensor._keras_history
    return operation, operation._inbound_nodes[node_index]


def inbound_nodes(operation):
    """Every call node of `operation` (a layer or operation), in call order;
    empty for one never called symbolically.

    Why: a shared layer's calls are numbered by their index in its private
    `_inbound_nodes`, the order the model's code made them; the graph's
    `call` numbers follow it. Without it they would follow Keras's depth
    sort, which mixes up a shared layer's calls.
    """
    return list(getattr(operation, "_inbound_nodes", None) or [])


def outputs_structure(model):
    """The nested structure (list, dict, single tensor) a Functional model was
    built with as outputs, or None for other models.

    Why: `model.outputs` is flattened; Keras keeps the structure only in
    the private `_outputs_struct`. Without it a rebuilt model would return
    a list where the original returned a dict, and ONNX outputs would lose
    the dict's keys as names.
    """
    return getattr(model, "_outputs_struct", None)


# --- BatchNormalization's protected steps ---

# Protected methods of `keras.layers.BatchNormalization` (Keras >= 3.14) that
# `BatchRenormalization` calls: name -> what it does there.
# tests/test_keras_hooks.py checks each exists and runs in a training call.
# The layer computes r, d, their composition with gamma and beta and the
# statistic updates itself (Keras's `_renorm_correction_and_moments`,
# `_compose_transforms` and `_update_renorm_statistics` cost eager PyTorch
# about twice the operations for the same numbers; see the layer's `call`).
BATCHNORM_HOOKS = {
    "_moments":
        "the batch's mean and variance, masked inputs and moments "
        "synchronized across replicas included; called by every training "
        "call without microbatches",
}


def batch_moments(layer, inputs, mask):
    """The mean and variance of a batch over every axis but the channels',
    as Keras's BatchNormalization computes them: over the unmasked
    positions when `mask` is given, across replicas when the layer is
    `synchronized`.

    Why: Keras has no public masked moments, and `ops.moments` alone knows
    no mask; `_moments` is the protected step Keras's own training call
    uses. Without it the layer would have to copy Keras's masked
    reduction.
    """
    return layer._moments(inputs, mask)


def assign_statistics(pairs):
    """Assigns each (variable, value) of `pairs` as `variable.assign(value)`
    does; `value` has the variable's shape and dtype.

    Why: on eager PyTorch Keras's `assign` converts every value (two ATen
    calls that move nothing), checks its shape, looks the stateless scope up
    and enters `torch.no_grad()`, per variable: about 10 µs each, a fifth of
    what a renorm training call adds to batch normalization for its five
    statistics. Outside a stateless scope Keras writes with `copy_` under
    `no_grad` (its protected `_direct_assign`); this does the same for all
    five under one `no_grad`. Elsewhere (TensorFlow, JAX, a stateless call)
    each variable is assigned as usual. Without it the layer stays correct,
    only slower on PyTorch.
    """
    import keras
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    if keras.backend.backend() != "torch" or in_stateless_scope():
        for variable, value in pairs:
            variable.assign(value)
        return
    import torch

    with torch.no_grad():
        for variable, value in pairs:
            variable.value.copy_(value)


# --- Model.fit ---


class FitAssigner:
    """Assigns values to some of `model`'s variables between two training
    steps of its `fit`, so that the next step reads them; made once per
    `fit` (at `on_train_begin`).

    Why: under JAX, `fit` keeps the model's state in its own lists between
    steps and leaves the variables themselves unset (`_value` None) until a
    callback touches `Callback.model`, which writes every variable of the
    model back through `assign` (8 ms for ResNet50): doing so at every step
    of a schedule would stall the device. Here the pending state
    (`model._jax_state`, a copy of the trainer's lists) is attached to the
    variables directly (`_value`, as `JaxVariable._direct_assign` does,
    without its per-variable conversions), the new values are set, and
    `_jax_state_synced` tells the trainer to read its state back from the
    variables before the next step, as it does after Keras's own sync.
    Between epochs, after another callback synced the state, and on the
    other backends, the variables are simply assigned (on TensorFlow in one
    traced call: an eager assignment costs about 0.1 ms). Without this hook
    the schedule would either be ignored under jit or cost a full sync per
    step.
    """

    _GROUPS = ("trainable_variables", "non_trainable_variables",
               "optimizer_variables", "metrics_variables")

    def __init__(self, model, variables):
        import keras

        self._model = model
        self._variables = list(variables)
        self._backend = keras.backend.backend()
        self._live = None
        self._tf_assign = None
        if self._backend == "jax":
            optimizer = getattr(model, "optimizer", None)
            self._live = {
                "trainable_variables": list(model.trainable_variables),
                "non_trainable_variables": list(
                    model.non_trainable_variables),
                "optimizer_variables": list(optimizer.variables)
                if optimizer is not None else [],
                "metrics_variables": list(model.metrics_variables),
            }
        elif self._backend == "tensorflow":
            self._tf_assign = _tf_assigner(self._variables)

    def assign(self, values):
        model = self._model
        if self._backend == "jax":
            state = getattr(model, "_jax_state", None)
            if state and not getattr(model, "_jax_state_synced", True):
                for group in self._GROUPS:
                    pending = state.get(group)
                    if pending:
                        for variable, value in zip(self._live[group],
                                                   pending):
                            variable._value = value
                model._jax_state_synced = True
            import jax
            import jax.numpy as jnp

            for variable, value in zip(self._variables, values):
                old = variable._value
                variable._value = jax.device_put(
                    jnp.asarray(value, old.dtype), old.sharding)
            return
        if self._tf_assign is not None:
            self._tf_assign(values)
            return
        for variable, value in zip(self._variables, values):
            variable.assign(value)


def _tf_assigner(variables):
    import tensorflow as tf

    targets = [v.value for v in variables]

    @tf.function
    def assign(new):
        for target, value in zip(targets, tf.unstack(new)):
            target.assign(value)

    return lambda values: assign(tf.constant(values, tf.float32))


def symbolic_build(model, data_batch):
    """Builds `model`'s optimizer and metric variables from one data batch,
    as the first step of `fit` does.

    Why: under `MultiWorkerMirroredStrategy` Keras 3's `fit` builds from a
    batch reduced across workers, which fails (keras-team/keras#20585); the
    workaround builds from a local batch through the private
    `Trainer._symbolic_build`. Without it, multi-worker `fit` fails before
    the first step.
    """
    model._symbolic_build(data_batch=data_batch)


def set_symbolic_build(model, function):
    """Makes `model.fit` call `function(iterator=None, data_batch=None)`
    instead of Keras's own `_maybe_symbolic_build`.

    Why: see `symbolic_build`; the private `_maybe_symbolic_build` is where
    `fit` does it, and there is no public hook. Without it the workaround
    cannot replace the failing build.
    """
    model._maybe_symbolic_build = function


# --- TensorFlow and tf2onnx: in tf_hooks, reached through here ---

from renorm_convert._internal.tf_hooks import (  # noqa: E402,F401
    disable_tf_op_determinism, grouped_conv_as_plain_op,
    patch_tf2onnx_for_numpy2, tf2onnx_from_function, tf2onnx_optimizers_fixed,
    tf_op_determinism_enabled)
