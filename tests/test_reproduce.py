"""The paper's experiments repeat exactly under a seed."""

import json
import subprocess
import sys

RUN = """
import json, sys
from renorm_convert import reproduce
config = reproduce.Config("non-iid", steps=40, seeds=1, eval_every=20,
                          eval_size=300, data="digits", batch_size=20)
result = reproduce.run(config, progress=lambda message: None)
print(json.dumps([c["val_accuracy"] for c in result["curves"]]))
"""


def _run():
    out = subprocess.run([sys.executable, "-c", RUN], capture_output=True,
                         text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_runs_in_separate_processes_are_identical():
    first, second = _run(), _run()
    assert len(first) == 4  # two evaluations, two arms
    assert first == second
    # The curves are learning, not constant.
    assert len(set(first)) > 1
