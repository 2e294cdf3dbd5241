"""Batch integration: several methods side by side, scored with scIB's metrics, the winner
feeding the clusters and the maps.

Each method gives the dataset an embedding or a kNN graph in which batches should mix and cell
types stay apart:

* ``pca``: the embed stage's PCA, unintegrated; always a row, the baseline every method must beat;
* ``harmony``: Harmony's corrected PCs (harmonypy);
* ``bbknn``: batch-balanced kNN graph on the PCA (BBKNN); a graph, no embedding;
* ``combat``: ComBat-corrected log-expression of the HVGs (scanpy), then the embed stage's PCA;
* ``vae``: the pipeline's batch-conditioned negative-binomial VAE (the train_vae latent space);
* ``vae_labels``: the same VAE trained with a classifier on its latent space (scANVI's use of
  labels; opt-in): it has seen the labels it is scored on, so its held-out score is the fair one.

Scores (:mod:`cellatlas.integrate.scores`) are scIB's, computed by ``scib-metrics``: batch
correction (iLISI, kBET, graph connectivity, BRAS, PCR comparison) and biological conservation
(cLISI, label silhouette, isolated labels, Leiden NMI and ARI), combined as scIB does (0.4 x
batch + 0.6 x biology). Methods that can place cells they were not fitted on (``pca``: the
loadings; ``vae``, ``vae_labels``: the encoder) are also scored with one donor held out of the fit.
"""

from cellatlas.keys import INTEGRATION_BASELINE as BASELINE  # noqa: E402  the method that never corrects anything
from cellatlas.keys import INTEGRATION_METHODS as METHODS  # noqa: E402  simplest first: the order ties are broken in

#: methods that place new cells, and how; the others get no held-out scores
MAPS_NEW_CELLS = {"pca": "projected onto the loadings fitted without them", "vae": "encoded by a VAE trained without them",
                  "vae_labels": "encoded by a VAE trained without them (nor their labels)"}
CANNOT_MAP = {
    "harmony": "harmonypy corrects only the cells it was fitted on",
    "bbknn": "its graph joins only the cells it was built on",
    "combat": "scanpy's ComBat has no transform for new cells",
}
#: methods that learn the labels they are scored on: never "best" (use names them to take one)
LEARNS_LABELS = ("vae_labels",)
#: obsm key of an integrated embedding (graph methods have none)
REP = "X_integrated"

from cellatlas.integrate.methods import Integrated, heldout_donor, integrate, integrate_heldout  # noqa: E402
from cellatlas.integrate.scores import choose, score, shortest_path_neighbors  # noqa: E402

__all__ = ["Integrated", "choose", "heldout_donor", "integrate", "integrate_heldout", "score", "shortest_path_neighbors"]
