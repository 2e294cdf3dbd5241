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

# supervised tasks (classify stage): kinds, metric names, and the metric models are compared on
CLASSIFICATION = "classification"
REGRESSION = "regression"
TASK_DIRS = {CLASSIFICATION: "classify", REGRESSION: "regress"}
CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
REGRESSION_METRICS = ("r2", "mse", "mae")
PRIMARY_METRIC = {CLASSIFICATION: "macro_f1", REGRESSION: "r2"}
#: the split schemes; "auto" resolves to grouped (by donor) when the dataset has donors, else stratified
SPLIT_SCHEMES = ("auto", "stratified", "grouped", "leave_one_batch_out", "batches")
#: test_fold of cells used only for training (batches scheme) and of cells left out of the task
TRAIN_ONLY = -1
EXCLUDED = -2

# integration methods, simplest first (ties go to the earlier); pca is the unintegrated baseline
INTEGRATION_METHODS = ("pca", "combat", "harmony", "bbknn", "vae", "vae_labels")
INTEGRATION_BASELINE = "pca"
INTEGRATION_DEFAULT = INTEGRATION_METHODS[:-1]  # vae_labels is opt-in
