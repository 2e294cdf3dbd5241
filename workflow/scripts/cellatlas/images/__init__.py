"""Images of cells: reading an image dataset into the pipeline's container, and simulating one.

An image dataset is held as an AnnData like an expression dataset, so that the classify stage's
folds, scores, comparison and tracking take it as they are: a row per cell (one crop), ``X`` its
pixels (channels x height x width, flattened, float32 in [0, 1]), ``obs`` its label and groups
(image, well, plate, donor), ``uns["cellatlas"]["image"]`` the shape and the channels' names.
"""

IMAGE_KEY = "image"
SHAPE_KEY = "shape"
CHANNELS_KEY = "channels"


def image_shape(adata) -> tuple[int, int, int]:
    """(channels, height, width) of an image dataset's rows."""
    from cellatlas import keys

    return tuple(int(v) for v in adata.uns[keys.UNS_KEY][IMAGE_KEY][SHAPE_KEY])
