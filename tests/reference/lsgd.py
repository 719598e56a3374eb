"""Stacked-matrix references of synchronous LSGD (single and multi-leader) and EASGD.

Row i of X is worker i's parameters.  Written from the equations in the
module docstring of mpidl/algorithms/lsgd.py (Teng et al., arXiv 1905.10395;
Zhang et al., arXiv 1412.6651), in plain NumPy, without calling mpidl's
algorithm code.
"""
import numpy as np


def windowed(history, window):
    """Mean of the last ``window`` losses of each worker (history: list of per-step loss vectors)."""
    H = np.array(history[-window:])
    return H.mean(0)


def leader(values, members):
    """Index (a member) with the smallest value; ties -> the smallest index."""
    members = sorted(members)
    best = members[0]
    for i in members[1:]:
        if values[i] < values[best]:
            best = i
    return best


def lsgd(x0, oracles, steps, lr, *, lam=0.1, lam_G=0.1, tau=4, tau_G=16, window=10, groups=None,
         step_pull=True, p1=None, p2=None, mu=0.0, wd=0.0, record=None):
    """Synchronous LSGD.  ``groups``: list of member lists (None = single leader).

    ``record`` (a list) receives (t, global leader, {group: local leader}) at each election.
    Returns the stacked X.
    """
    n = len(oracles)
    p1 = lam if p1 is None else p1
    p2 = lam_G if p2 is None else p2
    X = np.tile(x0, (n, 1))
    V = np.zeros_like(X)
    lead_g = -1
    lead_l = np.full(n, -1)
    CG = np.zeros_like(X)
    CL = np.zeros_like(X)
    have_g = have_l = False
    history = []
    multi = groups is not None
    for t in range(steps):
        G = np.zeros_like(X)
        losses = np.zeros(n)
        for i, o in enumerate(oracles):
            loss, g = o.loss_grad(X[i].copy(), t)
            G[i] = g + wd * X[i]
            losses[i] = loss
        if mu:
            V = mu * V + G
            X = X - lr(t) * V
        else:
            X = X - lr(t) * G
        history.append(losses)
        f = windowed(history, window)
        glob = (t + 1) % tau_G == 0
        loc = multi and (t + 1) % tau == 0
        ev = [t, None, {}]
        if glob:
            b = leader(f, range(n))
            CG = np.tile(X[b], (n, 1))
            have_g = True
            ev[1] = b
            lead_g = b
        if loc:
            for j, members in enumerate(groups):
                b = leader(f, members)
                ev[2][j] = b
                for i in members:
                    CL[i] = X[b]
                    lead_l[i] = b
            have_l = True
        if record is not None and (glob or loc):
            record.append(tuple(ev))
        # per worker: the last elected leader does not step-pull toward its own old copy
        aG = np.full((n, 1), lam_G) if glob else np.array(
            [[p2 / tau_G if step_pull and have_g and lead_g != i else 0.0] for i in range(n)])
        aL = np.zeros((n, 1))
        if multi:
            aL = np.full((n, 1), lam) if loc else np.array(
                [[p1 / tau if step_pull and have_l and lead_l[i] != i else 0.0] for i in range(n)])
        X = X - aG * (X - CG) - aL * (X - CL)
    return X


def easgd(x0, oracles, steps, lr, *, beta=0.43, tau=4, mu=0.0, wd=0.0):
    """Synchronous EASGD; returns (X, c)."""
    n = len(oracles)
    a = beta / n
    X = np.tile(x0, (n, 1))
    V = np.zeros_like(X)
    c = x0.copy()
    for t in range(steps):
        G = np.stack([o.loss_grad(X[i].copy(), t)[1].copy() + wd * X[i] for i, o in enumerate(oracles)])
        D = X - c if (t + 1) % tau == 0 else np.zeros_like(X)
        if mu:
            V = mu * V + G
            Xn = X - lr(t) * V
        else:
            Xn = X - lr(t) * G
        X = Xn - a * D
        c = c + a * D.sum(0)
    return X, c


def sgd(x0, oracle, steps, lr, mu=0.0, wd=0.0):
    x = x0.copy()
    v = np.zeros_like(x)
    for t in range(steps):
        _, g = oracle.loss_grad(x.copy(), t)
        g = g + wd * x
        v = mu * v + g
        x = x - lr(t) * (v if mu else g)
    return x


