"""A test worker: reports its torchrun environment, then behaves as --mode says."""
import argparse
import os
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--mode", default="exit", choices=["exit", "wait", "crash-once", "fail", "sleep"])
p.add_argument("--finish-file", default="finish")
args = p.parse_args()
env = os.environ
print(f"WORKER rank={env['RANK']} local_rank={env['LOCAL_RANK']} world={env['WORLD_SIZE']} "
      f"local_world={env['LOCAL_WORLD_SIZE']} node_rank={env['GROUP_RANK']} nodes={env['GROUP_WORLD_SIZE']} "
      f"gen={env['ELASTIC_GENERATION']} restart={env['TORCHELASTIC_RESTART_COUNT']} "
      f"master={env['MASTER_ADDR']}:{env['MASTER_PORT']} run={env['TORCHELASTIC_RUN_ID']} pid={os.getpid()}",
      flush=True)
if args.mode == "wait":
    # Runs until the test creates the finish file (polling a file is the signal, not a delay).
    while not os.path.exists(args.finish_file):
        time.sleep(0.05)
elif args.mode == "crash-once" and env["TORCHELASTIC_RESTART_COUNT"] == "0" and env["RANK"] == "1":
    raise ValueError("crash on the first attempt")
elif args.mode == "fail" and env["RANK"] == "1":
    raise ValueError("boom")
elif args.mode == "sleep":
    time.sleep(600)
sys.exit(0)
