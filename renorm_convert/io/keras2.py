"""Keras 2 `.h5` files: their configs rewritten where Keras 3 refuses them,
and functional graphs that call TensorFlow directly.

Keras 2 recorded `x + 3.0`, `tf.nn.relu6(x)` or `x[:, 1:]` in a functional
model as `TFOpLambda` / `SlicingOpLambda` layers that name a TensorFlow API
function; Keras 3 has no such layers and refuses those files. These layers
run the named function (looked up in the `tf` namespace only, so a file can
name no other code) and save like any Keras 3 layer.
"""

import importlib
import json
import os
import re
import sys

import h5py
import keras

from renorm_convert._internal import keras_hooks as internals
from renorm_convert.errors import BackendError

TF_OP_CLASSES = ("TFOpLambda", "SlicingOpLambda")


def _tf_function(name):
    """`tf.<name>` for a dotted name such as `math.multiply`."""
    if keras.backend.backend() != "tensorflow":
        raise BackendError(
            f"this Keras 2 file calls TensorFlow directly ('tf.{name}', a "
            "TFOpLambda layer), which runs only on Keras's TensorFlow "
            "backend: set KERAS_BACKEND=tensorflow (with TensorFlow "
            "installed), or convert it there once and save it as .keras "
            "after replacing those layers.")
    import tensorflow as tf

    target = tf
    for part in name.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ValueError(
                f"'tf.{name}' is not a TensorFlow function here (the file "
                "was saved with another TensorFlow version?)"
            )
    if not callable(target):
        raise ValueError(f"'tf.{name}' is not a function")
    return target


@keras.saving.register_keras_serializable(package="renorm_convert")
class TFOpLambda(keras.layers.Layer):
    """Calls `tf.<function>`; `tensor_kwargs` names keyword arguments that
    were tensors, which arrive after the first input."""

    def __init__(self, function, tensor_kwargs=(), **kwargs):
        super().__init__(**kwargs)
        self.function = function
        self.tensor_kwargs = list(tensor_kwargs)
        self._fn = _tf_function(function)

    def _arguments(self, inputs, kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k != "name"}
        if self.tensor_kwargs:
            inputs = list(inputs)
            given = inputs[len(inputs) - len(self.tensor_kwargs):]
            inputs = inputs[: len(inputs) - len(self.tensor_kwargs)]
            inputs = inputs[0] if len(inputs) == 1 else inputs
            kwargs.update(zip(self.tensor_kwargs, given))
        return inputs, kwargs

    def call(self, inputs, *args, **kwargs):
        inputs, kwargs = self._arguments(inputs, kwargs)
        return self._fn(inputs, *args, **kwargs)

    def get_config(self):
        return {**super().get_config(), "function": self.function,
                "tensor_kwargs": self.tensor_kwargs}


@keras.saving.register_keras_serializable(package="renorm_convert")
class SlicingOpLambda(TFOpLambda):
    """`x[slice_spec]`, the spec as Keras 2 saved it (dicts for slices)."""

    def call(self, inputs, *args, slice_spec=None, **kwargs):
        inputs, kwargs = self._arguments(inputs, kwargs)
        spec = slice_spec if slice_spec is not None else args[0]
        return inputs[tuple(_slice(s) for s in _as_list(spec))]


def _as_list(spec):
    return list(spec) if isinstance(spec, (list, tuple)) else [spec]


def _slice(item):
    if isinstance(item, dict) and set(item) <= {"start", "stop", "step"}:
        return slice(item.get("start"), item.get("stop"), item.get("step"))
    if item == "Ellipsis" or item is Ellipsis:
        return Ellipsis
    return None if item == "None" else item


def _is_tensor_ref(value, layer_names):
    return (isinstance(value, list) and len(value) == 3
            and isinstance(value[0], str) and value[0] in layer_names
            and all(isinstance(v, int) for v in value[1:]))


