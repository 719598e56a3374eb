"""A torch optimizer for the MPI tests of ``mpidl.optim`` (torch imported here, not in mpiutil)."""
import torch


class PlainSGD(torch.optim.Optimizer):
    """Not torch.optim.SGD: the wrappers' generic path (the user's optimizer makes the local step)."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"])
