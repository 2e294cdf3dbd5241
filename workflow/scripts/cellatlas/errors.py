"""Errors a user can act on: one line, naming the dataset, file or config key."""


class CellAtlasError(Exception):
    """Base class: the message is shown to the user as a single line, without a traceback."""


class ConfigError(CellAtlasError):
    """The configuration is wrong; raised before any job runs."""


class InputDataError(CellAtlasError):
    """A dataset's file or values are unusable."""

    def __init__(self, dataset: str, problem: str, *, path: str | None = None):
        where = f"dataset '{dataset}'" + (f", file '{path}'" if path else "")
        super().__init__(f"{where}: {problem}")
        self.dataset = dataset
        self.path = path
        self.problem = problem


class TaskError(CellAtlasError):
    """A supervised task (dataset x target) cannot be evaluated as configured."""

    def __init__(self, dataset: str, task: str, problem: str):
        super().__init__(f"dataset '{dataset}', task '{task}': {problem}")
        self.dataset = dataset
        self.task = task
        self.problem = problem


class AtlasError(CellAtlasError):
    """A query cannot be mapped onto an atlas's reference as configured."""

    def __init__(self, atlas: str, problem: str):
        super().__init__(f"atlas '{atlas}': {problem}")
        self.atlas = atlas
        self.problem = problem


class TrackingError(CellAtlasError):
    """The MLflow tracking server cannot be reached: the job stops before it computes anything."""
