"""Every private Keras / TensorFlow / tf2onnx hook the package uses is still
there (renorm_convert/_internal/keras_hooks.py); each test id names one hook.

After installing a newer Keras, `pytest tests/test_keras_hooks.py
tests/test_layers.py` says which hook moved. The TensorFlow and tf2onnx
hooks are checked where TensorFlow is installed.
"""

import importlib
import inspect
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import renorm_convert as rc
from renorm_convert._internal import keras_hooks as internals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Block(keras.layers.Layer):
    """A custom layer holding a sublayer in an attribute and a weight of its
    own."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(3, name="inner")

    def build(self, input_shape):
        self.inner.build(input_shape)
        self.scale = self.add_weight(name="scale", shape=(3,),
                                     initializer="ones")

    def call(self, x):
        return self.inner(x) * self.scale


@pytest.fixture(scope="module")
def built():
    """A built functional model (with a custom block and a shared layer), a
    built Sequential model, and the block."""
    inputs = keras.Input((4,), name="x")
    shared = keras.layers.Dense(4, name="shared")
    h = shared(shared(inputs))
    block = _Block(name="block")
    outputs = {"out": block(h)}
    model = keras.Model(inputs, outputs)
    sequential = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    return {"model": model, "sequential": sequential, "block": block,
            "shared": shared}


def _module_attr(module, attr):
    def check(_):
        try:
            found = importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"module {module} is gone ({e})")
        assert hasattr(found, attr), f"{module}.{attr} is gone"
    return check


def _check_lambda_calls_func_load(_):
    source = inspect.getsource(
        importlib.import_module("keras.src.layers.core.lambda_layer"))
    assert "python_utils.func_load(" in source, (
        "Lambda no longer calls python_utils.func_load through its module")


def _class_attr(owner, attr):
    def check(_):
        cls = owner()
        assert hasattr(cls, attr), (
            f"{cls.__module__}.{cls.__qualname__}.{attr} is gone")
    return check


def _functional_class():
    from keras.src.models.functional import Functional
    return Functional


def _transpose_optimizer():
    from tf2onnx.optimizer.transpose_optimizer import TransposeOptimizer
    return TransposeOptimizer


def _tf2onnx_node():
    from tf2onnx.graph import Node
    return Node


def _instance(get, attr):
    def check(objects):
        obj = get(objects)
        assert hasattr(obj, attr), (
            f"{type(obj).__name__} instances have no `{attr}` any more")
    return check


def _node(objects):
    model = objects["model"]
    return next(n for nodes in internals.nodes_deepest_first(model)
                for n in nodes if n.operation is objects["shared"])


def _check_keras_history(objects):
    history = objects["model"].outputs[0]._keras_history
    assert {"operation", "node_index", "tensor_index"} <= set(
        history._fields), "KerasTensor._keras_history lost its fields"
    operation, node = internals.producing_node(objects["model"].outputs[0])
    assert operation is objects["block"] and node.operation is operation


def _check_node_attributes(objects):
    node = _node(objects)
    for attr in ("operation", "is_input", "input_tensors", "outputs",
                 "arguments"):
        assert hasattr(node, attr), f"keras Node has no `{attr}` any more"
    args, _ = internals.call_arguments(
        node, {id(t): "value" for t in node.input_tensors})
    assert args[0] == "value"


def _check_tracker(objects):
    tracker = objects["block"]._tracker
    for method in ("is_in_store", "replace_tracked_value"):
        assert hasattr(tracker, method), f"Keras Tracker.{method} is gone"
    assert tracker.is_in_store("layers", objects["block"].inner)


def _check_tracking_attributes(objects):
    """Every private attribute of a block that holds layers is Keras's
    bookkeeping, recognized as such: only `inner` is the block's own."""
    block = objects["block"]
    holding = [name for name, value in internals.layer_attributes(
                   block).items()
               if isinstance(value, keras.layers.Layer) or (
                   isinstance(value, (list, tuple, dict)) and any(
                       isinstance(v, keras.layers.Layer) for v in (
                           value.values() if isinstance(value, dict)
                           else value)))]
    own = [name for name in holding
           if not internals.is_tracking_attribute(name)]
    assert own == ["inner"], (
        f"unrecognized attributes holding sublayers: {own}; Keras renamed "
        "its tracking attributes (keras_hooks.is_tracking_attribute)")


