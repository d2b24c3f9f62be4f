"""Evaluation: the registry of measurements (:mod:`.measurements`) and the machinery that runs them block by block
(:mod:`.engine`), resumably (:mod:`.progress`), sharded and merged (:mod:`.results`); a robustness curve's points
(:mod:`.eps_grid`). The jobs that use them: rpat/jobs/evaluate.py, rpat/jobs/curve.py."""
