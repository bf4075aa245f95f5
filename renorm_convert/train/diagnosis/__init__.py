"""Whether batch renormalization will help a model, told from the model and
the user's own data, batched as training will batch it: `diagnose`.

Batch norm fails when the statistics a layer sees in training differ from
the moving averages it uses at inference; that difference is measured
here without training anything. The modules, in the order a diagnosis
runs: `batching` (which examples, in which batches), `probe` (the passes:
normalization layers switched between batch and moving statistics, batch
moments recorded), `measures` (the numbers, pure NumPy), `verdict`
(findings, conclusion, suggested settings; its thresholds come from
benchmarks/diagnose.py) and `report` (the `Diagnosis`: JSON, text, PNG).
"""

from renorm_convert.train.diagnosis.core import diagnose
from renorm_convert.train.diagnosis.report import Diagnosis, LayerRecord

__all__ = ["Diagnosis", "LayerRecord", "diagnose"]
