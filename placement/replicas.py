"""Which copy of a replicated expert a token uses: ONE rule, shared by the simulator and the runtime.

    copies_LEG (which GPUs hold expert e at MoE layer l) --copy_choice_LEG--> choice_LEG[l, e, c]: the GPU a token
    held on GPU c sends to for expert e:
        c itself, when c holds a copy (the token does not move for it);
        else the copy on c's node whose local index comes first at or after c's (wrapping round): a node's
        sources spread over its copies, as node_aware spreads its relays;
        else copy number (c mod n) of the expert's n copies, in GPU order: sources spread over the copies.

The choice depends only on (layer, expert, where the token is), never on the token or the batch, so every rank
computes it locally (a rank only needs its own column ``choice_LEG[:, :, rank]``) and the simulator replays it
exactly. With one copy per expert every column is the placement's ``expert_to_gpu_LE``.

Shapes: L MoE layers, E experts, G GPUs, P GPUs per node.
"""

from __future__ import annotations

import numpy as np


def copy_choice_LEG(copies_LEG: np.ndarray, gpus_per_node: int) -> np.ndarray:
    """int64 [L, E, G]: the copy a token on GPU c uses for expert e at layer l (rule above)."""
    L, E, G = copies_LEG.shape
    P = gpus_per_node
    n_LE = copies_LEG.sum(axis=2)
    choice_LEG = np.repeat(np.argmax(copies_LEG, axis=2)[:, :, None], G, axis=2).astype(np.int64)
    c_G = np.arange(G)
    node_G, local_G = c_G // P, c_G % P
    for l, e in np.argwhere(n_LE > 1):
        gpus = np.flatnonzero(copies_LEG[l, e])
        row = gpus[c_G % len(gpus)]                               # no copy on the node: spread by source
        same_node_GX = node_G[:, None] == (gpus // P)[None, :]   # [G sources, copies]
        ahead_GX = (gpus % P)[None, :] - local_G[:, None]
        ahead_GX = np.where(ahead_GX < 0, ahead_GX + P, ahead_GX)  # distance forward on the node, wrapping
        ahead_GX = np.where(same_node_GX, ahead_GX, P + 1)
        on_node_G = same_node_GX.any(axis=1)
        row = np.where(on_node_G, gpus[np.argmin(ahead_GX, axis=1)], row)   # distance 0: the source itself
        choice_LEG[l, e] = row
    return choice_LEG
