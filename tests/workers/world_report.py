"""Prints where each part of elastic-run thinks this process is: World.detect(), a
Checkpointer, an ElasticSampler and a StepProfiler, after Horovod's hvd.init()."""
import sys

import horovod.torch as hvd

hvd.init()
from checkpoint import Checkpointer  # noqa: E402
from dataload.sampler import ElasticSampler  # noqa: E402
from elastic import World  # noqa: E402
from profiler import StepProfiler  # noqa: E402

world = World.detect()
ck = Checkpointer(sys.argv[1], memory=False)
sampler = ElasticSampler(64, 4)
prof = StepProfiler(sys.argv[2], sampler="none", exchange="none")
print(f"WORLD hvd={hvd.rank()}/{hvd.size()} detect={world.rank}/{world.world_size} "
      f"ckpt={ck.rank}/{ck.world_size} sampler={sampler.world.rank}/{sampler.world.world_size} "
      f"profiler={prof.world.rank}/{prof.world.world_size}", flush=True)
prof.close()
