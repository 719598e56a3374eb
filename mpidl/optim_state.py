"""``state_dict`` / ``load_state_dict`` of the :mod:`mpidl.optim` wrappers (torch convention).

A wrapper's state is ``{"optimizer": the wrapped optimizer's state_dict(), "mpidl": {...}}``;
the ``"mpidl"`` part holds what the wrapper adds (the algorithm's state beyond the
parameters, the flat parameters, the step count, world size, rank and a digest of the
parameter shapes).  Loading a state saved by another number of ranks follows the rules of
``[run] resize`` (:mod:`mpidl.resize`), behind the same explicit choice (``resize="average"``).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["StateDictMixin"]


def _shape_digest(tensors):
    from mpidl.optim import _shape_digest as digest
    return digest(tensors)


def _agree(gc, err, tensors, who):
    from mpidl.optim import _agree as agree
    return agree(gc, err, tensors, who)


class StateDictMixin:
    """Checkpoint methods of :class:`mpidl.optim._Distributed` (uses its ``optimizer``, ``algo``,
    ``state``, ``fm``, ``gc`` and ``k``)."""

    def state_dict(self) -> dict:
        """Local. This rank's state, torch convention: ``{"optimizer": ..., "mpidl": ...}``.

        ``"optimizer"`` is the wrapped optimizer's own ``state_dict()``; ``"mpidl"`` what the
        wrapper adds: ``wrapper``, ``algorithm`` (None when your optimizer makes the step
        and the wrapper only communicates), ``world_size``, ``rank``, ``step`` (the steps made),
        ``shape_digest`` (of the parameter shapes and dtype), ``params`` (the flat parameters,
        which a resize needs) and ``state`` (the algorithm's state beyond the parameters:
        momentum, leader copies and loss window, the EASGD centre, ...).  Arrays are CPU
        tensors (copies), so ``torch.save`` / ``torch.load`` keep them.  Decentralized agents
        differ: save every rank's (``f"ckpt/rank{rank}.pt"``).
        """
        from mpidl import xp
        from mpidl.algorithms.base import state_to_dict
        algo = {}
        if self.state is not None:
            algo = {k: v for k, v in state_to_dict(self.state).items() if k != "x"}
        return {"optimizer": self.optimizer.state_dict(),
                "mpidl": {"wrapper": type(self).__name__,
                          "algorithm": None if self.algo is None else self.algo.name,
                          "world_size": self.gc.size, "rank": self.gc.rank, "step": int(self.k),
                          "shape_digest": int(_shape_digest(self._tensors())),
                          "params": torch.from_numpy(np.array(xp.to_numpy(self.fm.x), copy=True)),
                          "state": {k: (torch.from_numpy(np.array(v, copy=True)) if isinstance(v, np.ndarray) else v)
                                    for k, v in algo.items()}}}

    def _tensors(self):
        return list(self.fm.model.parameters())

    def load_state_dict(self, state_dict, *, resize: str = "no") -> None:
        """Collective. Restore what :meth:`state_dict` returned (the parameters included).

        ``state_dict``: this rank's dict; or the list of every saving rank's dicts (in rank
        order), of which this rank takes its own.  From another number of ranks, with
        ``resize="average"`` and that list, the rules of ``[run] resize`` apply
        (:mod:`mpidl.resize`): the average of the ranks' parameters and algorithm state
        (:class:`Consensus`, :class:`Centralized`, :class:`FedAvg`; the wrapped optimizer's
        floating-point state averaged too), the leader's (:class:`LeaderSGD`) or the centre
        (:class:`EASGD`); the step count continues.  ``resize="no"`` (the default) makes a
        world-size mismatch an error.  A bad state (another wrapper, model or algorithm) raises
        one ValueError on every rank.
        """
        from mpidl.algorithms.base import state_from_dict
        who = f"mpidl.optim.{type(self).__name__}.load_state_dict"
        n = self.gc.size
        err, trees = None, None
        try:
            if resize not in ("no", "average"):
                raise ValueError(f"{who}: resize must be \"no\" or \"average\", got {resize!r}")
            dicts = list(state_dict) if isinstance(state_dict, (list, tuple)) else [state_dict]
            trees = [self._check_saved(d, who) for d in dicts]
            old_n = trees[0]["world_size"]
            if any(t["world_size"] != old_n for t in trees) or (len(trees) > 1 and len(trees) != old_n):
                raise ValueError(f"{who}: the list must hold one state dict per saving rank, in rank order "
                                 f"({len(trees)} given, saved by {old_n} ranks)")
            if old_n != n and resize == "no":
                raise ValueError(f"{who}: the state was saved by {old_n} ranks and this wrapper runs on {n}; "
                                 f"pass resize=\"average\" and the list of all {old_n} ranks' state dicts "
                                 "to continue on this number of ranks")
            if old_n != n and len(trees) != old_n:
                raise ValueError(f"{who}: a resize from {old_n} ranks needs the list of all {old_n} "
                                 "ranks' state dicts")
            if old_n == n and len(trees) > 1:
                trees = [trees[self.gc.rank]]
            elif old_n == n and trees[0]["rank"] != self.gc.rank:
                raise ValueError(f"{who}: this is rank {self.gc.rank} but the state dict is rank "
                                 f"{trees[0]['rank']}'s")
        except (TypeError, ValueError, KeyError) as e:
            err = e if not isinstance(e, KeyError) else ValueError(f"{who}: the state dict lacks {e}")
        _agree(self.gc, err, self._tensors(), who)
        if len(trees) == 1:       # the same number of ranks: this rank's own state, bit for bit
            t = trees[0]
            new = dict(t["state"], x=t["params"])
            opt_sd = t["optimizer"]
        else:
            new, opt_sd = self._resized(trees, who)
        if self.state is not None:
            self.state = state_from_dict(type(self.state), new, like=self.state)
        else:
            from mpidl import xp
            xp.assign(self.fm.x, new["x"])
        self.optimizer.load_state_dict(opt_sd)
        self.k = int(trees[0]["step"])

    def _check_saved(self, d, who) -> dict:
        """Local. The ``"mpidl"`` part of a saved state as NumPy, checked against this wrapper."""
        if not isinstance(d, dict) or "mpidl" not in d or "optimizer" not in d:
            raise ValueError(f"{who}: expected the dict state_dict() returned ({{'optimizer': ..., 'mpidl': ...}})")
        m = d["mpidl"]
        if m["wrapper"] != type(self).__name__:
            raise ValueError(f"{who}: the state was saved by mpidl.optim.{m['wrapper']}, not {type(self).__name__}")
        mine = None if self.algo is None else self.algo.name
        if m["algorithm"] != mine:
            raise ValueError(f"{who}: the state is of algorithm {m['algorithm']!r}, this wrapper runs {mine!r} "
                             "(another SGD momentum or optimizer)")
        if int(m["shape_digest"]) != int(_shape_digest(self._tensors())):
            raise ValueError(f"{who}: the state was saved for a model of other parameter shapes "
                             f"(shape digest {m['shape_digest']}, this model {_shape_digest(self._tensors())})")
        np_ = lambda v: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
        return {"world_size": int(m["world_size"]), "rank": int(m["rank"]), "step": int(m["step"]),
                "params": np_(m["params"]), "state": {k: np_(v) for k, v in m["state"].items()},
                "optimizer": d["optimizer"]}

    def _resized(self, trees, who):
        """Collective. (new algorithm state dict, optimizer state dict) from every old rank's state."""
        from mpidl.algorithms.base import state_to_dict
        from mpidl.resize import MemoryRanks, average
        comm = self.gc.base
        old = MemoryRanks([{"algo": dict(t["state"], x=t["params"]), "buffers": {}} for t in trees])
        if self.state is not None:
            like = {"algo": state_to_dict(self.state), "buffers": {}}
        else:
            from mpidl import xp
            like = {"algo": {"x": xp.to_numpy(self.fm.x)}, "buffers": {}}
        own = getattr(self.algo, "resize_state", None)
        if own is not None:
            tree, _ = own(old, like, comm)
        else:
            tree = average(old, like, list(range(old.n)), comm)
        # the wrapped optimizer's state (Adam's moments, ...): floating tensors averaged, the rest rank 0's
        sd0 = trees[0]["optimizer"]
        st = {str(pid): {k: v.detach().cpu().numpy() for k, v in s.items() if isinstance(v, torch.Tensor)}
              for pid, s in sd0.get("state", {}).items()}
        if any(st.values()):
            tensors = MemoryRanks([{str(pid): {k: v.detach().cpu().numpy() for k, v in s.items()
                                               if isinstance(v, torch.Tensor)}
                                    for pid, s in t["optimizer"].get("state", {}).items()} for t in trees])
            mean = average(tensors, st, list(range(old.n)), comm)
            sd = {"param_groups": sd0["param_groups"],
                  "state": {pid: {k: (torch.from_numpy(np.array(mean[str(pid)][k])) if k in mean.get(str(pid), {})
                                      else v) for k, v in s.items()} for pid, s in sd0["state"].items()}}
        else:
            sd = sd0
        return tree["algo"], sd
