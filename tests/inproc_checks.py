"""What the in-process recovery tests check: the STEP lines workers print, and that a job which
lost no step and repeated none ends with the parameters of a fault-free run."""
import json
import os
import re
import subprocess
import sys

import numpy as np

STEPS = 40  # steps of every deterministic job these tests run
TRAIN = os.path.join(os.path.dirname(__file__), "workers", "inproc_train.py")


def steps(output):
    """Every ``STEP k=v ...`` line of ``output`` as a dict."""
    return [dict(kv.split("=", 1) for kv in m.group(1).split()) for m in re.finditer(r"STEP (.*)", output)]


def fault_free_params(out_path):
    """Final parameters of inproc_train.py run fault-free in one plain process, no launcher."""
    res = subprocess.run([sys.executable, TRAIN, "--steps", str(STEPS), "--out", str(out_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "DONE rank=0" in res.stdout and "resets=[]" in res.stdout
    return json.loads(open(out_path).read())


def assert_same_params(path, reference):
    got = json.loads(open(path).read())
    assert got.keys() == reference.keys()
    for key in reference:
        np.testing.assert_allclose(np.array(got[key]), np.array(reference[key]), rtol=1e-4, atol=1e-5)
