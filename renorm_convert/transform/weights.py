"""The one way weights move between layers: by name, never by position.

`values_by_name` reads a layer's weights by their short names and
`build_with_values` builds a layer with each named weight created directly
from a value (both from `_internal.variables`, which the layer itself uses
too); `clone_layer` / `clone_prebuilt` make fresh copies of a layer,
and `mirror` / `copy_weights` pair a custom layer's sublayers by the
attribute that holds them and move each layer's own variables by name. Every
refusal is a `RenormConvertError` naming the layer and the variable.

`copying` (convert, revert, fold, recast) moves weights through this
module; it imports nothing of ours but `_internal` and `errors`.
"""

import re

import keras

from renorm_convert._internal import keras_hooks as internals
from renorm_convert._internal.variables import (build_with_values, short_name,
                                                values_by_name)
from renorm_convert.errors import RenormConvertError


def clone_layer(layer, **overrides):
    """A new, unbuilt layer from `layer`'s config (with `overrides`).

    The layer is already in memory, so recreating it runs no code that is
    not already running: Keras's safe mode (which refuses to deserialize a
    Lambda's Python code from files) is lifted for this copy only.
    """
    config = layer.get_config()
    config.update(overrides)
    return internals.from_config_unsafe(type(layer), config)


def clone_prebuilt(layer, **overrides):
    """A clone of a plain (no sublayers) built layer whose weights are
    created with the original's values, by name; None where that does not
    apply (the caller then copies weights after the rebuild)."""
    if not layer.weights or not layer.built or sublayer_items(layer):
        return None
    build_config = layer.get_build_config()
    values = values_by_name(layer.weights)
    if not build_config or len(values) != len(layer.weights):
        return None
    new = clone_layer(layer, **overrides)
    used = build_with_values(new, None, values,
                             build=lambda: new.build_from_config(build_config))
    if sorted(used) != sorted(values) or len(new.weights) != len(values):
        return None
    return new


def build_like(new, old, values):
    """Builds `new` as `old` was built, each weight created with the value
    of its name in `values`; False (nothing done) when `old` recorded no
    build (the caller builds `new`, then `assign_by_name` follows)."""
    build_config = old.get_build_config()
    if not build_config:
        return False
    used = build_with_values(new, None, values,
                             build=lambda: new.build_from_config(build_config))
    _check_names(new, values, used, old)
    return True


def assign_by_name(new, values, old):
    """Assigns each weight of the built `new` the value of its name."""
    names = [short_name(v) for v in new.weights]
    _check_names(new, values, [n for n in names if n in values], old)
    for variable, name in zip(new.weights, names):
        variable.assign(values[name])


def _check_names(new, values, used, old):
    names = [short_name(v) for v in new.weights]
    missing = [n for n in names if n not in used]
    unused = [n for n in values if n not in used]
    if missing or unused:
        what = (f"a weight '{missing[0]}' with no value" if missing
                else f"no weight '{unused[0]}'")
        raise RenormConvertError(
            f"The copy of layer '{old.name}' ({type(old).__name__}) has "
            f"{what} (weights move by name; it has {sorted(names)}, the "
            f"values are {sorted(values)}). Fix get_config() of that class.")


def sublayer_items(layer):
    """(attribute, index or None, sublayer) for the layers `layer` holds in
    its attributes and in lists / tuples / dicts of them."""
    items = []
    for attr, value in internals.layer_attributes(layer).items():
        if internals.is_tracking_attribute(attr):
            continue
        if isinstance(value, keras.layers.Layer):
            items.append((attr, None, value))
        elif isinstance(value, (list, tuple)):
            items += [(attr, i, v) for i, v in enumerate(value)
                      if isinstance(v, keras.layers.Layer)]
        elif isinstance(value, dict):
            items += [(attr, k, v) for k, v in value.items()
                      if isinstance(v, keras.layers.Layer)]
    return items


def sublayer_paths(layer, prefix=(), descend=None):
    """([(attribute, index or None), ...], sublayer) for every sublayer of a
    custom layer, at any depth; `descend(sub)` False stops the search below
    `sub` (graph models, whose layers are in their graph)."""
    found = []
    for attr, index, sub in sublayer_items(layer):
        path = prefix + ((attr, index),)
        found.append((list(map(list, path)), sub))
        if descend is None or descend(sub):
            found += sublayer_paths(sub, path, descend)
    return found


# Keras names an `add_weight` without `name=` "variable", "variable_1", ...
# from a global counter, so the same weight has another name in every copy.
_UNNAMED = re.compile(r"^variable(_\d+)?$")


