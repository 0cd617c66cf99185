"""dist_cifar: distributed data-parallel CIFAR-10 training on plain torch.distributed.

    import dist_cifar
    result = dist_cifar.run({"model": "small_cnn", "dataset": "synthetic", "epochs": 2})

`run` and `RunResult` (dist_cifar/api.py) load on first use: `import dist_cifar` stays free of torch.
"""

__version__ = "0.3.0"


def __getattr__(name: str):
    if name in ("run", "RunResult"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'dist_cifar' has no attribute {name!r}")