def _rewrite(config):
    """Moves tensors passed as keyword arguments of TF-op layers (Keras 2's
    `[layer, node, index]` references, which Keras 3 does not resolve) to
    extra inputs of the call."""
    layers = config["config"]["layers"]
    names = {layer["name"] for layer in layers}
    for layer in layers:
        if layer["class_name"] not in TF_OP_CLASSES:
            continue
        tensor_kwargs = []
        nodes = layer.get("inbound_nodes", [])
        # Keras 2 wrote a TF-op call on one tensor as one flat entry,
        # `[layer, node, index, kwargs]`, where other layers have a list of
        # entries.
        nodes[:] = [[n] if n and isinstance(n[0], str) else n for n in nodes]
        for node in nodes:
            if not node or len(node[-1]) != 4:
                continue
            kwargs = dict(node[-1][3])
            refs = {k: v for k, v in kwargs.items()
                    if _is_tensor_ref(v, names)}
            if not refs:
                continue
            for key in refs:
                del kwargs[key]
            node[:] = [entry[:3] for entry in node]
            node += [list(ref) for ref in refs.values()]
            # Keras 3 takes the keyword arguments from the last input.
            node[-1] = node[-1] + [kwargs]
            tensor_kwargs = list(refs)
        layer["config"]["tensor_kwargs"] = tensor_kwargs
    return config


# Keys Keras 2 wrote into layer configs that Keras 3 refuses, with the
# value Keras 2 always gave them: dropped when they hold that value.
_KERAS2_ONLY_KEYS = {
    "DepthwiseConv2D": {"groups": 1},
    "DepthwiseConv1D": {"groups": 1},
}
# Classes of the Keras 2 model-zoo libraries, saved by name, that are a
# Keras 3 layer with the same config (efficientnet's FixedDropout is a
# Dropout whose noise shape takes the input's size where it is None, as
# Keras 3's Dropout does).
_KERAS2_CLASS_ALIASES = {"FixedDropout": "Dropout"}


def _layer_configs(config):
    """Every layer config in a Keras 2 model config, nested models too."""
    inner = config.get("config", {})
    layers = inner.get("layers", []) if isinstance(inner, dict) else []
    for layer in layers:
        yield layer
        if isinstance(layer.get("config"), dict) and "layers" in layer[
                "config"]:
            yield from _layer_configs(layer)


def _fix_keras2_configs(config, custom_objects):
    """Rewrites, in place, what Keras 2 wrote and Keras 3 refuses; returns
    what was changed, for the log."""
    changes = []
    for layer in _layer_configs(config):
        name = layer.get("class_name")
        # Registered classes are saved as "package>Class".
        alias = _KERAS2_CLASS_ALIASES.get(str(name).split(">")[-1])
        if alias and name not in (custom_objects or {}):
            layer["class_name"] = alias
            changes.append(f"{layer['config'].get('name')}: {name} as {alias}")
        for key, value in _KERAS2_ONLY_KEYS.get(layer["class_name"],
                                                {}).items():
            if layer["config"].get(key, value) == value and \
                    key in layer["config"]:
                del layer["config"][key]
                changes.append(f"{layer['config'].get('name')}: {key}")
    return changes


def _model_config(path):
    with h5py.File(path, "r") as f:
        config = f.attrs.get("model_config")
    if config is None:
        return None
    if isinstance(config, bytes):
        config = config.decode("utf-8")
    return json.loads(config)


def load_h5(path, custom_objects=None, safe_mode=True):
    """A Keras 2 `.h5` model file as a Keras 3 model: its TF-op layers
    replaced (see above) and the layer configs Keras 3 refuses rewritten
    (`groups` on depthwise convolutions, efficientnet's FixedDropout), with
    every weight. None when the file holds no model config (weights only):
    the caller lets Keras say so."""
    config = _model_config(path)
    if config is None:
        return None
    objects = dict(custom_objects or {})
    if any(layer.get("class_name") in TF_OP_CLASSES
           for layer in _layer_configs(config)):
        config = _rewrite(config)
        objects = {"TFOpLambda": TFOpLambda,
                   "SlicingOpLambda": SlicingOpLambda, **objects}
    _fix_keras2_configs(config, custom_objects)
    as_code = {layer["config"].get("name"): layer["config"].get("module")
               for layer in _layer_configs(config)
               if layer.get("class_name") == "Lambda"
               and layer["config"].get("function_type") == "lambda"}
    if not safe_mode:
        objects.update(_lambda_functions(config))
    with keras.saving.custom_object_scope(objects):
        model = internals.load_legacy_h5(path, config, custom_objects=objects,
                                         safe_mode=safe_mode)
    _keep_lambda_code(model, as_code)
    return model