def _check_own_variables(objects):
    names = [v.name for v in internals.own_variables(objects["block"])]
    assert names == ["scale"]


def _check_dependency_names(objects):
    names = getattr(objects["block"], "_self_unconditional_dependency_names",
                    None)
    assert isinstance(names, dict) and names.get("inner") is (
        objects["block"].inner), (
        "TensorFlow's _self_unconditional_dependency_names is gone")


def _check_tf2onnx_node_op(_):
    from tf2onnx.graph import Node
    assert "self._op" in inspect.getsource(Node.__init__), (
        "tf2onnx's Node no longer keeps its NodeProto in `_op`")


def _check_catch_errors(_):
    from tf2onnx import constants, convert
    assert constants.ENV_TF2ONNX_CATCH_ERRORS == "TF2ONNX_CATCH_ERRORS"
    assert "constants.ENV_TF2ONNX_CATCH_ERRORS in os.environ" in (
        inspect.getsource(convert)), (
        "tf2onnx's conversion no longer reads TF2ONNX_CATCH_ERRORS")


def _check_call_signature(objects):
    block = objects["block"]
    for attr in ("_call_signature", "call_signature_parameters",
                 "_call_has_training_arg", "_call_has_mask_arg",
                 "_call_context_args", "_call_has_context_arg"):
        assert hasattr(block, attr), f"Layer.{attr} is gone"


def _check_live_copy(objects):
    from keras.src.utils import tracking

    tracker = objects["block"]._tracker
    assert isinstance(tracker, tracking.Tracker)
    assert {"config", "stored_ids"} <= set(vars(tracker)), (
        "Keras's Tracker no longer keeps `config` / `stored_ids`")
    for cls in ("TrackedList", "TrackedDict", "TrackedSet"):
        assert hasattr(tracking, cls), f"keras tracking.{cls} is gone"


def _check_jax_state(objects):
    import jax  # noqa: F401  (the JAX trainer's state attributes)
    from keras.src.backend.jax.trainer import JAXTrainer

    source = inspect.getsource(JAXTrainer)
    for name in ("_jax_state", "_jax_state_synced"):
        assert name in source, f"JAXTrainer no longer has `{name}`"
    assert hasattr(objects["block"].scale, "_value")


TF = pytest.mark.tensorflow
JAX = pytest.mark.skipif(keras.backend.backend() != "jax",
                         reason="the JAX trainer's hooks")
