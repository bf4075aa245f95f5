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
from keras.src import tree
from keras.src.models.functional import Functional


class GraphError(ValueError):
    """The model cannot be walked as a graph (it says why and what to do)."""


def _functional_of(model):
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            raise GraphError(
                f"Sequential model '{model.name}' has no input shape yet, so "
                "its graph is unknown. Build it first, e.g. "
                "`model.build((None, ...))` or start it with `keras.Input`."
            )
        return functional
    if isinstance(model, Functional):
        return model
    return None


def is_graph_model(layer):
    """True for the Functional and Sequential models a graph can expand."""
    return _functional_of_safe(layer) is not None


def _functional_of_safe(layer):
    try:
        return _functional_of(layer)
    except GraphError:
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
        GraphError: for a subclassed model (no graph to walk) or an unbuilt
            Sequential model.
    """
    functional = _functional_of(model)
    if functional is None:
        raise GraphError(
            f"Model '{model.name}' is a subclassed "
            f"{type(model).__name__}: its layers are joined by Python code, "
            "not a graph. Only Functional and Sequential models (which may "
            "contain subclassed layers) can be walked."
        )
    graph = nx.MultiDiGraph(name=model.name)
    calls = {}
    sources = {}
    for i, tensor in enumerate(functional.inputs):
        layer = tensor._keras_history.operation
        node_id = f"input:{layer.name}"
        graph.add_node(node_id, layer=layer, layer_id=id(layer),
                       class_name=type(layer).__name__, name=layer.name,
                       path=layer.name, call=0, kind="input", inputs=[],
                       input_index=i)
        sources[id(tensor)] = (node_id, 0)
    outputs = _walk(functional, "", graph, sources, calls)
    graph.graph["outputs"] = outputs
    for index, (node_id, _) in enumerate(outputs):
        graph.nodes[node_id].setdefault("output_index", index)
    return graph


def _walk(functional, prefix, graph, sources, calls):
    """Adds the calls of `functional` to `graph`; returns its outputs'
    (node id, output index) pairs. `sources` maps id(KerasTensor) of this
    model's inputs to the pairs that produce them."""
    for depth in sorted(functional._nodes_by_depth, reverse=True):
        for node in functional._nodes_by_depth[depth]:
            op = node.operation
            if op is None or node.is_input:
                continue
            inputs = [sources[id(t)] for t in node.input_tensors]
            inner = _functional_of_safe(op)
            if inner is not None:
                inner_sources = {
                    id(t): src for t, src in zip(inner.inputs, inputs)
                }
                inner_outputs = _walk(inner, f"{prefix}{op.name}/", graph,
                                      inner_sources, calls)
                for tensor, src in zip(node.outputs, inner_outputs):
                    sources[id(tensor)] = src
                continue
            call = calls.get(id(op), 0)
            calls[id(op)] = call + 1
            path = prefix + op.name
            node_id = path if call == 0 else f"{path}#{call}"
            graph.add_node(node_id, layer=op, layer_id=id(op),
                           class_name=type(op).__name__, name=op.name,
                           path=path, call=call, kind="layer",
                           inputs=[src for src, _ in inputs])
            for index, ((src, out_index), tensor) in enumerate(
                zip(inputs, node.input_tensors)
            ):
                graph.add_edge(src, node_id, input_index=index,
                               output_index=out_index,
                               shape=tuple(tensor.shape))
            for out_index, tensor in enumerate(node.outputs):
                sources[id(tensor)] = (node_id, out_index)
    return [sources[id(t)] for t in tree.flatten(functional.outputs)]


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
