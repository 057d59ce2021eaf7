"""The deepinv-compatible front: what a script written for ``deepinv.distributed`` touches.

:mod:`.context` (``DistributedContext``: the cluster, deepinv's one-rank collectives from
:mod:`.collectives`), :mod:`.distribute` (the type registry), :mod:`.physics` (over
:mod:`.operator_stack`: the operators on their workers), :mod:`.measurements`,
:mod:`.fidelity`, :mod:`.processing` (the tiled denoiser and prior), :mod:`.strategies`
(deepinv's tiling strategies), :mod:`.autograd` (gradients through all of them),
:mod:`.bundle` (the user guide's bundle API), :mod:`.framework` (deepinv 0.5's import place),
and :mod:`.reconstruct` (``reconstruct()``: validates its objects, then runs the engine).

May import every layer below: :mod:`daskrecon.errors`, :mod:`daskrecon.planning`,
:mod:`daskrecon.tasks`, :mod:`daskrecon.runtime`, :mod:`daskrecon.operators`,
:mod:`daskrecon.engine`.
"""
