"""Rule download: fetch a url source once and verify its sha256."""

import sys

from cellatlas.errors import CellAtlasError
from cellatlas.ingest import download

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821
try:
    download(snakemake.params.source["url"], snakemake.params.source["sha256"], snakemake.output[0], dataset=snakemake.wildcards.dataset)  # noqa: F821
except CellAtlasError as e:
    print(f"cellatlas error in download: {e}", file=sys.stderr)
    print(f"cellatlas error in download: {e}", file=sys.__stderr__)
    sys.exit(1)
