"""dist_cifar: distributed data-parallel CIFAR-10 training on plain torch.distributed."""

__version__ = "0.3.0"
