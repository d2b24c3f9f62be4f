"""The machinery that runs evaluation measurements (the registry is :mod:`rpat.evaluate`): block by block
(:mod:`.engine`), resumably (:mod:`.progress`), sharded and merged (:mod:`.results`)."""