def _variables_by_name(layer, path):
    """({name: variable} of the variables `layer` created itself with a
    name, [the unnamed ones, in creation order])."""
    found, unnamed = {}, []
    for variable in internals.own_variables(layer):
        if _UNNAMED.match(variable.name):
            unnamed.append(variable)
            continue
        if variable.name in found:
            raise RenormConvertError(
                f"Layer '{path}' ({type(layer).__name__}) has two variables "
                f"named '{variable.name}', so they cannot be moved by name. "
                "Give each `add_weight` of that class its own `name=`.")
        found[variable.name] = variable
    return found, unnamed


def assign_own_variables(new, old, path, moved=None):
    """Assigns each variable `old` created itself to the one of `new` with
    the same name; refuses, naming it, one that has no counterpart.
    Variables created without a name (Keras names them anew in every copy)
    are paired in creation order, when both have as many of the same
    shapes."""
    new_vars, new_unnamed = _variables_by_name(new, path)
    old_vars, old_unnamed = _variables_by_name(old, path)
    for names, other, where in ((old_vars, new_vars, "its copy"),
                                (new_vars, old_vars, "the original")):
        for name in names:
            if name not in other:
                raise RenormConvertError(
                    f"Layer '{path}' ({type(old).__name__}): the variable "
                    f"'{name}' has no counterpart in {where} (which has "
                    f"{sorted(other) or 'none'}); weights move by name. Fix "
                    "get_config() of that class.")
    if [tuple(v.shape) for v in old_unnamed] != [
            tuple(v.shape) for v in new_unnamed]:
        raise RenormConvertError(
            f"Layer '{path}' ({type(old).__name__}) has unnamed variables of "
            f"shapes {[tuple(v.shape) for v in old_unnamed]}, its copy "
            f"{[tuple(v.shape) for v in new_unnamed]}: they cannot be paired. "
            "Give every `add_weight` of that class a `name=`, and fix its "
            "get_config().")
    pairs = [(v, new_vars[name]) for name, v in old_vars.items()]
    for variable, target in pairs + list(zip(old_unnamed, new_unnamed)):
        target.assign(variable)
        if moved is not None:
            moved.add(id(variable))


def mirror(new, old, replace, path, moved):
    """Makes `new` (a fresh, built copy of the custom layer `old` made from
    its config) hold `old`'s weights, sublayer by sublayer (paired by the
    attribute that holds them), each layer's own variables by name.

    `replace(old_sub, new_sub, sub_path)` returns a built layer (holding its
    weights) to put in place of `new_sub`, or None to mirror that sublayer
    in turn. The ids of the variables moved are added to `moved`.
    """
    new_items = {(a, i): v for a, i, v in sublayer_items(new)}
    for attr, index, old_sub in sublayer_items(old):
        sub_path = f"{path}/{old_sub.name}"
        new_sub = new_items.get((attr, index))
        if new_sub is None:
            raise RenormConvertError(
                f"Layer '{path}' ({type(old).__name__}) recreated from its "
                f"config has no sublayer at `{attr}`"
                f"{'' if index is None else f'[{index!r}]'}, where the "
                f"original has '{old_sub.name}'. Give the class a get_config()"
                " that recreates its sublayers.")
        replacement = replace(old_sub, new_sub, sub_path)
        if replacement is None:
            mirror(new_sub, old_sub, replace, sub_path, moved)
            continue
        # The replacement was made from `old_sub`, with its weights.
        moved.update(id(v) for v in old_sub.weights)
        put(new, attr, index, new_sub, replacement, sub_path)
    assign_own_variables(new, old, path, moved)


def copy_weights(old, new, replace):
    """Moves the weights of layer `old` into `new`, a built copy of it made
    from its config, through `mirror` (`replace` as there): sublayers paired
    by the attribute that holds them, each layer's own variables by name
    (those created without a name, in creation order), never by position.

    Raises:
        RenormConvertError: naming the variable or sublayer that has no
            counterpart in the copy (its class's get_config() does not
            describe it).
    """
    moved = set()
    mirror(new, old, replace, old.name, moved)
    missed = [v.path for v in old.weights if id(v) not in moved]
    if missed:
        raise RenormConvertError(
            f"Layer '{old.name}' ({type(old).__name__}) holds the variable "
            f"'{missed[0]}' in a sublayer that is not kept in an attribute, "
            "or in a list or dict of them, so its copy cannot be told which "
            "of its own sublayers gets it. Keep sublayers in attributes, "
            "lists or dicts.")


def put(layer, attr, index, old, new, path):
    """Replaces sublayer `old` of a (possibly built) layer by `new`."""
    container = getattr(layer, attr)
    if index is not None and isinstance(container, tuple):
        raise RenormConvertError(
            f"Layer '{path.rsplit('/', 1)[0]}' keeps '{old.name}' in the "
            "tuple "
            f"attribute `{attr}`, which cannot be changed in place; use a "
            "list.")
    internals.replace_sublayer(layer, attr, index, old, new)