HOOKS = [
    ("Layer._flatten_layers",
     _class_attr(lambda: keras.layers.Layer, "_flatten_layers")),
    ("Layer._trainable_variables",
     _instance(lambda o: o["block"], "_trainable_variables")),
    ("Layer._non_trainable_variables",
     _instance(lambda o: o["block"], "_non_trainable_variables")),
    ("Layer call signature", _check_call_signature),
    ("own_variables", _check_own_variables),
    ("Layer._tracker", _check_tracker),
    ("live_copy hooks", _check_live_copy),
    ("saving.keras_saveable.KerasSaveable",
     _module_attr("keras.src.saving.keras_saveable", "KerasSaveable")),
    ("is_tracking_attribute", _check_tracking_attributes),
    ("serialization_lib.SafeModeScope",
     _module_attr("keras.src.saving.serialization_lib", "SafeModeScope")),
    ("utils.python_utils.func_load",
     _module_attr("keras.src.utils.python_utils", "func_load")),
    # lambda_code_globals replaces the module's attribute: Lambda must call
    # it through its module for that to take effect.
    ("layers.core.lambda_layer calls python_utils.func_load",
     _check_lambda_calls_func_load),
    ("legacy.saving_utils.model_from_config",
     _module_attr("keras.src.legacy.saving.saving_utils",
                  "model_from_config")),
    ("legacy_h5_format.load_weights_from_hdf5_group",
     _module_attr("keras.src.legacy.saving.legacy_h5_format",
                  "load_weights_from_hdf5_group")),
    ("legacy_h5_format.safe_get_h5_group",
     _module_attr("keras.src.legacy.saving.legacy_h5_format",
                  "safe_get_h5_group")),
    ("saving_options.keras_option_scope",
     _module_attr("keras.src.legacy.saving.saving_options",
                  "keras_option_scope")),
    ("models.functional.Functional",
     _module_attr("keras.src.models.functional", "Functional")),
    ("Functional._nodes_by_depth",
     _instance(lambda o: o["model"], "_nodes_by_depth")),
    ("Functional._outputs_struct",
     _instance(lambda o: o["model"], "_outputs_struct")),
    ("Sequential._functional",
     _instance(lambda o: o["sequential"], "_functional")),
    ("Node.attributes", _check_node_attributes),
    ("KerasTensor._keras_history", _check_keras_history),
    ("Operation._inbound_nodes",
     _instance(lambda o: o["shared"], "_inbound_nodes")),
    *[(f"BatchNormalization.{name}",
       _class_attr(lambda: keras.layers.BatchNormalization, name))
      for name in internals.BATCHNORM_HOOKS],
    ("Trainer._symbolic_build", _class_attr(lambda: keras.Model,
                                            "_symbolic_build"), TF),
    ("Trainer._maybe_symbolic_build",
     _class_attr(lambda: keras.Model, "_maybe_symbolic_build"), TF),
    ("JAXTrainer._jax_state", _check_jax_state, JAX),
    ("Layer._self_unconditional_dependency_names", _check_dependency_names,
     TF),
    ("tf.config.op determinism",
     _module_attr("tensorflow.python.framework.config",
                  "is_op_determinism_enabled"), TF),
    ("export.tf2onnx_lib.patch_tf2onnx",
     _module_attr("keras.src.export.tf2onnx_lib", "patch_tf2onnx"), TF),
    ("backend.tensorflow.nn.conv",
     _module_attr("keras.src.backend.tensorflow.nn", "conv"), TF),
    ("backend.tensorflow.nn._convert_data_format",
     _module_attr("keras.src.backend.tensorflow.nn", "_convert_data_format"),
     TF),
    ("tf2onnx.TransposeOptimizer._add_handler",
     _class_attr(_transpose_optimizer, "_add_handler"), TF),
    ("tf2onnx.TransposeOptimizer._handle_node_having_branches",
     _class_attr(_transpose_optimizer, "_handle_node_having_branches"), TF),
    ("tf2onnx.Node.update_proto", _class_attr(_tf2onnx_node, "update_proto"),
     TF),
    ("tf2onnx.Node._op", _check_tf2onnx_node_op, TF),
    ("tf2onnx.TF2ONNX_CATCH_ERRORS", _check_catch_errors, TF),
    ("tf2onnx.convert.from_function",
     _module_attr("tf2onnx.convert", "from_function"), TF),
]


@pytest.mark.parametrize("check", [
    pytest.param(hook[1], id=hook[0], marks=hook[2:]) for hook in HOOKS])
def test_hook_exists(check, built):
    check(built)


