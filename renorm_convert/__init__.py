"""renorm_convert: convert Keras models to Batch Renormalization, fine-tune
them, and export them to ONNX with the normalization folded away."""

from renorm_convert._logs import filtered_stderr

with filtered_stderr():
    import tensorflow  # noqa: F401  (its native start-up logs, filtered)

from renorm_convert import convert as convert_module  # noqa: E402
from renorm_convert import graph, schedule  # noqa: E402
from renorm_convert.convert import ConversionError, convert, revert  # noqa: E402
from renorm_convert.graph import GraphError, model_graph  # noqa: E402
from renorm_convert.layers import BatchRenormalization  # noqa: E402
from renorm_convert.schedule import RenormSchedule  # noqa: E402

__all__ = [
    "BatchRenormalization",
    "ConversionError",
    "GraphError",
    "RenormSchedule",
    "convert",
    "model_graph",
    "revert",
]
__version__ = "0.1.0"

from renorm_convert.fold import ChannelAffine, fold  # noqa: E402
from renorm_convert.export import ExportError, ExportReport, export_onnx  # noqa: E402

__all__ += ["ChannelAffine", "fold", "ExportError", "ExportReport",
            "export_onnx"]

from renorm_convert import data, io  # noqa: E402
from renorm_convert.finetune import FineTuneError, NonFiniteLoss, fine_tune  # noqa: E402

__all__ += ["data", "fine_tune", "FineTuneError", "NonFiniteLoss"]
