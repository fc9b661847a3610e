"""Train image classifiers and extract CNN features, from one CPU to a multi-node GPU cluster.

    accelerate launch toolkit/train.py --config configs/digits_lenet.yaml optim.lr=0.05
"""

__version__ = "0.1.0"
