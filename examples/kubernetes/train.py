"""The training script of the Kubernetes and Ray examples: PyTorch DDP on scikit-learn's digits
under ``@elastic.run``, a commit every step, a save when this node is drained.

    elastic-run --nnodes 2:3 --rdzv-endpoint HOST:29400 --rdzv-id job42 examples/kubernetes/train.py \\
        --ckpt-dir /ckpt --steps 2000

What a scheduler's notice does to it (a pod deleted by a scale-down or an eviction, a Ray node
drained): the drained node's workers raise ``elastic.DrainRequested`` at their next
``state.commit()`` and run the drain callback below, which saves the last completed step to
``--ckpt-dir`` and prints ``SAVED step=N save_s=S`` (S: how long the save took: measure it to
size ``terminationGracePeriodSeconds``, see pytorchjob.yaml); the other nodes' workers roll back
to that same commit and go on in place, same processes, at the smaller world size.

Every rank prints ``STEP step=N rank=R world=W pid=P`` per step; rank 0 prints the test
accuracy at the end (``FINAL accuracy=A step=N world=W``). It stops after ``--steps`` or when the
file ``--stop-file`` appears.
"""
import argparse
import json
import os
import time

GLOBAL_BATCH = 48  # samples per step for the whole job, split over the ranks


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--step-s", type=float, default=0.02, help="extra seconds per step (a bigger model's compute)")
    p.add_argument("--ckpt-dir", default=os.environ.get("CKPT_DIR", "ckpt"))
    p.add_argument("--stop-file", default=os.environ.get("STOP_FILE", ""))
    args = p.parse_args()

    import numpy as np
    import torch
    import torch.nn as nn
    from sklearn.datasets import load_digits
    from torch.nn.parallel import DistributedDataParallel as DDP

    import elastic

    torch.set_num_threads(1)
    x, y = load_digits(return_X_y=True)
    x = torch.from_numpy((x / 16.0).astype(np.float32))
    y = torch.from_numpy(y)
    xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = elastic.TorchState(model=model, optimizer=opt, step=0)
    os.makedirs(args.ckpt_dir, exist_ok=True)

    def save_on_drain() -> None:
        """Runs at the commit where this node's drain is seen: the last completed step is saved."""
        if os.environ.get("LOCAL_RANK") != "0":
            return
        t0 = time.monotonic()
        node = os.environ.get("ELASTIC_NODE_ID", "node")
        path = os.path.join(args.ckpt_dir, f"drained-{node}.pt")
        torch.save({"model": state.model.state_dict(), "step": state.step}, path + ".tmp")
        os.replace(path + ".tmp", path)
        with open(os.path.join(args.ckpt_dir, f"drained-{node}.json"), "w") as f:
            json.dump({"step": state.step, "pid": os.getpid()}, f)
        print(f"SAVED step={state.step} save_s={time.monotonic() - t0:.3f} path={path}", flush=True)

    state.register_drain_callbacks([save_on_drain])

    def stopped() -> bool:
        return state.step >= args.steps or bool(args.stop_file and os.path.exists(args.stop_file))

    @elastic.run(timeout_s=60)
    def train(state):
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        net = DDP(state.model) if world > 1 else state.model  # the group is new after every change
        loss_fn = nn.CrossEntropyLoss()
        per_epoch = len(xtr) // GLOBAL_BATCH
        while not stopped():
            # One global batch per step from a per-epoch permutation; each rank takes its slice,
            # so the job sees the same samples at any world size.
            epoch, i = divmod(state.step, per_epoch)
            order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(epoch))
            batch = order[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH].tensor_split(world)[rank]
            state.optimizer.zero_grad()
            loss = loss_fn(net(xtr[batch]), ytr[batch])
            loss.backward()
            state.optimizer.step()
            state.step += 1
            print(f"STEP step={state.step} rank={rank} world={world} pid={os.getpid()} loss={loss.item():.4f}",
                  flush=True)
            time.sleep(args.step_s)
            state.commit()  # a point to roll back to; a drain or a new round is raised here

    train(state)
    if int(os.environ.get("RANK", "0")) == 0:
        with torch.no_grad():
            acc = (state.model(xte).argmax(1) == yte).float().mean().item()
        print(f"FINAL accuracy={acc:.4f} step={state.step} world={os.environ.get('WORLD_SIZE')}", flush=True)


if __name__ == "__main__":
    main()
