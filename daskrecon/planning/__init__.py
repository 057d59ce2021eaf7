"""Pure planning: the geometry and schedules every layer above decides from, and nothing else.

Tile geometry (:mod:`.tiling`), which worker owns which operator (:mod:`.sharding`), the
reduction tree fixed by operator index (:mod:`.reduction`), the iterate's chunks
(:mod:`.chunking`), a network's receptive radius (:mod:`.receptive`), content fingerprints
(:mod:`.fingerprint`), the seeded operator-subset schedule (:mod:`.subsets`) and the
denoiser's precision from a measured error budget (:mod:`.precision`).

Functions of their arguments only — no cluster, no Dask graph, no I/O — with property tests.
May import: :mod:`daskrecon.errors`.
"""