def test_renorm_override_runs_inside_keras_call(monkeypatch):
    """Keras's BatchNormalization.call still goes through the overridden
    `_renorm_correction_and_moments` (else r_max / d_max would silently
    stop clipping), and through `_compose_transforms` /
    `_update_renorm_statistics`."""
    calls = []
    for name in internals.BATCHNORM_HOOKS:
        original = getattr(keras.layers.BatchNormalization, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(keras.layers.BatchNormalization, name, spy)
    layer = rc.BatchRenormalization(r_max=1.0, d_max=0.0)
    layer(np.ones((4, 3), "float32"), training=True)
    assert set(calls) == set(internals.BATCHNORM_HOOKS), calls


def test_sublayer_replacement_is_seen_by_keras(built):
    """replace_sublayer: the block's attribute, Keras's layer list (and so
    its weights) and TensorFlow's dependency names all see the new layer."""
    block = _Block(name="fresh")
    block.build((None, 4))
    new = keras.layers.Dense(3, name="new")
    new.build((None, 4))
    internals.replace_sublayer(block, "inner", None, block.inner, new)
    assert block.inner is new
    assert any(v is new.kernel for v in block.weights)
    if keras.backend.backend() == "tensorflow":
        assert block._self_unconditional_dependency_names["inner"] is new


def test_live_copy_is_independent_and_equal(built):
    """live_copy: same class, same values, new variables, no graph nodes."""
    block = built["block"]
    copy = internals.live_copy(block)
    assert type(copy) is type(block) and copy.inner is not block.inner
    assert not copy._inbound_nodes
    for new, old in zip(copy.weights, block.weights, strict=True):
        assert new is not old and new.path == old.path
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(new),
                                      keras.ops.convert_to_numpy(old))
    copy.scale.assign(np.full((3,), 7.0, "float32"))
    assert not np.any(keras.ops.convert_to_numpy(block.scale) == 7.0)
    # Keras's tracker knows the copy's sublayers, so swaps work on it.
    assert copy._tracker.is_in_store("layers", copy.inner)
    x = np.ones((2, 4), "float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(copy(x)),
        keras.ops.convert_to_numpy(block(x)) * 7.0, rtol=1e-6)


def test_call_signature_is_adopted():
    """A wrapper binds keyword arguments as the wrapped layer does."""

    class Joiner(keras.layers.Layer):
        def call(self, x, parts=None, scale=1.0):
            return (x + sum(parts)) * scale

    class Wrapper(keras.layers.Layer):
        def __init__(self, layer, **kwargs):
            super().__init__(**kwargs)
            self.layer = layer
            internals.adopt_call_signature(self, layer)

        def call(self, *args, **kwargs):
            return self.layer(*args, **kwargs)

    inputs = keras.Input((3,))
    out = Wrapper(Joiner())(inputs, parts=[inputs, inputs], scale=0.5)
    model = keras.Model(inputs, out)
    x = np.ones((1, 3), "float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)),
                               1.5 * x)


def test_module_imports_nothing_heavy():
    """layers, folding and conversion import `_internal.keras_hooks`; it must
    not pull TensorFlow, Keras, tf2onnx or onnxruntime in by itself."""
    path = os.path.join(ROOT, "renorm_convert", "_internal", "keras_hooks.py")
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ki', {path!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'tf2onnx', "
        "'onnxruntime') if m in sys.modules]\n"
        "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"


# `self._renorm_correction_and_moments` is our own override of Keras's hook.
_NOT_YET = set()
_PRIVATE = re.compile(
    r"keras\.src|tensorflow\.python|import tf2onnx|from tf2onnx|"
    r"(?<!self)\._(flatten_layers|keras_history|inbound_nodes|nodes_by_depth|"
    r"outputs_struct|functional|tracker|trainable_variables|"
    r"non_trainable_variables|symbolic_build|maybe_symbolic_build|"
    r"renorm_correction_and_moments|update_renorm_statistics|"
    r"compose_transforms|call_signature|jax_state|tracker)\b|SafeModeScope|func_load")


def test_private_api_only_behind_one_door():
    """No module outside renorm_convert/_internal/ touches the private API
    listed here."""
    package = os.path.join(ROOT, "renorm_convert")
    found = []
    names = sorted(os.path.relpath(os.path.join(d, f), package)
                   for d, _, files in os.walk(package) for f in files)
    assert "cli/__init__.py" in names
    for name in names:
        if not name.endswith(".py") or name.startswith("_internal/") or (
                name in _NOT_YET):
            continue
        for number, line in enumerate(open(os.path.join(package, name)), 1):
            code = line.split("#", 1)[0]
            if _PRIVATE.search(code) and not code.lstrip().startswith(
                    ("def ", '"', "'")):
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
