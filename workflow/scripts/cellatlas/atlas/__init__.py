"""Atlas mapping: place query datasets on a reference's fitted map and transfer its labels.

The reference map is what the reference's own stages fitted, gathered once per atlas: its
genes with the means and standard deviations its PCA scaled them by, the PCA loadings, the
reference cells' PCA and UMAP coordinates and kNN graph, and, for the latent method, the VAE
latent space and its graph. Nothing of the reference is refitted for a query:

* projection: the query's log-normalized values are scaled with the reference's means and
  standard deviations and multiplied by the reference's loadings. A gene the query lacks
  counts as the reference mean, so it moves no cell. scanpy's ``Ingest`` places the cells in
  the reference UMAP (umap-learn's transform of the stored layout); an exact search finds
  their reference neighbours.
* latent: the query's counts are encoded by the reference's VAE; the query's batches are new
  to the model, so the encoder gets no batch code for them.
* classifier: the reference's best classify-stage model predicts the query's cells.

Confidence. For the two kNN methods it is agreement (the winning label's share of the k
reference neighbours) times proximity. Proximity asks whether the cell lies where reference
cells of its label lie: each label is a Gaussian in the representation (mean and Ledoit-Wolf
shrunk covariance, fitted once with the map), the cell's Mahalanobis distance to its label is
compared with the reference cells' own (out-of-fold) distances, and proximity is the share of
those reference cells at least as far, over 1% (so 1 inside the label's 99% envelope, falling
to 0 beyond its farthest cell). A query cell of a type the reference lacks lands among some
reference label's neighbours but outside that label's envelope. For the classifier the
confidence is the top class probability. Below ``min_confidence`` a cell is ``unassigned``
rather than forced into a reference type.
"""

UNASSIGNED = "unassigned"
METHODS = ("projection", "latent", "classifier")
#: var columns that hold stable gene ids (10x: gene_ids), tried in this order
ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_gene_id")
#: obsm keys of the reference map and of a mapped query
PCA, UMAP, VAE, VAE_UMAP = "X_pca", "X_umap", "X_vae", "X_umap_vae"
#: obsp keys of the reference map's kNN graphs (distances) on the PCA and the VAE space
GRAPH = {PCA: "distances", VAE: "vae_distances"}
#: the share of a label's reference cells outside the envelope in which proximity is 1
TAIL = 0.01

# the package's parts, by section; their names are the package's (cellatlas.atlas.build_reference)
from cellatlas.atlas.evaluate import agreement_between, evaluate  # noqa: E402
from cellatlas.atlas.genes import GeneAlignment, align_genes, check_overlap  # noqa: E402
from cellatlas.atlas.methods import (  # noqa: E402
    assign, classifier_transfer, encode_latent, knn_transfer, map_query, place_in_umap, project,
)
from cellatlas.atlas.reference import (  # noqa: E402
    build_reference, build_reference_vae, label_gaussians, mahalanobis, proximity, with_vae,
)

__all__ = [
    "GeneAlignment", "agreement_between", "align_genes", "assign", "build_reference", "build_reference_vae",
    "check_overlap", "classifier_transfer", "encode_latent", "evaluate", "knn_transfer", "label_gaussians",
    "mahalanobis", "map_query", "place_in_umap", "project", "proximity", "with_vae",
]