def lsgd_async_serial(x0, oracles, steps, lr, *, lam=0.1, lam_G=0.1, tau=4, tau_G=16, window=10, groups=None,
                      step_pull=True, p1=None, p2=None, mu=0.0, wd=0.0, record=None):
    """Asynchronous LSGD with the local steps serialised: step s of worker 0, of worker 1, ...,
    then step s + 1 of worker 0, ...  (what the MPI test enforces with barriers).

    The published leaders are slots ``[loss, owner, x]`` (the global one and one per group).
    At an election a worker publishes its model when the slot is empty, when it owns the slot,
    or when its windowed loss is lower than the slot's; otherwise it copies the slot's model.
    Either way the slot's owner becomes its leader.  ``record`` (a list) receives the global
    slot's owner after each global election.  Returns (X, CG, CL, global slot, lead_g,
    lead_l).
    """
    n = len(oracles)
    p1 = lam if p1 is None else p1
    p2 = lam_G if p2 is None else p2
    multi = groups is not None
    group_of = {i: j for j, members in enumerate(groups or [range(n)]) for i in members}
    X = np.tile(x0, (n, 1))
    V = np.zeros_like(X)
    CG, CL = np.zeros_like(X), np.zeros_like(X)
    hist = [[] for _ in range(n)]
    have_g, have_l = [False] * n, [False] * n
    lead_g, lead_l = [-1] * n, [-1] * n
    slot_g, slot_l = None, {}

    def elect(i, f, slot):
        if slot is None or slot[1] == i or f < slot[0]:
            return [f, i, X[i].copy()]
        return slot

    for t in range(steps):
        for i, o in enumerate(oracles):
            loss, g = o.loss_grad(X[i].copy(), t)
            g = g + wd * X[i]
            V[i] = mu * V[i] + g
            X[i] = X[i] - lr(t) * (V[i] if mu else g)
            hist[i].append(loss)
            f = float(np.mean(hist[i][-window:]))
            glob = (t + 1) % tau_G == 0
            loc = multi and (t + 1) % tau == 0
            if glob:
                slot_g = elect(i, f, slot_g)
                CG[i], lead_g[i], have_g[i] = slot_g[2], slot_g[1], True
                if record is not None:
                    record.append(slot_g[1])
            if loc:
                j = group_of[i]
                slot_l[j] = elect(i, f, slot_l.get(j))
                CL[i], lead_l[i], have_l[i] = slot_l[j][2], slot_l[j][1], True
            aG = lam_G if glob else (p2 / tau_G if step_pull and have_g[i] and lead_g[i] != i else 0.0)
            aL = 0.0
            if multi:
                aL = lam if loc else (p1 / tau if step_pull and have_l[i] and lead_l[i] != i else 0.0)
            X[i] = X[i] - aG * (X[i] - CG[i]) - aL * (X[i] - CL[i])
    return X, CG, CL, slot_g, lead_g, lead_l


def easgd_async_serial(x0, oracles, steps, lr, *, beta=0.43, tau=4, mu=0.0, wd=0.0, c0=None):
    """Asynchronous EASGD with the local steps serialised (as lsgd_async_serial): at a
    communication step worker i moves the shared center at once, c <- c + a (x_i - c), and
    itself by -a (x_i - c) after its SGD step.  ``c0``: the starting center (default x0: a
    resumed run starts from its checkpoint's).  Returns (X, c)."""
    n = len(oracles)
    a = beta / n
    X = np.tile(x0, (n, 1))
    V = np.zeros_like(X)
    c = (x0 if c0 is None else c0).copy()
    for t in range(steps):
        for i, o in enumerate(oracles):
            _, g = o.loss_grad(X[i].copy(), t)
            g = g + wd * X[i]
            d = None
            if (t + 1) % tau == 0:
                d = X[i] - c
                c = c + a * d
            V[i] = mu * V[i] + g
            X[i] = X[i] - lr(t) * (V[i] if mu else g)
            if d is not None:
                X[i] = X[i] - a * d
    return X, c
