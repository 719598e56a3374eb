"""Single-process stacked reference of data parallelism x FDG (M replicas x K stages in one process).

Written from the equations in mpidl/algorithms/fdg.py without its code: the
pipeline is simulated batch by batch with dictionaries of in-flight messages,
each stage is a deep copy of a torch module whose parameters are loaded with
``vector_to_parameters`` and differentiated with ``.backward``.

Iteration t, stage k, d_k = 2 (K - 1 - k), batches b < n_b = T - 2 (K - 1):
non-last stages backpropagate batch t - k - d_k with the weights stashed at
its forward and the (beta-scaled) gradient stage k + 1 produced at t - 1,
then step, then forward batch t - k with the new weights; the last stage
forwards batch t - (K - 1), takes the loss and its gradient at once, then
steps.  The step averages (g + wd w) over the M replicas, then
v <- mu v + g, w <- w - lr(t) (g + mu v if nesterov else v).
"""
import copy

import numpy as np
import torch


def _vec(module):
    return torch.nn.utils.parameters_to_vector(module.parameters()).detach().clone()


def _load(module, w):
    torch.nn.utils.vector_to_parameters(w.detach().clone(), module.parameters())


def _vjp(module, w, h, delta):
    """(dW, dh) of <delta, module(h; w)> by plain backward."""
    _load(module, w)
    module.zero_grad(set_to_none=True)
    h = h.detach().clone().requires_grad_(True)
    out = module(h)
    out.backward(delta)
    gw = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
    return gw.detach().clone(), h.grad.detach().clone()


def fdg(stages, batch, M, T, lr, *, mu=0.0, nesterov=False, wd=0.0, beta=1.0, trace=None, buffers=None):
    """Final per-stage weight vectors after T iterations (every replica holds the same ones).

    ``stages``: the K stage modules (initial weights); ``batch(m, b) -> (x, y)``
    replica m's batch b; ``lr(t)``; ``trace`` (a dict) receives the weights
    after every iteration, ``trace[t][k]``.  Buffers (BatchNorm running
    statistics) move once per batch and stage, at its forward: the backward's
    recomputation leaves them alone.  ``buffers`` (a list) receives replica
    m's final buffers of every stage, ``buffers[m][k]`` = {name: tensor}.
    """
    K = len(stages)
    mods = [[copy.deepcopy(s) for s in stages] for _ in range(M)]
    for row in mods:
        for s in row:
            s.train()
    W = [_vec(s) for s in stages]
    V = [torch.zeros_like(w) for w in W]
    nb = max(0, T - 2 * (K - 1))
    acts = [[{} for _ in range(K)] for _ in range(M)]     # acts[m][k][b]: input of stage k, batch b
    deltas = [[{} for _ in range(K)] for _ in range(M)]   # deltas[m][k][b]: gradient w.r.t. stage k's output
    stash = [[{} for _ in range(K)] for _ in range(M)]    # stash[m][k][b] = (weights, input)
    for t in range(T):
        new_acts = [[{} for _ in range(K)] for _ in range(M)]
        new_deltas = [[{} for _ in range(K)] for _ in range(M)]
        grads = [[None] * K for _ in range(M)]
        for m in range(M):
            for k in range(K):
                if k == K - 1:
                    b = t - k
                    if not 0 <= b < nb:
                        continue
                    x, y = batch(m, b)
                    h = x if k == 0 else acts[m][k].pop(b)
                    mod = mods[m][k]
                    _load(mod, W[k])
                    mod.zero_grad(set_to_none=True)
                    hh = h.detach().clone().requires_grad_(k > 0)
                    loss = torch.nn.functional.cross_entropy(mod(hh), y)
                    loss.backward()
                    grads[m][k] = torch.cat([p.grad.reshape(-1) for p in mod.parameters()]).detach().clone()
                    if k > 0:
                        new_deltas[m][k - 1][b] = hh.grad.detach().clone()
                else:
                    b = t - k - 2 * (K - 1 - k)
                    if not 0 <= b < nb:
                        continue
                    w_old, h = stash[m][k].pop(b)
                    keep = [x.clone() for x in mods[m][k].buffers()]
                    gw, gh = _vjp(mods[m][k], w_old, h, beta * deltas[m][k].pop(b))
                    for x, x0 in zip(mods[m][k].buffers(), keep):
                        x.copy_(x0)
                    grads[m][k] = gw
                    if k > 0:
                        new_deltas[m][k - 1][b] = gh
        for k in range(K):
            if grads[0][k] is None:
                continue
            g = sum(grads[m][k] + wd * W[k] for m in range(M)) / M
            V[k] = mu * V[k] + g
            W[k] = W[k] - lr(t) * ((g + mu * V[k] if nesterov else V[k]) if mu else g)
        for m in range(M):
            for k in range(K - 1):
                b = t - k
                if not 0 <= b < nb:
                    continue
                h = batch(m, b)[0] if k == 0 else acts[m][k].pop(b)
                stash[m][k][b] = (W[k].clone(), h)
                mod = mods[m][k]
                _load(mod, W[k])
                with torch.no_grad():
                    new_acts[m][k + 1][b] = mod(h).detach().clone()
        for m in range(M):
            for k in range(K):
                acts[m][k].update(new_acts[m][k])
                deltas[m][k].update(new_deltas[m][k])
        if trace is not None:
            trace[t] = [w.clone() for w in W]
    if buffers is not None:
        buffers.extend([{n: x.clone() for n, x in s.named_buffers()} for s in row] for row in mods)
    return [w.numpy() for w in W]


def batches(shards, batch_size, steps_per_epoch, seed, dtype=torch.float64):
    """``batch(m, b)`` over replica shards [(x, y), ...]: permutation default_rng([seed, m, epoch])."""
    def batch(m, b):
        x, y = shards[m]
        epoch, j = divmod(b, steps_per_epoch)
        idx = np.random.default_rng([seed, m, epoch]).permutation(len(y))[j * batch_size:(j + 1) * batch_size]
        return torch.as_tensor(x[idx]).to(dtype), torch.as_tensor(y[idx]).long()
    return batch


def vjp_at(stage, w, h, delta):
    """The gradient of <delta, stage(h; w)> with respect to w (for the stale-gradient test)."""
    return _vjp(copy.deepcopy(stage), torch.as_tensor(w), torch.as_tensor(h), torch.as_tensor(delta))[0].numpy()


def mlp_stages(model, cuts):
    """The K stages of a seeded ``mpidl`` MLP cut before its Linear layers ``cuts`` (Flatten rides with unit 0)."""
    layers = list(model)
    starts = [0] + [i for i, layer in enumerate(layers) if isinstance(layer, torch.nn.Linear)][1:]
    bounds = [starts[c] for c in (0, *cuts)] + [len(layers)]
    return [torch.nn.Sequential(*layers[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
