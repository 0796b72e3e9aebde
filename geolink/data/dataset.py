"""Image–OSM pair datasets and the collate that batches them for the models.

A pair is ``(image [C, H, W] float, graph HeteroData)`` following ``geolink.graph.schema``. ``collate_pairs`` stacks
images and batches graphs into one PyG ``Batch``. ``OfficialPairFolder`` reads the official example layout
(``img/<name>.png`` + ``graph/<name>.safetensors`` in the official graph layout), as the UFZ samples ship.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch_geometric.data import Batch, HeteroData

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_to_tensor(path: str | Path, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                    ) -> torch.Tensor:
    """Read an RGB image file as a normalised float tensor ``[3, H, W]``."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    return (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


class OfficialPairFolder(Dataset):
    """Pairs in the official example layout: ``<root>/img/<name>.png`` and ``<root>/graph/<name>.safetensors``.

    Args:
        root: the folder holding ``img/`` and ``graph/``.
    """

    def __init__(self, root: str | Path) -> None:
        from geolink.convert import load_official_graph

        self.root = Path(root)
        images = {p.stem: p for p in sorted((self.root / "img").glob("*.png"))}
        graphs = {p.stem: p for p in sorted((self.root / "graph").glob("*.safetensors"))}
        self.names = sorted(set(images) & set(graphs))
        if not self.names:
            raise FileNotFoundError(f"{self.root} has no img/<name>.png with a matching graph/<name>.safetensors")
        self._images = [images[n] for n in self.names]
        self._graphs = [load_official_graph(graphs[n]) for n in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, HeteroData]:
        return image_to_tensor(self._images[index]), self._graphs[index]


def collate_pairs(pairs: Sequence[tuple[torch.Tensor, HeteroData]]) -> tuple[torch.Tensor, Batch]:
    """``[(image, graph), ...] -> (images [B, C, H, W], Batch of B graphs)``."""
    images, graphs = zip(*pairs)
    return torch.stack(images), Batch.from_data_list(list(graphs))
