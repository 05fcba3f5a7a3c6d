"""A test worker that asks ``elastic-run ctl`` about its own job with no flags at all: the
store, the job and its token come from the environment elastic-run gives its workers."""
import json
import os
import subprocess
import sys
import time

elastic_run = os.path.join(os.path.dirname(sys.executable), "elastic-run")
env = {k: v for k, v in os.environ.items() if not k.startswith("PET_")}
deadline = time.monotonic() + 60
while True:  # the agent publishes its workers' pids on its own time: read until they show
    r = subprocess.run([elastic_run, "ctl", "status", "--json"], check=False, capture_output=True, text=True,
                       timeout=60, env=env, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        print(f"CTL failed rc={r.returncode}: {r.stderr.strip()}", flush=True)
        sys.exit(1)
    status = json.loads(r.stdout)
    me = [n for n in status["nodes"] if os.getpid() in n["worker_pids"]]
    if me or time.monotonic() > deadline:
        break
    time.sleep(0.1)
print(f"CTL run={status['run_id']} state={status['state']} world={status['world_size']} "
      f"mine={len(me)} env_run={os.environ['TORCHELASTIC_RUN_ID']}", flush=True)
