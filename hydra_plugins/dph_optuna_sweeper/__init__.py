"""dph's Optuna sweeper for Hydra (``hydra/sweeper=optuna``), built on Optuna's ask/tell API.

Settings: ``config.py``; the search space grammar: ``_search_space.py``; the sweep loop: ``_impl.py``
(imported only when a sweep starts, so that plain runs do not import Optuna). Modules whose names
start with ``_`` are the ones Hydra's plugin scan never re-executes, so their classes (e.g.
``SearchSpaceError``) keep one identity in a process that composes configs more than once.
"""
