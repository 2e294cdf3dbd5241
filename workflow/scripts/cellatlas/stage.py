"""The stage contract: a stage's library entry returns a :class:`Result`; one runner writes it.

Every rule's script calls one library function with typed parameters. That function computes
and returns what the stage produced, keyed by the rule's output names: tables, figures (as
functions that draw into a path), AnnData objects, files it had to write itself (a Lightning
checkpoint, in a scratch folder the runner hands it), models, and metrics. It never writes into
``results/`` and never looks at output names or at MLflow. :mod:`cellatlas.runner` then writes
every entry to its declared output, logs the files, metrics and models to the stage's MLflow run
and writes the run record, so every name in the tracker comes from one place
(:mod:`cellatlas.naming`).

Metrics come in three kinds, whatever the model:

* ``metrics``: one value per run (``n_cells``, ``best_ari``; text values become tags);
* ``cv``: one value per fold of a cross-validation, by metric; logged as ``cv/<metric>`` (mean
  over folds), ``cv/<metric>_sd`` and ``fold/<metric>`` (one step per fold);
* training curves, logged live by the training loop as ``curve/<metric>`` with the epoch as step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

#: a figure: draws itself into the path it is given (the runner decides the path)
Plot = Callable[[str], None]


@dataclass
class Model:
    """A fitted model to save (``joblib``) and log as an MLflow model.

    ``flavor`` is ``sklearn`` (anything with ``predict``; logged with a signature built from
    ``input_example``) or ``torch`` (an ``nn.Module``). ``requirements`` are packages beyond the
    flavor's own that loading needs.
    """

    obj: Any
    flavor: str = "sklearn"
    input_example: Any = None
    requirements: tuple[str, ...] = ()


@dataclass
class DatasetInput:
    """A dataset a stage read: logged as an MLflow run input (the UI's Dataset column)."""

    name: str
    path: str
    context: str = "input"


@dataclass
class Result:
    """What a stage produced, keyed by the rule's output names (``run`` excluded)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    cv: dict[str, Sequence[float]] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Plot] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    #: JSON documents
    records: dict[str, Any] = field(default_factory=dict)
    #: text files written as they are (HTML pages)
    texts: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    #: saved with joblib where the rule declares an output of that name; logged either way
    models: dict[str, Model] = field(default_factory=dict)
    #: values decided while running (the model a mapping used): logged as params
    params: dict[str, Any] = field(default_factory=dict)
    inputs: list[DatasetInput] = field(default_factory=list)
    #: Model Registry entries: registered name -> the logged model's URI, given the alias "best"
    register: dict[str, str] = field(default_factory=dict)
    #: warnings that change what a result means: shown on the terminal and kept as a tag
    notes: list[str] = field(default_factory=list)
    #: outputs that are not logged as artifacts (large data the files already hold)
    not_logged: set[str] = field(default_factory=set)

    def keys(self) -> set[str]:
        return {*self.tables, *self.figures, *self.data, *self.records, *self.texts, *self.files, *self.models}


def check_outputs(result: Result, outputs: Mapping[str, str], *, where: str) -> None:
    """Each declared output gets exactly one result entry, and no entry is left without one."""
    declared = set(outputs) - {"run"}
    produced = result.keys() - (set(result.models) - declared)
    if declared != produced:
        missing, extra = sorted(declared - produced), sorted(produced - declared)
        raise RuntimeError(f"{where}: the stage returned no {missing} and undeclared {extra}")


def plot(draw: Callable[..., None], *args: Any, **kwargs: Any) -> Plot:
    """A :data:`Plot` of a :mod:`cellatlas.plotting` function, whose path comes after ``args``."""
    return lambda path: draw(*args, path, **kwargs)
