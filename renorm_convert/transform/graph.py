"""Any Keras model, nested models expanded, as a networkx graph of call sites.

A node is one call of one layer (a layer shared by several calls appears once
per call, with the same `layer` object and `layer_id`); an edge is a tensor
from the call that produced it to the call that consumes it, with its position
among the consumer's inputs. Nested Functional and Sequential models are
expanded in place: their layers' paths are prefixed with the submodel names
(`inner/bn_3`), and the edges run straight from the outer producer to the inner
consumer.
"""

import keras
import networkx as nx
from keras import tree

from renorm_convert._internal import keras_hooks as internals
from renorm_convert.errors import RenormConvertError


def iter_layers(model):
    """Every layer of `model` at any depth (inside nested models and custom
    layers too), each once, parents before their sublayers; not `model`."""
    return iter(internals.flatten_layers(model))




def _functional_of(model):
    if isinstance(model, keras.Sequential):
        functional = internals.sequential_functional(model)
        if functional is None:
            raise RenormConvertError(
                f"Sequential model '{model.name}' has no input shape yet, so "
                "its graph is unknown. Build it first, e.g. "
                "`model.build((None, ...))` or start it with `keras.Input`."
            )
        return functional
    if internals.is_functional(model):
        return model
    return None


def is_graph_model(layer):
    """True for the Functional and Sequential models a graph can expand."""
    return _functional_of_safe(layer) is not None


def _functional_of_safe(layer):
    try:
        return _functional_of(layer)
    except RenormConvertError:
        return None


def model_graph(model):
    """The model as a `networkx.MultiDiGraph` of layer call sites.

    Node attributes: `layer` (the layer object), `layer_id` (`id(layer)`, the
    same for every call of a shared layer), `class_name`, `name`, `path`
    (submodel names joined by `/`, e.g. `inner/bn_3`), `call` (0 for the first
    call of that layer in the walk, 1 for the second, ...), `kind` (`"input"`
    for a model input, else `"layer"`), `inputs` (the producing node ids in
    input order), and for the top model's inputs and outputs `input_index` /
    `output_index`. Edge attributes: `input_index` (position among the
    consumer's inputs), `output_index` (position among the producer's
    outputs), `shape`.

    Args:
        model: A Functional or built Sequential Keras model.

    Returns:
        A `networkx.MultiDiGraph`; `graph.graph["outputs"]` lists the
        (node, output_index) pairs of the model outputs, in order.

    Raises:
        RenormConvertError: for a subclassed model (no graph to walk) or an
            unbuilt Sequential model.
    """
    functional = _functional_of(model)
    if functional is None:
        raise RenormConvertError(
            f"Model '{model.name}' is a subclassed "
            f"{type(model).__name__}: its layers are joined by Python code, "
            "not a graph. Only Functional and Sequential models (which may "
            "contain subclassed layers) can be walked."
        )
    graph = nx.MultiDiGraph(name=model.name)
    sources = {}
    for i, tensor in enumerate(functional.inputs):
        layer = internals.producing_operation(tensor)
        node_id = f"input:{layer.name}"
        graph.add_node(node_id, layer=layer, layer_id=id(layer),
                       class_name=type(layer).__name__, name=layer.name,
                       path=layer.name, call=0, kind="input", inputs=[],
                       input_index=i)
        sources[id(tensor)] = (node_id, 0)

    def visit(site, args, kwargs):
        inputs = [site.sources[id(t)] for t in site.node.input_tensors]
        graph.add_node(site.node_id, layer=site.layer, layer_id=id(site.layer),
                       class_name=type(site.layer).__name__,
                       name=site.layer.name, path=site.path, call=site.call,
                       kind="layer", inputs=[src for src, _ in inputs])
        for index, ((src, out_index), tensor) in enumerate(
            zip(inputs, site.node.input_tensors)
        ):
            graph.add_edge(src, site.node_id, input_index=index,
                           output_index=out_index, shape=tuple(tensor.shape))
        return [(site.node_id, i) for i in range(len(site.node.outputs))]

    outputs = walk_calls(functional, sources, visit)
    graph.graph["outputs"] = outputs
    for index, (node_id, _) in enumerate(outputs):
        graph.nodes[node_id].setdefault("output_index", index)
    return graph


