"""Supervised models on expression with honest evaluation.

* :mod:`.splits`: the task's target checked and its cross-validation folds fixed once, so
  every model of a task sees the same folds (grouped by donor when the dataset has donors).
* :mod:`.features`: gene selection, scaling and PCA as scikit-learn transformers, so each is
  fitted inside the training part of every fold (no leakage by construction).
* :mod:`.models`: the model kinds a config may name, with their defaults.
* :mod:`.evaluate`: cross-validation, per-fold metrics, out-of-fold predictions, final model,
  informative genes.
* :mod:`.compare`: paired statistical comparison of models on the same folds.
"""
