"""dph's Optuna sweeper for Hydra (``hydra/sweeper=optuna``), built on Optuna's ask/tell API.

Settings: ``config.py``; the search space grammar: ``search_space.py``; the sweep loop: ``_impl.py``
(imported only when a sweep starts, so that plain runs do not import Optuna).
"""
