"""One JAX process of the keras.distribution tests (test_distribute.py):
fine-tunes the model in MODEL with `strategy="data-parallel"` (DataParallel
over every device of the job) and saves what it trained to OUT.npz.

Usage: distribute_worker.py MODEL OUT.npz [CHECKPOINT_DIR]

Run it with XLA_FLAGS=--xla_force_host_platform_device_count=2 for two
devices in one process, or with KERAS_DISTRIBUTION_JOB_ADDRESSES,
KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID for one
process of a job of several. JAX only.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
model_path, out = sys.argv[1], sys.argv[2]
checkpoint_dir = sys.argv[3] if len(sys.argv) > 3 else None

import keras  # noqa: E402

# The job is joined (and the devices listed) before JAX makes any array.
from renorm_convert.train import distribute  # noqa: E402

distribution = distribute.data_parallel()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import distribute_run  # noqa: E402

from renorm_convert.data.batches import TrainingBatches  # noqa: E402

# Which examples this process fed at each step of the run.
read = {}
_indices = TrainingBatches.indices


def indices(self, step):
    found = _indices(self, step)
    read[step] = found
    return found


TrainingBatches.indices = indices

# How the batches reached the devices: Keras's JAX trainer makes each global
# batch of the processes' parts when a distribution is in effect.
batches = []
_make = jax.make_array_from_process_local_data


def make_array_from_process_local_data(sharding, local_data, *args, **kw):
    array = _make(sharding, local_data, *args, **kw)
    batches.append((array.shape[0], np.shape(local_data)[0],
                    len(array.sharding.device_set)))
    return array


jax.make_array_from_process_local_data = make_array_from_process_local_data
model = keras.models.load_model(model_path)
result = distribute_run.train(model, strategy=distribution,
                              checkpoint_dir=checkpoint_dir)
trained = result.model
variables = list(trained.weights) + list(trained.optimizer.variables)
# Where the state lives: every device of the job holds all of it.
placed = {len(v.value.sharding.device_set) for v in variables}
np.savez(out, **distribute_run.state(trained),
         devices=len(distribution.device_mesh.devices.ravel()),
         placed=sorted(placed), processes=jax.process_count(),
         process=jax.process_index(), chief=distribute.is_chief(),
         losses=[s["loss"] for s in result.steps],
         read_steps=sorted(read), read=[read[s] for s in sorted(read)],
         batches=batches)
print("process", jax.process_index(), "done", flush=True)
