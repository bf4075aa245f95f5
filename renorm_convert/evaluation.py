"""What a classifier's outputs are (probabilities or logits) and how often
it is right: shared by fine-tuning (which loss), export (which logits to
verify) and every accuracy the tool reports."""

import keras
import numpy as np

from renorm_convert._internal import keras_hooks as internals
from renorm_convert.data.batches import evaluation_batches
from renorm_convert.data.labels import class_ids, is_dense
from renorm_convert.data.sources import Split
from renorm_convert.errors import RenormConvertError

_PROBABILITIES = ("softmax", "sigmoid")


def final_activation(model):
    """("softmax" | "sigmoid", layer, its input tensor) when the model's one
    output comes from a final softmax / sigmoid (a Softmax or Activation
    layer, or a Dense / Conv with that activation), else None."""
    if len(model.outputs) != 1:
        return None
    layer, node = internals.producing_node(model.outputs[0])
    if len(node.input_tensors) != 1 or not isinstance(layer,
                                                      keras.layers.Layer):
        return None
    if isinstance(layer, keras.layers.Softmax):
        return "softmax", layer, node.input_tensors[0]
    name = getattr(getattr(layer, "activation", None), "__name__", "")
    if name in _PROBABILITIES:
        return name, layer, node.input_tensors[0]
    return None


def check_labels_fit(model, split):
    """Refuses labels (of a `data.Split`, training and validation) that the
    model's one output of class scores cannot hold, saying to give it a new
    head."""
    if len(model.outputs) != 1:
        raise RenormConvertError(
            f"model '{model.name}' has {len(model.outputs)} outputs; labels "
            "fit a classifier's one output of class scores.")
    outputs = int(model.outputs[0].shape[-1])
    if is_dense(split.y_train):
        classes = int(np.shape(split.y_train)[1])
        if classes != outputs:
            raise RenormConvertError(
                f"the labels are rows of {classes} classes but the model has "
                f"{outputs} outputs; give it a new head first ({{fix}}).",
                fix=("head", classes, f"rc.replace_head(model, {classes})"))
        return
    top = int(max(class_ids(split.y_train).max(),
                  class_ids(split.y_val).max() if len(split.y_val) else 0))
    if top >= outputs:
        classes = max(split.num_classes, top + 1)
        raise RenormConvertError(
            f"labels go up to {top} but the model has {outputs} outputs; "
            "give it a new head first ({fix}).",
            fix=("head", classes, f"rc.replace_head(model, {classes})"))


def outputs_probabilities(model):
    """Whether the model's output is a softmax (then the loss takes
    probabilities, not logits)."""
    found = final_activation(model)
    return found is not None and found[0] == "softmax"


def to_numpy(value):
    """A model's output (any backend, maybe requiring grad) as NumPy."""
    if isinstance(value, (np.ndarray, np.generic)):
        return np.asarray(value)  # predict_on_batch's (torch: no detach)
    return np.asarray(keras.ops.convert_to_numpy(
        keras.ops.stop_gradient(value)))


def accuracy(model, data, *, training=False, batch_size=256, count=None):
    """Top-1 accuracy of `model` on `data`: the validation part of a
    `data.Split` (its first `count` examples, images prepared as for
    training, in batches of `batch_size`), or (inputs, labels) batches.
    Labels are class ids or one-hot / soft rows; `training` as in a Keras
    call (True: each batch normalized with its own statistics)."""
    if isinstance(data, Split):
        data = evaluation_batches(data, model, batch_size, count)
    correct = total = 0
    for x, y in data:
        # predict_on_batch runs Keras's compiled predict step (JAX would
        # otherwise run op by op); training mode needs a plain call.
        pred = to_numpy(model(x, training=True) if training
                        else model.predict_on_batch(x))
        correct += int((pred.argmax(-1) == class_ids(y)).sum())
        total += len(pred)
    return correct / max(total, 1)


def logits(model, xs):
    """The model's logits before its final softmax / sigmoid (float64), or
    None for a model with several outputs or another ending."""
    found = final_activation(model)
    if found is None:
        return None
    _, layer, features = found
    single = len(model.inputs) == 1
    values = keras.Model(model.inputs[0] if single else model.inputs,
                         features)(xs[0] if single else xs, training=False)
    values = to_numpy(values).astype("float64")
    if not isinstance(layer, (keras.layers.Softmax, keras.layers.Activation)):
        # A Dense (or Conv) with the activation built in: apply its linear
        # part here.
        if not isinstance(layer, keras.layers.Dense):
            return None
        values = values @ keras.ops.convert_to_numpy(
            layer.kernel).astype("float64")
        if layer.use_bias:
            values = values + keras.ops.convert_to_numpy(
                layer.bias).astype("float64")
    return values
