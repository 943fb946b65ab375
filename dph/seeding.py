"""Every random draw of a run comes from a seed of its own stage, never from what ran before it.

A seed means one result: the RL run's draws must not depend on whether this process built the base
model or the pre-sampling cache first, nor on how many evaluations ran, nor on a resume. So each
stage derives its seed from the config and its position, and samples on its own generator:

    stage                      seed                                           draws
    tiny base model build      model.seed                                     init, warm-up data and order
    pre-sampling               presample.seed (+ the batch index)             D_pef / D_exp responses
    rollouts of step s         stage_seed(seed, "rollout", s, rank)           the step's responses
    minibatch order of step s  stage_seed(seed, "minibatch", s)               group shuffling
    rehearsal batch of step s  stage_seed(seed, "rehearsal", s, rank)         D_pef rows rehearsed
    evaluation                 stage_seed(seed, "eval", split, rank)          eval samples (same at
                                                                              every evaluation)
    the prompt stream          seed                                           prompt order (its state
                                                                              is checkpointed)

The global generators (python, numpy, torch) are seeded with `seed + rank` when training starts,
for anything else that draws from them (e.g. dropout).
"""

from __future__ import annotations

import hashlib
import json

import torch


def stage_seed(*parts) -> int:
    """A 63-bit seed that depends only on ``parts`` (JSON-able values), stable across processes."""
    blob = json.dumps(parts, separators=(",", ":"), default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


def generator(*parts) -> torch.Generator:
    """A CPU torch generator seeded with ``stage_seed(*parts)``."""
    return torch.Generator().manual_seed(stage_seed(*parts))
