"""Train image classifiers and extract CNN features, from one CPU to a multi-node GPU cluster.

    accelerate launch toolkit/train.py --config configs/digits_lenet.yaml optim.lr=0.05

    from toolkit import load_run, predict                     # use a finished run in Python
    model, preprocess, classes = load_run("runs/digits_lenet/20261127-140000")
    rows = predict("runs/digits_lenet/20261127-140000", ["a.png", "b.png"])
"""

__version__ = "0.1.0"


# Thin wrappers: `import toolkit` must stay cheap (no torch until a function is called; see
# benchmarks/startup.py). The real functions and their documentation are in toolkit/predict.py.
def load_run(run, weights=None):
    """-> (model, preprocess, classes) of a finished run: see `toolkit.predict.load_run`."""
    from toolkit.predict import load_run as load

    return load(run, weights)


def predict(run, inputs=(), **kwargs):
    """One dict per input, in input order: see `toolkit.predict.predict`."""
    from toolkit.predict import predict as run_predict

    return run_predict(run, inputs, **kwargs)