class CallSite:
    """One call of a leaf layer met while walking a model."""

    __slots__ = ("layer", "node", "path", "call", "node_id", "sources")

    def __init__(self, layer, node, path, call, sources):
        self.layer = layer
        self.node = node
        self.path = path
        self.call = call
        self.node_id = path if call == 0 else f"{path}#{call}"
        self.sources = sources


def walk_calls(model, sources, visit):
    """Walks the leaf-layer calls of a Functional / Sequential model in
    execution order, nested models expanded; returns the values of its
    outputs.

    `sources` maps id(KerasTensor) of the model's inputs to values of any
    kind; `visit(site, args, kwargs)` receives a `CallSite` and the call's
    arguments with every KerasTensor replaced by its value, and returns one
    value per output of the call. `model_graph` walks with node ids as
    values, `rebuild` with new tensors.
    """
    functional = _functional_of(model)
    calls = {}
    return _walk(functional, "", sources, calls, visit)


def _walk(functional, prefix, sources, calls, visit):
    for nodes in internals.nodes_deepest_first(functional):
        # Within a depth, take each layer's calls in the order they were
        # made, so that `call` numbers follow the model's code.
        for node in sorted(nodes, key=_call_order):
            op = node.operation
            if op is None or node.is_input:
                continue
            inner = _functional_of_safe(op)
            if inner is not None:
                inner_sources = {
                    id(t): sources[id(s)]
                    for t, s in zip(inner.inputs, node.input_tensors)
                }
                inner_outputs = _walk(inner, f"{prefix}{op.name}/",
                                      inner_sources, calls, visit)
                for tensor, value in zip(node.outputs, inner_outputs):
                    sources[id(tensor)] = value
                continue
            call = calls.get(id(op), 0)
            calls[id(op)] = call + 1
            site = CallSite(op, node, prefix + op.name, call, sources)
            args, kwargs = internals.call_arguments(node, sources)
            outputs = visit(site, args, kwargs)
            for tensor, value in zip(node.outputs, outputs):
                sources[id(tensor)] = value
    return [sources[id(t)] for t in tree.flatten(functional.outputs)]


def rebuild(model, visit, name=None):
    """A new flat Functional model: `model`'s graph, nested models inlined,
    each leaf call replaced by what `visit(site, args, kwargs)` returns (a
    tensor or a list of tensors). Inputs keep their names, shapes and dtypes;
    outputs keep their order."""
    functional = _functional_of(model)
    new_inputs = []
    sources = {}
    for tensor in functional.inputs:
        layer = internals.producing_operation(tensor)
        new = keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype,
                          name=layer.name)
        new_inputs.append(new)
        sources[id(tensor)] = new

    def wrapped(site, args, kwargs):
        return tree.flatten(visit(site, args, kwargs))

    outputs = walk_calls(functional, sources, wrapped)
    structure = internals.outputs_structure(functional)
    outputs = tree.pack_sequence_as(structure, outputs)
    inputs = new_inputs[0] if len(new_inputs) == 1 else new_inputs
    return keras.Model(inputs, outputs, name=name or model.name)


def _call_order(node):
    for i, other in enumerate(internals.inbound_nodes(node.operation)):
        if other is node:
            return i
    return 0


def consumers(graph, node_id):
    """The node ids that consume any output of `node_id` (with repeats for
    several edges), plus "<output>" if it is a model output."""
    result = [dst for _, dst in graph.out_edges(node_id)]
    result += ["<output>" for src, _ in graph.graph["outputs"] if src == node_id]
    return result


def normalization_nodes(graph):
    """Node ids of BatchNormalization layers (ours included), in graph order."""
    return [
        n for n in nx.topological_sort(graph)
        if isinstance(graph.nodes[n]["layer"], keras.layers.BatchNormalization)
    ]
