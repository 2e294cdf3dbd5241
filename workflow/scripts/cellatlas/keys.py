"""Names of AnnData fields and metrics shared between stages (one spelling, one place)."""

# obs columns every canonical dataset may carry, filled from the dataset's label/batch/donor keys
LABEL = "label"
BATCH = "batch"
DONOR = "donor"

# layers and uns entries
COUNTS_LAYER = "counts"
UNS_KEY = "cellatlas"  # adata.uns["cellatlas"][stage] -> params and summary of each stage

# values held in X at ingest
VALUES_COUNTS = "counts"
VALUES_LOGNORM = "lognorm"

STAGES = ("ingest", "qc", "normalize", "embed", "cluster")


def leiden_key(resolution: float) -> str:
    return f"leiden_r{resolution:g}"
