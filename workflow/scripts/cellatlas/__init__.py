"""Library behind the cell-atlas workflow: pure functions, AnnData in, AnnData out.

Submodules are imported on demand so that a stage pays only for what it uses
(scanpy alone costs seconds to import, and every stage is a fresh process).
"""

from cellatlas.errors import CellAtlasError, ConfigError, InputDataError

__all__ = ["CellAtlasError", "ConfigError", "InputDataError"]
