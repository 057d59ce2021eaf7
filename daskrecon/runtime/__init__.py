"""The cluster at work, driver side: where tasks run, how long we wait, what storage they share.

- :mod:`.cluster`: local workers started in fresh interpreters; asking the scheduler for its workers;
- :mod:`.connection`: a client on a cluster started, reached or given, its workers waited for;
- :mod:`.roster`: the current workers, asked of the scheduler again only after a join or departure;
- :mod:`.placement`: which worker holds operator ``i`` and its objects; tasks run there;
- :mod:`.waiting`: every wait bounded (stalls, lost transfers, frozen workers become errors);
- :mod:`.memory`, :mod:`.memory_trim`: refusing work that cannot fit a worker; returning freed heap,
  and the pages of GPU libraries a CPU worker never uses;
- :mod:`.scheduler_plugin`: releasing tasks restricted to departed workers;
- :mod:`.arrays`: tensors and arrays to and from the cluster;
- :mod:`.graphs`: building blocks of task graphs (task names, placed tasks, the fixed-index trees);
- :mod:`.halos`: stencils whose halos are exchanged through Zarr (out of core);
- :mod:`.storage`: storage every worker sees, and what daskrecon owns there;
- :mod:`.folders`: one such folder (a checkpoint's, a scratch one): claimed, checked shared, removed.

May import: :mod:`daskrecon.errors`, :mod:`daskrecon.planning`, :mod:`daskrecon.tasks`.
"""
