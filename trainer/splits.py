"""Which training samples each federated client sees.

Every client computes the whole partition from the same seed and keeps its
own part, so no coordination is needed and the parts are disjoint and cover
all samples by construction.
"""

from __future__ import annotations

import math

import numpy as np

from trainer.errors import UsageError

__all__ = ["parse_split", "client_indices"]

_FORMS = "'iid', 'dirichlet:ALPHA' (ALPHA > 0) or 'classes:C' (integer C >= 1)"


def parse_split(spec: str) -> tuple[str, float | int | None]:
    """``'iid'`` -> ``('iid', None)``, ``'dirichlet:0.5'`` -> ``('dirichlet', 0.5)``,
    ``'classes:2'`` -> ``('classes', 2)``; anything else raises UsageError."""
    kind, sep, arg = str(spec).strip().partition(":")
    kind, arg = kind.strip().lower(), arg.strip()

    def bad(why: str) -> UsageError:
        return UsageError(f"--split {spec}: {why}; use {_FORMS}")

    if kind == "iid":
        if sep:
            raise bad("'iid' takes no argument")
        return "iid", None
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise bad("ALPHA must be a number") from None
        if not (math.isfinite(alpha) and alpha > 0):
            raise bad("ALPHA must be a finite number > 0")
        return "dirichlet", alpha
    if kind == "classes":
        try:
            c = int(arg)
        except ValueError:
            raise bad("C must be an integer") from None
        if c < 1:
            raise bad("C must be >= 1")
        return "classes", c
    raise bad("unknown kind")


def client_indices(y: np.ndarray, client: int, clients: int, spec: str, seed: int,
                   *, num_classes: int | None = None) -> np.ndarray:
    """Sorted int64 indices into ``y`` of the samples that ``client`` holds.

    For every kind the ``clients`` index sets are disjoint and their union is
    ``range(len(y))``; the result depends only on the arguments.

    * ``iid``: a seeded permutation cut into ``clients`` near-equal parts.
    * ``dirichlet:ALPHA``: per class, client shares drawn from
      Dirichlet(ALPHA) cut the seeded-shuffled indices of that class
      (Hsu et al. 2019). Small ALPHA gives skewed clients; a client may end up
      with no samples at all.
    * ``classes:C``: client k holds classes ``(k*C + j) % K`` for j < C, K the
      number of classes. A class held by several clients has its (shuffled)
      samples divided evenly among them. Classes held by nobody (when
      ``clients*C < K``) are assigned round-robin: the i-th such class, in
      class order, goes whole to client ``i % clients``, so no sample is lost.
      C above K is refused: every client would hold every class, an iid
      split under another name.

    K is ``num_classes`` if given, else ``max(y) + 1``; pass it when ``y`` is
    a subset (e.g. a test set) that may lack the highest class, so that the
    class-to-client assignment matches the one made on the full label set.
    """
    kind, param = parse_split(spec)
    if isinstance(clients, bool) or not isinstance(clients, (int, np.integer)) or clients < 1:
        raise UsageError(f"--clients must be an integer >= 1, got {clients!r}")
    if isinstance(client, bool) or not isinstance(client, (int, np.integer)) \
            or not 0 <= client < clients:
        raise UsageError(f"--client must be in 0..{clients - 1} (--clients {clients}), got {client!r}")
    y = _labels(y)
    k = int(y.max()) + 1 if len(y) else 0
    if num_classes is not None:
        if num_classes < k:
            raise UsageError(f"labels go up to {k - 1} but num_classes is {num_classes}; "
                             "pass the data set's class count")
        k = int(num_classes)
    if kind == "classes" and param > k:
        # Every client would hold every class: an iid split by another name.
        raise UsageError(f"--split {spec}: the data set has {k} classes, so a client cannot hold {param}; "
                         f"use classes:C with C <= {k}, or iid")
    if len(y) == 0:
        return np.empty(0, np.int64)
    rng = np.random.default_rng(seed)
    if kind == "iid":
        parts = np.array_split(rng.permutation(len(y)), clients)
    elif kind == "dirichlet":
        parts = _dirichlet(y, k, clients, param, rng)
    else:
        parts = _by_classes(y, k, clients, param, rng)
    return np.sort(np.asarray(parts[client], dtype=np.int64))


def _labels(y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:  # Keras-style (n, 1) labels
        y = y[:, 0]
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise UsageError(f"labels must be a 1-D array of integer class ids, "
                         f"got {y.dtype} array of shape {y.shape}")
    if y.size and y.min() < 0:
        raise UsageError(f"labels must be class ids >= 0, found {int(y.min())}")
    return y


def _dirichlet(y, k, clients, alpha, rng) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    # Classes in a fixed order, and one draw per class even for empty
    # classes, so the random stream (hence the split) depends only on seed.
    for c in range(k):
        idx = rng.permutation(np.flatnonzero(y == c))
        p = rng.dirichlet(np.full(clients, alpha))
        if not np.all(np.isfinite(p)) or p.sum() <= 0:
            # Tiny ALPHA can underflow every gamma draw to 0; the limit of
            # Dirichlet(alpha -> 0) is "one client takes all".
            p = np.eye(clients)[rng.integers(clients)]
        cuts = np.round(np.cumsum(p)[:-1] * len(idx)).astype(int)
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.append(chunk)
    return [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]


def _by_classes(y, k, clients, per_client, rng) -> list[np.ndarray]:
    holders: list[list[int]] = [[] for _ in range(k)]
    for client in range(clients):
        for c in sorted({(client * per_client + j) % k for j in range(per_client)}):
            holders[c].append(client)
    orphans = [c for c in range(k) if not holders[c]]
    for i, c in enumerate(orphans):
        holders[c].append(i % clients)
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for c in range(k):
        idx = rng.permutation(np.flatnonzero(y == c))
        for client, chunk in zip(holders[c], np.array_split(idx, len(holders[c]))):
            parts[client].append(chunk)
    return [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
