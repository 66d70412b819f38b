"""What the CPU tests of FSDP2 run in two gloo processes, several runs to a launch (each launch costs both processes'
imports, most of a tiny run's time):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_cpu_launch.py \\
        [--plain-loop DIR] [finetune --fsdp ...]

``--plain-loop DIR``: the sharded plain loop of ``tests/fsdp_train.py`` into ``DIR``. Then a te-llama command,
run with accelerate's FSDP turned on for CPU process groups. accelerate turns FSDP on only for GPU-like ones
(``AcceleratorState`` drops the FSDP plugin for ``MULTI_CPU``, and the Trainer would wrap the model in DDP, which
``finetune --fsdp`` refuses); here it keeps the plugin as it does on GPUs, so that the Trainer and accelerate run
their FSDP2 path (no DDP, DCP checkpoints, resume) with the reference layer. Nothing else changes.
"""

import functools
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

import fsdp_train
from te_llama.cli import main

_init = AcceleratorState.__init__


@functools.wraps(_init)
def _init_keeping_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


if __name__ == "__main__":
    command = sys.argv[1:]
    if command[:1] == ["--plain-loop"]:
        fsdp_train.main(["--out", command[1]])
        command = command[2:]
    if command:
        AcceleratorState.__init__ = _init_keeping_fsdp
        sys.exit(main(command))
