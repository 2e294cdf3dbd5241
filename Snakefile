# The cell-atlas pipeline: raw counts -> QC -> normalization -> embeddings -> clusters, and
# supervised models with grouped cross-validation, Lightning models (an MLP classifier, a VAE embedding,
# convolutional networks on images of cells),
# query datasets mapped onto reference atlases with three methods,
# every stage a tracked MLflow child run under one parent run per invocation.
# Run: snakemake --cores all        Config: config/config.yaml (schema: config/schema/)

from snakemake.utils import min_version

min_version("9.0")


# yours; the demo (`make run`) replaces it with config/demo.yaml
configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


report: "workflow/report/workflow.rst"


# The schema's defaults are filled in here; errors are one line naming the key.
validate_config(config, "config/schema/config.schema.yaml")
if not config["datasets"] and not config["images"]["datasets"]:
    print("cellatlas: no datasets in the config: add yours to config/config.yaml (README: Configure your data), "
          "or run the demo with `make run`", file=sys.stderr)


# ids are single path components (the schema's id pattern), never "a/b"
wildcard_constraints:
    dataset=r"[A-Za-z][A-Za-z0-9_-]*",
    task=r"[A-Za-z][A-Za-z0-9_-]*",
    model=r"[A-Za-z][A-Za-z0-9_-]*",
    atlas=r"[A-Za-z][A-Za-z0-9_-]*",


include: "workflow/rules/ingest.smk"
include: "workflow/rules/qc.smk"
include: "workflow/rules/normalize.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/integrate.smk"
include: "workflow/rules/cluster.smk"
include: "workflow/rules/images.smk"
include: "workflow/rules/classify.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/atlas.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        get_final_outputs(),
    default_target: True


onstart:
    start_tracking()


onsuccess:
    end_tracking("FINISHED")


onerror:
    end_tracking("FAILED")
