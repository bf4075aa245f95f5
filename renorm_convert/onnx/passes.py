"""The graph clean-up every exporter's ONNX graph goes through, in order:

1. constants (`constants.fold_constants`): what an exporter computes from
   constants becomes a constant, so the weights and biases below are seen
   as such (jax2onnx writes a Conv's weights as a Transpose of a constant);
   then chains of constant Mul / Add / Sub / Div merged into an Add and a
   Mul (`chains.merge_affine_chains`: an input's rescaling and
   normalization), whose Mul the next step folds into the Conv after it;
2. per-channel arithmetic into the linear op before or after it
   (`folding.fold_affine`): a bias Add the exporter wrote apart from its
   Conv, and normalization a custom layer's own code applies; this walks
   through Transposes, so it comes before they move;
3. Transposes (`transposes.optimize_transposes`): NCHW <-> NHWC pairs
   around each Conv cancelled, the rest moved down until they cancel;
4. per-channel arithmetic again, where moving Transposes brought a Mul /
   Add next to a Conv it could not reach before;
5. zero padding into the Conv that reads it (`padding.fold_padding`), last:
   a Conv that pads takes no offset folded forward into it.

Only `onnx` and NumPy: no exporter, no backend.
"""

import collections
import dataclasses

from renorm_convert.onnx.chains import merge_affine_chains
from renorm_convert.onnx.constants import fold_constants
from renorm_convert.onnx.folding import fold_affine
from renorm_convert.onnx.padding import fold_padding
from renorm_convert.onnx.transposes import optimize_transposes

__all__ = ["GraphCleanup", "clean", "op_counts"]


@dataclasses.dataclass
class GraphCleanup:
    """What `clean` did, in nodes: `constants` computed from constants and
    replaced by one, `merged` fewer in chains of constant arithmetic,
    `affine` per-channel Mul / Add / Sub / Div folded into a Conv / Gemm /
    MatMul, `transposes` fewer after cancelling and moving
    Transposes, `pads` zero Pads folded into a Conv; `nodes_before` /
    `nodes_after` the exporter's graph and the clean one."""

    nodes_before: int = 0
    nodes_after: int = 0
    constants: int = 0
    merged: int = 0
    affine: int = 0
    transposes: int = 0
    pads: int = 0


def op_counts(onnx_model):
    """ONNX op type -> number of nodes."""
    return dict(sorted(collections.Counter(
        node.op_type for node in onnx_model.graph.node).items()))


def clean(onnx_model):
    """The graph with constants folded, per-channel arithmetic folded into
    its linear ops and Transposes cancelled (the module docstring says in
    which order, and why). Returns `(onnx_model, GraphCleanup)`; the model
    given is left as it is. Every step is exact."""
    record = GraphCleanup(nodes_before=len(onnx_model.graph.node))
    onnx_model, record.constants = fold_constants(onnx_model)
    onnx_model, record.merged = merge_affine_chains(onnx_model)
    onnx_model, record.affine = fold_affine(onnx_model)
    onnx_model, record.transposes = optimize_transposes(onnx_model)
    if record.transposes:
        onnx_model, more = fold_affine(onnx_model)
        record.affine += more
    onnx_model, record.pads = fold_padding(onnx_model)
    record.nodes_after = len(onnx_model.graph.node)
    return onnx_model, record
