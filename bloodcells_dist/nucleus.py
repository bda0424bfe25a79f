"""The stained nucleus of a white cell: what the cell window centres on (data/preprocess.py) and what cell recovery
describes (pack/cells.py). Below both stages, and numpy only: packing never loads torch for it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def nucleus_mask(rgb: np.ndarray) -> np.ndarray:
    """The stained white-cell nucleus: purple pixels ((R+B)/2 - G > 40, B > 100), the blob with the most
    stain after closing the gaps between lobes (so a multi-lobed neutrophil nucleus counts as one)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    stain = (r + b) / 2 - g - 40  # how far past the threshold: the nucleus is the most strongly stained
    purple = (stain > 0) & (b > 100)
    blobs, n = ndimage.label(ndimage.binary_closing(purple, iterations=6))
    if n == 0:
        return purple  # empty: the caller treats the image as unreliable
    mass = ndimage.sum(np.where(purple, stain, 0.0), blobs, range(1, n + 1))
    return (blobs == int(np.argmax(mass)) + 1) & purple