def _module_globals(name):
    module = sys.modules.get(name)
    if module is None and name and name != "__main__":
        try:
            module = importlib.import_module(name)
        except Exception:  # not importable here: Keras's own globals
            return None
    return None if module is None else vars(module)


def _lambda_functions(config):
    """The functions of the Lambda layers Keras 2 saved as code, each with
    the globals of the module the config names (see
    `function_from_code`), as custom objects; the configs then refer to
    them by name."""
    functions = {}
    for layer in _layer_configs(config):
        inner = layer.get("config", {})
        code = inner.get("function")
        if layer.get("class_name") != "Lambda" or inner.get(
                "function_type") != "lambda" or not isinstance(code, list):
            continue
        globals_ = _module_globals(inner.get("module"))
        if globals_ is None:
            continue
        key = f"renorm_convert_lambda_{len(functions)}"
        functions[key] = internals.function_from_code(*code[:3], globals_)
        inner["function"] = {"module": "builtins", "class_name": "function",
                             "config": key, "registered_name": "function"}
        inner.pop("function_type", None)
    return functions


# The file name a Keras 2 Lambda's code carries once loaded: the module
# whose globals it runs with (the code's own file name is that of the
# machine that saved it, and means nothing here).
_LAMBDA_FILE = "<Keras 2 Lambda of module {}>"
_LAMBDA_FILE_RE = re.compile(r"^<Keras 2 Lambda of module (.*)>$")


def _keep_lambda_code(model, as_code):
    """Lambda layers whose function Keras 2 saved as code: Keras 3 saves a
    named function by its name only, and a `.keras` file written from this
    model could not find it again ("Could not locate function 'helper'").
    Named "<lambda>", their functions are saved as code, as Keras 2 did
    (loading such a file needs safe mode off, as this one did), and the
    code names the module whose globals it needs (`lambda_globals`)."""
    if not as_code:
        return
    for layer in internals.flatten_layers(model):
        function = getattr(layer, "function", None)
        if isinstance(layer, keras.layers.Lambda) and layer.name in as_code \
                and callable(function) and hasattr(function, "__code__"):
            # The code's own name too: a copy made from the code keeps it.
            module = as_code[layer.name]
            changes = {"co_name": "<lambda>", "co_qualname": "<lambda>"}
            if module:
                changes["co_filename"] = _LAMBDA_FILE.format(module)
            function.__code__ = function.__code__.replace(**changes)
            function.__name__ = function.__qualname__ = "<lambda>"


def lambda_globals(code):
    """The globals a Lambda's code loaded from a `.keras` file runs with:
    those of the module it came from, where that module can be imported
    here (a Keras 2 Lambda's module, kept by `_keep_lambda_code`, or the
    module whose file the code was compiled from, found on `sys.path`);
    None otherwise (Keras's own)."""
    match = _LAMBDA_FILE_RE.match(code.co_filename)
    if match:
        return _module_globals(match.group(1))
    filename = os.path.abspath(code.co_filename)
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) == filename:
            return vars(module)
    name = _module_name_of(filename)
    globals_ = _module_globals(name) if name else None
    if globals_ is not None and globals_.get("__file__") == filename:
        return globals_
    return None


def _module_name_of(filename):
    """The dotted name under which `filename` (a `.py` file) is imported
    from a `sys.path` entry, or None."""
    stem, ext = os.path.splitext(filename)
    if ext != ".py" or not os.path.exists(filename):
        return None
    for entry in sys.path:
        root = os.path.abspath(entry or os.curdir) + os.sep
        if stem.startswith(root):
            parts = stem[len(root):].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts and all(part.isidentifier() for part in parts):
                return ".".join(parts)
    return None
