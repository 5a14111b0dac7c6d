"""Train a GAN with gan_dist: the entry point for every launcher.

    python train.py --config configs/default.yaml                # one process (CPU or 1 GPU)
    python train.py --debug --config configs/default.yaml        # short, checked, one process
    torchrun --nproc_per_node 8 train.py --config configs/dcgan_mnist32.yaml data.root=DIR
    accelerate launch --config_file launch/accelerate/cpu-2proc.yaml train.py --config configs/tiny.yaml

Overrides are dotted key=value pairs after the options; `python train.py --help` lists them.
"""

import sys

from gan_dist.train import main

if __name__ == "__main__":
    sys.exit(main())
