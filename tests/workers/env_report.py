"""A test worker: prints the environment and CPU binding it was started with, then exits
(``--wait``: runs until the file ``finish`` appears in its working directory)."""
import os
import sys
import time

with open("/proc/self/status") as f:
    allowed = next(line.split(":", 1)[1].strip() for line in f if line.startswith("Cpus_allowed_list"))
env = os.environ
print(f"REPORT rank={env['RANK']} local_rank={env['LOCAL_RANK']} cuda={env.get('CUDA_VISIBLE_DEVICES', '-')} "
      f"cpus={','.join(map(str, sorted(os.sched_getaffinity(0))))} allowed={allowed} pid={os.getpid()}",
      flush=True)
print(f"STDERR rank={env['RANK']}", file=sys.stderr, flush=True)
if "--wait" in sys.argv:
    while not os.path.exists("finish"):
        time.sleep(0.05)
