"""The jobs the workflow runs per cell after training, one module each, as ``rpat <job>`` runs them: evaluation of
the checkpoints (:mod:`.evaluate`), the robustness curve (:mod:`.curve`) and the perception analysis
(:mod:`.perceive`). What they measure lives beside them: the measurements and their engine in rpat/evaluation/,
the perception measurements in rpat/perception.py. The training job is rpat/train.py.
"""
