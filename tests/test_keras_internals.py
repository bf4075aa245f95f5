"""Every private Keras / TensorFlow / tf2onnx hook the package uses is still
there (renorm_convert/_keras_internals.py); each test id names one hook.

After installing a newer Keras, `pytest tests/test_keras_internals.py
tests/test_layers.py` says which hook moved.
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
import tensorflow as tf

import renorm_convert as rc
from renorm_convert import _keras_internals as internals

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
    holding = [name for name, value in vars(block).items()
               if isinstance(value, keras.layers.Layer) or (
                   isinstance(value, (list, tuple, dict)) and any(
                       isinstance(v, keras.layers.Layer) for v in (
                           value.values() if isinstance(value, dict)
                           else value)))]
    own = [name for name in holding
           if not internals.is_tracking_attribute(name)]
    assert own == ["inner"], (
        f"unrecognized attributes holding sublayers: {own}; Keras renamed "
        "its tracking attributes (_keras_internals.is_tracking_attribute)")


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


HOOKS = [
    ("tf.control_flow_util.GraphOrParentsInXlaContext",
     _module_attr("tensorflow.python.ops.control_flow_util",
                  "GraphOrParentsInXlaContext")),
    ("tf.ops.get_default_graph",
     _module_attr("tensorflow.python.framework.ops", "get_default_graph")),
    ("Layer._flatten_layers",
     _class_attr(lambda: keras.layers.Layer, "_flatten_layers")),
    ("Layer._trainable_variables",
     _instance(lambda o: o["block"], "_trainable_variables")),
    ("Layer._non_trainable_variables",
     _instance(lambda o: o["block"], "_non_trainable_variables")),
    ("own_variables", _check_own_variables),
    ("Layer._tracker", _check_tracker),
    ("is_tracking_attribute", _check_tracking_attributes),
    ("Layer._self_unconditional_dependency_names", _check_dependency_names),
    ("serialization_lib.SafeModeScope",
     _module_attr("keras.src.saving.serialization_lib", "SafeModeScope")),
    ("legacy.saving_utils.model_from_config",
     _module_attr("keras.src.legacy.saving.saving_utils",
                  "model_from_config")),
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
                                            "_symbolic_build")),
    ("Trainer._maybe_symbolic_build",
     _class_attr(lambda: keras.Model, "_maybe_symbolic_build")),
    ("export.tf2onnx_lib.patch_tf2onnx",
     _module_attr("keras.src.export.tf2onnx_lib", "patch_tf2onnx")),
    ("backend.tensorflow.nn.conv",
     _module_attr("keras.src.backend.tensorflow.nn", "conv")),
    ("backend.tensorflow.nn._convert_data_format",
     _module_attr("keras.src.backend.tensorflow.nn", "_convert_data_format")),
    ("tf2onnx.TransposeOptimizer._add_handler",
     _class_attr(_transpose_optimizer, "_add_handler")),
    ("tf2onnx.TransposeOptimizer._handle_node_having_branches",
     _class_attr(_transpose_optimizer, "_handle_node_having_branches")),
    ("tf2onnx.Node.update_proto", _class_attr(_tf2onnx_node, "update_proto")),
    ("tf2onnx.Node._op", _check_tf2onnx_node_op),
    ("tf2onnx.TF2ONNX_CATCH_ERRORS", _check_catch_errors),
    ("tf2onnx.convert.from_function",
     _module_attr("tf2onnx.convert", "from_function")),
]


@pytest.mark.parametrize("check", [pytest.param(c, id=i) for i, c in HOOKS])
def test_hook_exists(check, built):
    check(built)


def test_in_xla_compilation_answers():
    """in_xla_compilation tells XLA traces from others."""
    seen = []
    for jit in (False, True):
        tf.function(lambda: seen.append(internals.in_xla_compilation()),
                    jit_compile=jit)()
    assert seen == [False, True]
    assert not internals.in_xla_compilation()


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
    assert block._self_unconditional_dependency_names["inner"] is new


def test_module_imports_nothing_heavy():
    """layers, fold and convert may import `_keras_internals`; it must not
    pull TensorFlow, Keras, tf2onnx or onnxruntime in by itself."""
    path = os.path.join(ROOT, "renorm_convert", "_keras_internals.py")
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
    r"compose_transforms)\b|SafeModeScope")


def test_private_api_only_behind_one_door():
    """No module but _keras_internals touches the private API listed here."""
    package = os.path.join(ROOT, "renorm_convert")
    found = []
    for name in sorted(os.listdir(package)):
        if not name.endswith(".py") or name == "_keras_internals.py" or (
                name in _NOT_YET):
            continue
        for number, line in enumerate(open(os.path.join(package, name)), 1):
            code = line.split("#", 1)[0]
            if _PRIVATE.search(code) and not code.lstrip().startswith(
                    ("def ", '"', "'")):
                found.append(f"{name}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
