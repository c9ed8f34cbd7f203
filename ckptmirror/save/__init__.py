"""The save path, in the order the data takes it.

1. :mod:`~ckptmirror.save.snapshot` (training thread): plan the state's storages and copy them
   into a reused staging arena: the only stall a save costs.
2. :mod:`~ckptmirror.save.encode` (background): cut the arena's data stream into objects, hash
   each once, serialise the manifests.
3. :mod:`~ckptmirror.save.fanout` (background): write the objects and manifest to every replica
   at once, then the commit record, per replica, agreed across ranks.
4. :mod:`~ckptmirror.save.retention` (background): drop steps beyond ``keep_last``, and torn
   leftovers, once a newer step is committed.
"""
